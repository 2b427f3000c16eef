"""The station's FUNDED check against the contract on the in-process chain."""

from __future__ import annotations

import pytest

from agent.channel.messages import Tariff
from agent.channel.records import OpenParams, Party
from agent.errors import SettlementError
from agent.keys import IdentityKey
from agent.settlement.funding import check_channel_funded
from tests.agent.settlement.conftest import Parties, new_salt


def params(p: Parties, salt: bytes, *, deposit_ev: int = 1_000, window: int = 3600,
           contract: bytes | None = None) -> OpenParams:
    return OpenParams(
        chain_id=p.chain.chain_id, contract=contract or p.address, salt=salt,
        ev=Party(IdentityKey.generate().public, p.ev.address),
        cs=Party(IdentityKey.generate().public, p.cs.address),
        deposit_ev=deposit_ev, deposit_cs=0, dispute_window_s=window,
        tariff=Tariff(300), tariff_sig=bytes(64), credit_window_wh=100, pay_step_wh=10)


def test_funded_channel_passes(parties: Parties) -> None:
    salt = new_salt()
    parties.client(parties.ev).open_channel(parties.ev.address, parties.cs.address, salt,
                                             3600, 1_000)
    check_channel_funded(parties.client(parties.cs), params(parties, salt))


def test_unfunded_channel_is_refused(parties: Parties) -> None:
    with pytest.raises(SettlementError) as info:
        check_channel_funded(parties.client(parties.cs), params(parties, new_salt()))
    assert info.value.reason == "not-funded"


@pytest.mark.parametrize("change", ["deposit", "window", "contract"])
def test_channel_unlike_open_is_refused(parties: Parties, change: str) -> None:
    salt = new_salt()
    parties.client(parties.ev).open_channel(parties.ev.address, parties.cs.address, salt,
                                             3600, 1_000)
    claimed = {"deposit": params(parties, salt, deposit_ev=5_000),
               "window": params(parties, salt, window=60),
               "contract": params(parties, salt, contract=b"\x11" * 20)}[change]
    with pytest.raises(SettlementError) as info:
        check_channel_funded(parties.client(parties.cs), claimed)
    assert info.value.reason == "funding-mismatch"
