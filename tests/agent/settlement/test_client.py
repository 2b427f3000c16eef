"""SettlementClient against the in-process chain, and against a node that is not there."""

from __future__ import annotations

import dataclasses
import socket

import pytest

from agent.errors import SettlementError
from agent.settlement.client import SettlementClient
from agent.settlement.model import Status
from agent.settlement.rpc import SendPolicy

from .conftest import TOKENS, Parties, new_salt


def test_cooperative_session_through_the_client(parties: Parties) -> None:
    p = parties
    ev, cs = p.client(p.ev), p.client(p.cs)
    opened = ev.open_channel(p.ev.address, p.cs.address, new_salt(), window_s=60, deposit=1000)
    cid = opened.channel_id
    assert opened.tx.gas_used > 21000
    deposit = cs.deposit(cid, 400)
    assert ev.view(cid).status is Status.OPEN
    assert ev.record(cid).dep_cs == 400 and deposit.gas_used > 21000
    final = p.state(cid, 12, t_ev=640, t_cs=40, wh=8000, final=True)
    tx = cs.cooperative_close(final, *p.sigs(final))
    assert tx.block_number > opened.tx.block_number
    # Issue 7's target: a whole cooperative session within 60% of Raiden's 457,896.
    assert opened.tx.gas_used + deposit.gas_used + tx.gas_used <= 0.60 * 457_896
    assert cs.view(cid).status is Status.SETTLED
    assert p.balance(p.ev) == TOKENS - 1000 + 400 and p.balance(p.cs) == TOKENS - 400 + 1000
    with pytest.raises(SettlementError) as err:
        cs.settle(cid)
    assert err.value.reason == "channel-settled"


def test_unilateral_close_then_settle_after_the_window(parties: Parties) -> None:
    p = parties
    ev = p.client(p.ev)
    cid = ev.open_channel(p.ev.address, p.cs.address, new_salt(), 30, 500).channel_id
    state = p.state(cid, 4, 120)
    close = ev.close(state, *p.sigs(state))
    view = ev.view(cid)
    assert view.status is Status.CLOSING and view.record.deadline == close.block_timestamp + 30
    with pytest.raises(SettlementError) as err:
        ev.settle(cid)
    assert err.value.reason == "rejected" and "window" in str(err.value)
    p.chain.advance_time(31)
    p.client(p.other).settle(cid)          # anyone can settle
    assert p.balance(p.cs) == TOKENS + 120


def test_close_with_no_state_returns_the_deposit(parties: Parties) -> None:
    p = parties
    cs = p.client(p.cs)
    cid = cs.open_channel(p.ev.address, p.cs.address, new_salt(), 5, 250).channel_id
    cs.close(channel_id=cid)
    p.chain.advance_time(6)
    cs.settle(cid)
    assert p.balance(p.cs) == TOKENS


@pytest.mark.parametrize("bad", ["high-s", "foreign-contract", "not-final", "overdraw"])
def test_client_refuses_bad_states_before_sending(parties: Parties, bad: str) -> None:
    p = parties
    ev = p.client(p.ev)
    cid = ev.open_channel(p.ev.address, p.cs.address, new_salt(), 30, 500).channel_id
    state = p.state(cid, 3, 100, final=True)
    sig_ev, sig_cs = p.sigs(state)
    if bad == "high-s":
        s = int.from_bytes(sig_cs[32:64], "big")
        n = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
        sig_cs = sig_cs[:32] + (n - s).to_bytes(32, "big") + bytes([55 - sig_cs[64]])
    elif bad == "foreign-contract":
        state = dataclasses.replace(state, contract=b"\x42" * 20)
    elif bad == "not-final":
        state = dataclasses.replace(state, final=False)
    else:
        state = dataclasses.replace(state, t_ev=501)
        sig_ev, sig_cs = p.sigs(state)
    nonce = p.chain.w3.eth.get_transaction_count(ev.sender.address)
    with pytest.raises(SettlementError) as err:
        ev.cooperative_close(state, sig_ev, sig_cs)
    assert err.value.reason == "bad-state"
    assert p.chain.w3.eth.get_transaction_count(ev.sender.address) == nonce  # nothing sent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_node_down_is_a_clear_settlement_error(parties: Parties) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    client = SettlementClient(url, parties.chain.contract, parties.ev,
                              policy=SendPolicy(retries=3, retry_delay_s=0.01))
    with pytest.raises(SettlementError) as err:
        client.view(bytes(32))
    assert err.value.reason == "node-unavailable"
    assert "after 3 attempts" in str(err.value)
    with pytest.raises(SettlementError) as err:
        client.open_channel(parties.ev.address, parties.cs.address, new_salt(), 30, 0)
    assert err.value.reason == "node-unavailable"


def test_bad_node_url_and_address() -> None:
    from agent.keys import SettlementKey

    with pytest.raises(SettlementError) as err:
        SettlementClient("ftp://example", bytes(20), SettlementKey.generate())
    assert err.value.reason == "node-url"
    with pytest.raises(SettlementError) as err:
        SettlementClient("http://127.0.0.1:1", b"\x01" * 19, SettlementKey.generate())
    assert err.value.reason == "bad-address"


def test_a_real_channel_session_settles_through_the_client(parties: Parties) -> None:
    """Issue 6's protocol (both roles, sans-I/O, in-memory link) pays per kWh; its Closed
    event (final state + both signatures) goes straight into cooperative_close."""
    from agent.channel.protocol import Closed
    from tests.agent.channel.harness import Link, Setup

    p = parties

    class OnChain(Setup):
        def station_kwargs(self) -> dict[str, object]:
            return {**super().station_kwargs(), "chain_id": p.chain.chain_id,
                    "contract": p.chain.contract}

        def vehicle_kwargs(self) -> dict[str, object]:
            return {**super().vehicle_kwargs(), "chain_id": p.chain.chain_id,
                    "contract": p.chain.contract}

    setup = OnChain(deposit_ev=50_000, deposit_cs=5_000, ev_key=p.ev, cs_key=p.cs)
    ev, cs = p.client(p.ev), p.client(p.cs)
    opened = ev.open_channel(p.ev.address, p.cs.address, setup.salt, 3600, setup.deposit_ev)
    cs.deposit(opened.channel_id, setup.deposit_cs)
    link = Link(setup)
    link.open_and_fund()
    assert link.cs.channel_id == opened.channel_id
    link.charge(40)                                    # 400 Wh
    link.run("ev", link.ev.close(link.now))
    closed = [e for who, e in link.events if who == "cs" and isinstance(e, Closed)][0]
    assert closed.state.final and closed.state.t_ev > 0
    cs.cooperative_close(closed.state, closed.sig_ev, closed.sig_cs)
    assert p.balance(p.cs) == TOKENS + closed.state.t_ev - closed.state.t_cs
    assert p.balance(p.ev) == TOKENS - closed.state.t_ev + closed.state.t_cs
