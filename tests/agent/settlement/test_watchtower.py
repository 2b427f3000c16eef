"""A watchtower beats a stale close (DESIGN s6), and cannot be poisoned or lulled (issue 14):
it verifies every state it is offered, keeps the best valid ones across a crash, takes
hand-offs only from the channel's parties, and warns when a close leaves it little time.
The attacks run on eth-tester and on anvil."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from agent.channel.state import sign_digest
from agent.errors import SpoolError
from agent.keys import SettlementKey
from agent.settlement.handoff import Handoff
from agent.settlement.model import ChannelRecord, SignedState, Status
from agent.settlement.towerstore import TowerStore
from agent.settlement.watchtower import (
    Challenge,
    Watchtower,
    WatchtowerService,
    WindowMissed,
    WindowWarning,
    drop_handoff,
    handoffs_from_dir,
)

from .conftest import TOKENS, Parties, new_salt

WINDOW = 60


def signed(p: Parties, cid: bytes, nonce: int, t_ev: int, t_cs: int = 0) -> SignedState:
    state = p.state(cid, nonce, t_ev, t_cs)
    return SignedState(state, *p.sigs(state))


def opened(p: Parties, deposit: int = 1000, window: int = WINDOW) -> tuple[bytes, bytes, int]:
    """(channel id, salt, block) of a channel the EV opens with ``deposit``."""
    salt = new_salt()
    tx = p.client(p.ev).open_channel(p.ev.address, p.cs.address, salt, window, deposit)
    return tx.channel_id, salt, tx.tx.block_number


def handoff(p: Parties, s: SignedState, salt: bytes, by: SettlementKey | None = None) -> Handoff:
    return Handoff.make(s, p.ev.address, p.cs.address, salt, by or p.cs)


def tower_for(p: Parties, **kw: object) -> Watchtower:
    return Watchtower(p.chain.chain_id, p.address, **kw)  # type: ignore[arg-type]


def test_watchtower_beats_a_stale_close(on_both: Parties, tmp_path: Path) -> None:
    p = on_both
    ev = p.client(p.ev)
    cid, salt, block = opened(p)
    p.client(p.cs).deposit(cid, 200)
    session = [signed(p, cid, n, 150 * n) for n in range(1, 6)]     # the EV paid 750
    # The station hands its latest state to the tower (a file dropped in its directory).
    drop_handoff(tmp_path, handoff(p, session[-1], salt))
    (tmp_path / "garbage.handoff").write_bytes(b"\xa1\x01")         # hostile input: skipped
    tower = tower_for(p)
    service = WatchtowerService(p.client(p.other), tower, from_block=block,
                                sources=[handoffs_from_dir(tmp_path)])
    assert service.poll_once() == []                                 # nothing to do yet
    stale = session[0]                   # the EV cheats: closes on nonce 1 (it paid 150)
    ev.close(stale.state, stale.sig_ev, stale.sig_cs)
    sent = service.poll_once()
    assert len(sent) == 1 and tower.counters["challenge-sent"] == 1
    record = ev.record(cid)
    assert (record.nonce, record.t_ev) == (5, 750)
    assert service.poll_once() == []                                 # no second challenge
    p.chain.advance_time(WINDOW + 1)
    ev.settle(cid)
    assert ev.view(cid).status is Status.SETTLED
    assert p.balance(p.ev) == TOKENS - 1000 + 250
    assert p.balance(p.cs) == TOKENS - 200 + 950
    service.poll_once()
    assert cid not in tower.best                                     # settled: forgotten


def test_the_tower_catches_a_close_that_happened_before_the_state_arrived(
        parties: Parties) -> None:
    p = parties
    ev = p.client(p.ev)
    cid, _, block = opened(p)
    stale = signed(p, cid, 1, 10)
    ev.close(stale.state, stale.sig_ev, stale.sig_cs)
    tower = tower_for(p)
    service = WatchtowerService(p.client(p.other), tower, from_block=block)
    service.poll_once()                     # sees the close, holds nothing
    assert not tower.offer(signed(p, cid, 3, 300))   # bare: waits for the chain's parties
    assert cid in tower.waiting() and cid not in tower.best
    assert len(service.poll_once()) == 1    # learns the parties, verifies, challenges
    assert ev.record(cid).nonce == 3


# --- poisoning (issue 14, 2) --------------------------------------------------------------

def test_a_forged_state_never_displaces_the_genuine_one(on_both: Parties,
                                                        tmp_path: Path) -> None:
    """The review's attack: a state with a huge nonce, one real signature plus a
    stranger's, offered before the close. Today's tower took it as the best, dropped it on
    the next poll and sent nothing, so the stale close was paid."""
    p = on_both
    cid, salt, block = opened(p)
    genuine = signed(p, cid, 5, 500)
    tower = tower_for(p)
    assert tower.offer_handoff(handoff(p, genuine, salt))
    forged_state = p.state(cid, 10**6, 0)
    forged = SignedState(forged_state, sign_digest(p.ev.private_key, forged_state.digest()),
                         p.other.sign_digest(forged_state.digest()))
    assert not tower.offer_handoff(handoff(p, forged, salt, by=p.ev))   # a party relays it
    assert not tower.offer(forged)
    assert tower.best[cid] == genuine
    assert tower.counters["handoff-refused-wrong-signer"] == 1
    assert tower.counters["state-invalid-wrong-signer"] == 1
    service = WatchtowerService(p.client(p.other), tower, from_block=block,
                                sources=[lambda: [forged, genuine]])
    p.client(p.ev).close(*_args(signed(p, cid, 1, 100)))
    assert len(service.poll_once()) == 1
    assert p.client(p.ev).record(cid).nonce == 5


def test_a_co_signed_state_the_contract_refuses_does_not_hide_a_valid_one(
        parties: Parties) -> None:
    """Both parties signed an overdraft at nonce 9 (a bug, a deposit that never came): the
    tower keeps it, but challenges with the highest state the deposits accept."""
    p = parties
    cid, salt, block = opened(p, 1000)
    tower = tower_for(p)
    for s in (signed(p, cid, 6, 600), signed(p, cid, 9, 5000)):
        assert tower.offer_handoff(handoff(p, s, salt))
    p.client(p.ev).close(*_args(signed(p, cid, 2, 100)))
    assert len(WatchtowerService(p.client(p.other), tower).poll_once()) == 1
    assert p.client(p.ev).record(cid).nonce == 6
    assert tower.counters["state-invalid-balance-out-of-range"] == 1


@pytest.mark.parametrize("attack,reason", [
    ("stranger", "handoff-not-a-party"), ("wrong-salt", "handoff-wrong-channel"),
    ("signed-by-other", "wrong-signer"), ("foreign-chain", "state-foreign"),
    ("tampered-state", "wrong-signer"), ("huge-nonce", "nonce-out-of-range"),
])
def test_hand_offs_come_only_from_the_channels_parties(parties: Parties, attack: str,
                                                       reason: str) -> None:
    p = parties
    cid, salt, _ = opened(p)
    genuine = signed(p, cid, 4, 400)
    h = handoff(p, genuine, salt)
    if attack == "stranger":
        h = handoff(p, genuine, salt, by=p.other)
    elif attack == "wrong-salt":
        h = dataclasses.replace(h, salt=os.urandom(32))
    elif attack == "signed-by-other":
        h = dataclasses.replace(h, sig=handoff(p, genuine, salt, by=p.ev).sig)
    elif attack == "foreign-chain":
        h = Handoff.make(SignedState(dataclasses.replace(genuine.state, chain_id=999),
                                     genuine.sig_ev, genuine.sig_cs),
                         p.ev.address, p.cs.address, salt, p.cs)
    elif attack == "tampered-state":
        h = Handoff.make(SignedState(dataclasses.replace(genuine.state, t_ev=1),
                                     genuine.sig_ev, genuine.sig_cs),
                         p.ev.address, p.cs.address, salt, p.cs)
    else:
        h = handoff(p, signed(p, cid, 2**64, 400), salt)
    tower = tower_for(p)
    assert not tower.offer_handoff(h)
    assert tower.counters[f"handoff-refused-{reason}"] == 1 and not tower.best
    assert tower.offer_handoff(handoff(p, genuine, salt))   # the genuine one still goes in


def test_hand_off_decoding_refuses_hostile_bytes() -> None:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from agent.errors import DecodeError, MalformedEnvelope

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=600))
    def run(data: bytes) -> None:
        try:
            Handoff.decode(data)
        except (DecodeError, MalformedEnvelope):
            pass

    run()


# --- the store survives a crash ------------------------------------------------------------

def test_the_tower_store_survives_a_crash_and_a_torn_write(parties: Parties,
                                                         tmp_path: Path) -> None:
    p = parties
    cid, salt, _ = opened(p)
    path = tmp_path / "tower.store"
    store = TowerStore(path)
    tower = tower_for(p, store=store)
    assert tower.offer_handoff(handoff(p, signed(p, cid, 3, 300), salt))
    assert tower.offer_handoff(handoff(p, signed(p, cid, 7, 700), salt))
    store.close()                                          # kill -9 here loses nothing
    with open(path, "ab") as f:
        f.write(b"\x00\x00\x01\x00garbage")                # a torn last frame
    again = tower_for(p, store=TowerStore(path))
    assert [s.state.nonce for s in again.held(cid)] == [7, 3]
    again.forget(cid)
    assert tower_for(p, store=TowerStore(path)).best == {}
    assert path.stat().st_mode & 0o777 == 0o600
    data = bytearray(path.read_bytes())
    data[10] ^= 0xFF                                       # corruption in the middle
    path.write_bytes(bytes(data) + path.read_bytes())
    with pytest.raises(SpoolError):
        TowerStore(path)


# --- a tower that wakes late (issue 14, 5) -------------------------------------------------

def test_the_tower_challenges_at_once_and_warns_under_its_margin(on_both: Parties) -> None:
    p = on_both
    cid, salt, block = opened(p, window=120)
    events: list[object] = []
    tower = tower_for(p, margin_s=100)
    tower.offer_handoff(handoff(p, signed(p, cid, 5, 500), salt))
    service = WatchtowerService(p.client(p.other), tower, from_block=block,
                                on_event=events.append)
    p.client(p.ev).close(*_args(signed(p, cid, 1, 100)))
    p.chain.advance_time(50)          # the tower was asleep: 70 s of 120 left, margin 100
    assert len(service.poll_once()) == 1
    kinds = [type(e) for e in events]
    assert kinds == [Challenge, WindowWarning]
    warning = events[1]
    assert isinstance(warning, WindowWarning) and 0 < warning.remaining_s < 100
    assert tower.counters["window-margin"] == 1
    assert p.client(p.ev).record(cid).nonce == 5


def test_core_reports_a_missed_window(parties: Parties) -> None:
    p = parties
    tower = tower_for(p)
    cid = b"\x07" * 32
    tower.learn(cid, p.ev.address, p.cs.address)
    tower.offer(signed(p, cid, 4, 40))
    record = ChannelRecord(p.ev.address, p.cs.address, 1000, 0, WINDOW, 200, 2)
    assert tower.observe(cid, dataclasses.replace(record, deadline=0, nonce=0), 100) == []
    assert tower.observe(cid, dataclasses.replace(record, nonce=4), 100) == []
    assert [type(e) for e in tower.observe(cid, record, 200)] == [Challenge, WindowWarning]
    assert [type(e) for e in tower.observe(cid, record, 201)] == [WindowMissed]
    assert tower.counters["window-missed"] == 1


def test_core_keeps_only_its_chain_and_contract_and_the_best_few(parties: Parties) -> None:
    p = parties
    tower = tower_for(p, keep=2)
    cid = b"\x07" * 32
    tower.learn(cid, p.ev.address, p.cs.address)
    assert tower.offer(signed(p, cid, 4, 40))
    assert not tower.offer(signed(p, cid, 4, 40))                    # a duplicate
    assert tower.offer(signed(p, cid, 6, 60)) and tower.offer(signed(p, cid, 5, 50))
    assert not tower.offer(signed(p, cid, 2, 20))                    # below the best two
    foreign = signed(p, cid, 9, 90)
    foreign = SignedState(dataclasses.replace(foreign.state, chain_id=999), foreign.sig_ev,
                          foreign.sig_cs)
    assert not tower.offer(foreign)
    assert [s.state.nonce for s in tower.held(cid)] == [6, 5]
    assert tower.counters["state-foreign"] == 1 and tower.counters["state-not-newer"] == 2


def _args(s: SignedState) -> tuple[object, bytes, bytes]:
    return s.state, s.sig_ev, s.sig_cs
