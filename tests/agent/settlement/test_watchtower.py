"""A watchtower beats a stale close (DESIGN s6), and its core refuses what it must."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from agent.settlement.model import ChannelRecord, SignedState, Status
from agent.settlement.watchtower import Watchtower, WatchtowerService, states_from_dir

from .conftest import TOKENS, Parties, new_salt

WINDOW = 60


def signed(p: Parties, cid: bytes, nonce: int, t_ev: int, t_cs: int = 0) -> SignedState:
    state = p.state(cid, nonce, t_ev, t_cs)
    return SignedState(state, *p.sigs(state))


def test_watchtower_beats_a_stale_close(parties: Parties, tmp_path: Path) -> None:
    p = parties
    ev = p.client(p.ev)
    opened = ev.open_channel(p.ev.address, p.cs.address, new_salt(), WINDOW, 1000)
    cid = opened.channel_id
    p.client(p.cs).deposit(cid, 200)
    session = [signed(p, cid, n, 150 * n) for n in range(1, 6)]     # the EV paid 750
    # The station delegates its latest state to the tower (a file it drops in a directory).
    (tmp_path / "latest.state").write_bytes(session[-1].encode())
    (tmp_path / "garbage.state").write_bytes(b"\xa1\x01")          # hostile input: skipped
    tower = Watchtower(p.chain.chain_id, p.chain.contract)
    service = WatchtowerService(p.client(p.other), tower, from_block=opened.tx.block_number,
                                sources=[states_from_dir(tmp_path)])
    assert service.poll_once() == []                                 # nothing to do yet
    # The EV cheats: closes with nonce 1 (it had paid only 150 then).
    stale = session[0]
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


def test_the_tower_catches_a_close_that_happened_before_the_state_arrived(
        parties: Parties) -> None:
    p = parties
    ev = p.client(p.ev)
    opened = ev.open_channel(p.ev.address, p.cs.address, new_salt(), WINDOW, 1000)
    cid = opened.channel_id
    stale = signed(p, cid, 1, 10)
    ev.close(stale.state, stale.sig_ev, stale.sig_cs)
    tower = Watchtower(p.chain.chain_id, p.chain.contract)
    service = WatchtowerService(p.client(p.other), tower, from_block=opened.tx.block_number)
    service.poll_once()                    # sees the close, holds nothing
    tower.offer(signed(p, cid, 3, 300))
    assert len(service.poll_once()) == 1   # re-checks held channels outside the new logs
    assert ev.record(cid).nonce == 3


def record(p: Parties, **kw: int) -> ChannelRecord:
    base = ChannelRecord(p.ev.address, p.cs.address, 1000, 0, WINDOW)
    return dataclasses.replace(base, **kw)


def test_core_keeps_only_newer_states_of_its_chain_and_contract(parties: Parties) -> None:
    p = parties
    tower = Watchtower(p.chain.chain_id, p.chain.contract)
    cid = b"\x07" * 32
    assert tower.offer(signed(p, cid, 4, 40))
    assert not tower.offer(signed(p, cid, 4, 40)) and not tower.offer(signed(p, cid, 2, 20))
    foreign = signed(p, cid, 9, 90)
    foreign = SignedState(dataclasses.replace(foreign.state, chain_id=999), foreign.sig_ev,
                          foreign.sig_cs)
    assert not tower.offer(foreign)
    assert tower.best[cid].state.nonce == 4
    assert tower.counters["state-foreign"] == 1 and tower.counters["state-not-newer"] == 2


def test_core_decisions(parties: Parties) -> None:
    p = parties
    tower = Watchtower(p.chain.chain_id, p.chain.contract)
    cid = b"\x07" * 32
    tower.offer(signed(p, cid, 4, 40))
    assert tower.observe(cid, record(p), now=100) is None                       # open
    assert tower.observe(cid, record(p, deadline=200, nonce=4), 100) is None    # not stale
    action = tower.observe(cid, record(p, deadline=200, nonce=2), 200)
    assert action is not None and action.signed.state.nonce == 4
    assert tower.observe(cid, record(p, deadline=200, nonce=2), 201) is None    # too late
    assert tower.counters["window-missed"] == 1
    # A delegated state the contract would refuse (more than deposited) is dropped.
    tower.offer(signed(p, cid, 5, 5000))
    assert tower.observe(cid, record(p, deadline=200, nonce=2), 150) is None
    assert cid not in tower.best and tower.counters["state-invalid-balance-out-of-range"] == 1
