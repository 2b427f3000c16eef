"""The contract (eth-tester) and the reference adjudicator side by side, driven by a
Hypothesis state machine with an adversary (issue 14, 8).

One channel: the vehicle (the adversary, helped by an outsider) and the station (honest).
While the channel is open the two co-sign states of growing nonce; the adversary may close
on any of them, challenge with any of them, front-run the station's challenge with one of
them (the station's transaction was made before, so it carries what the station saw then),
drop dust deposits ahead of anything, let time pass and settle. The station challenges with
its latest co-signed state when the rules say so.

After every call: the same accept/reject decision, the same three storage slots, the same
token balances. At settlement: if the station put its latest state on chain in time, its
payout is at least what that state gives it, whatever the adversary did and in what order.
"""

from __future__ import annotations

import functools
from collections import Counter

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from agent.channel.state import ChannelState
from agent.errors import SettlementError
from agent.settlement.adjudicator import Adjudicator, Rejected, balances
from agent.settlement.chain import DEFAULT_MAX_WINDOW_S
from agent.settlement.model import ChannelRecord

from .conftest import _abi
from .test_adjudicator import SALTS, SETTLED, Setup

GAS = 600_000
WINDOW = 40
SEEN: Counter[str] = Counter()   # what the runs reached (the test checks it is not trivial)


@functools.cache
def chain() -> Setup:
    return Setup()


class Adversarial(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        s = self.s = chain()
        s.p.chain.revert(s.snapshot)
        s.snapshot = s.p.chain.snapshot()   # eth-tester snapshots are used once
        p = s.p
        self.ref = Adjudicator(p.chain.chain_id, p.chain.contract, 1, DEFAULT_MAX_WINDOW_S,
                               tokens=dict(s.tokens))
        self.states: list[tuple[ChannelState, bytes, bytes]] = []
        self.cid = b""
        self.honest_in_time = False
        self.settled_payout: tuple[int, int] | None = None

    # ---- plumbing: one call on both -------------------------------------------------------

    def now(self) -> int:
        return int(self.s.p.chain.w3.eth.get_block("pending")["timestamp"])

    def data(self, fn: str, *args: object) -> bytes:
        raw = self.s.raw["ev"]
        return bytes.fromhex(raw.abi.encode_abi(fn, args=[_abi(a) for a in args])[2:])

    def call(self, who: str, fn: str, data: bytes, ref: object) -> bool:
        """``data`` to the contract from ``who``; ``ref(now)`` to the reference; both must
        agree. Returns whether the call went through."""
        now = self.now()
        try:
            out = ref(now)  # type: ignore[operator]
            expected = True
        except Rejected:
            out, expected = None, False
        try:
            tx = self.s.raw[who].sender.transact(self.s.p.chain.contract, data, fn, gas=GAS)
            assert tx.block_timestamp == now
            got = True
        except SettlementError as exc:
            assert exc.reason == "reverted", exc
            got = False
        assert expected == got, f"{fn} by {who}: reference {expected}, contract {got}"
        SEEN[f"{fn}:{'ok' if got else 'reverted'}"] += 1
        if got and fn in ("settle", "coopClose"):
            self.settled_payout = out  # type: ignore[assignment]
        return got

    def record(self) -> ChannelRecord:
        return self.ref.channels.get(self.cid) or ChannelRecord(
            self.s.p.ev.address, self.s.p.cs.address, 0, 0, WINDOW)

    # ---- the session ------------------------------------------------------------------------

    @initialize(dep_ev=st.sampled_from([300, 1000]), dep_cs=st.sampled_from([0, 500]))
    def open(self, dep_ev: int, dep_cs: int) -> None:
        p = self.s.p
        args = (p.ev.address, p.cs.address, SALTS[0], WINDOW, dep_ev)
        assert self.call("ev", "open", self.data("open", *args),
                         lambda now: self.ref.open(p.ev.address, *args, now=now))
        self.cid = next(iter(self.ref.channels))
        if dep_cs:
            self.deposit("cs", dep_cs)

    def closing(self) -> bool:
        r = self.ref.channels.get(self.cid)
        return r is not None and r.deadline != 0

    def is_open(self) -> bool:
        r = self.ref.channels.get(self.cid)
        return r is not None and r.deadline == 0

    @precondition(lambda self: self.is_open())
    @rule(pay=st.integers(0, 120), back=st.integers(0, 40))
    def cosign(self, pay: int, back: int) -> None:
        """The honest session goes on: one more co-signed state."""
        last = self.states[-1][0] if self.states else None
        t_ev = (last.t_ev if last else 0) + pay
        t_cs = (last.t_cs if last else 0) + back
        try:
            balances(self.record(), t_ev, t_cs)
        except Rejected:
            return  # the station never signs beyond the deposits
        state = self.s.p.state(self.cid, len(self.states) + 1, t_ev, t_cs, wh=t_ev)
        self.states.append((state, *self.s.p.sigs(state)))

    def state_call(self, who: str, fn: str, index: int) -> bool:
        state, sig_ev, sig_cs = self.states[index % len(self.states)]
        method = {"close": self.ref.close, "challenge": self.ref.challenge}[fn]
        sender = self.s.keys[who].address
        return self.call(who, fn, self.data(fn, self.cid, self.record(), state, sig_ev, sig_cs),
                         lambda now: method(sender, self.cid, state, sig_ev, sig_cs, now))

    @precondition(lambda self: self.states and self.is_open())
    @rule(index=st.integers(0, 50))
    def adversary_closes(self, index: int) -> None:
        self.state_call("ev", "close", index)

    @precondition(lambda self: self.states)
    @rule(who=st.sampled_from(["ev", "other"]), index=st.integers(0, 50))
    def adversary_challenges(self, who: str, index: int) -> None:
        self.state_call(who, "challenge", index)

    @precondition(lambda self: self.states and self.closing())
    @rule(index=st.integers(0, 50), dust=st.booleans())
    def station_challenges_behind_a_front_runner(self, index: int, dust: bool) -> None:
        """The station makes its challenge with its latest state; before it lands the
        adversary lands a state of its choice (and maybe a dust deposit)."""
        latest, sig_ev, sig_cs = self.states[-1]
        honest = self.data("challenge", self.cid, self.record(), latest, sig_ev, sig_cs)
        self.state_call("ev", "challenge", index)
        if dust:
            self.deposit("ev", 1)
        cs = self.s.p.cs.address
        before = self.ref.channels[self.cid]
        window_open = before is not None and self.now() <= before.deadline
        ok = self.call("cs", "challenge", honest, lambda now: self.ref.challenge(
            cs, self.cid, latest, sig_ev, sig_cs, now))
        record = self.ref.channels[self.cid]
        if window_open:   # in time: it landed, or the chain already held this nonce
            assert ok or (record is not None and record.nonce >= latest.nonce)
            self.honest_in_time = True

    @precondition(lambda self: self.ref.channels.get(self.cid) is not None)
    @rule(who=st.sampled_from(["ev", "cs"]), amount=st.sampled_from([1, 7, 400]))
    def deposit(self, who: str, amount: int) -> None:
        sender = self.s.keys[who].address
        self.call(who, "deposit", self.data("deposit", self.cid, self.record(), amount),
                  lambda now: self.ref.deposit(sender, self.cid, amount, now))

    @rule(seconds=st.sampled_from([1, 5, 20, WINDOW]))
    def wait(self, seconds: int) -> None:
        self.s.p.chain.advance_time(seconds)

    @precondition(lambda self: self.closing())
    @rule(who=st.sampled_from(["ev", "cs", "other"]))
    def settle(self, who: str) -> None:
        record = self.ref.channels[self.cid]
        assert record is not None
        sender = self.s.keys[who].address
        if not self.call(who, "settle", self.data("settle", self.cid, record),
                         lambda now: self.ref.settle(sender, self.cid, now)):
            return
        if self.honest_in_time:
            latest = self.states[-1][0]
            _, owed = balances(record, latest.t_ev, latest.t_cs)
            assert self.settled_payout is not None and self.settled_payout[1] >= owed, (
                f"station paid {self.settled_payout}, its latest state gives it {owed}")
            SEEN["settled-after-an-honest-challenge"] += 1

    # ---- after every step ---------------------------------------------------------------

    @invariant()
    def same_slots_and_balances(self) -> None:
        if not self.cid:
            return
        stored = tuple(self.s.channel.functions.read(self.cid).call(self.s.caller))
        r = self.ref.channels[self.cid]
        if r is None:
            assert stored == (SETTLED, 0, 0)
        else:
            assert stored == (r.terms_hash(), r.packed_deposits(), r.packed_closing())
        for address, amount in self.ref.tokens.items():
            assert self.s.balance(address) == amount


def _run(examples: int, steps: int) -> None:
    machine = settings(max_examples=examples, stateful_step_count=steps, deadline=None,
                       database=None, derandomize=examples <= 30,
                       suppress_health_check=[HealthCheck.too_slow])(Adversarial)
    SEEN.clear()
    machine.TestCase().runTest()
    for outcome in ("settled-after-an-honest-challenge", "challenge:ok", "challenge:reverted",
                    "close:ok", "deposit:ok", "deposit:reverted", "settle:ok"):
        assert SEEN[outcome] > 0, (outcome, SEEN)


def test_contract_and_reference_agree_under_an_adversary() -> None:
    _run(examples=25, steps=30)


@pytest.mark.slow
def test_contract_and_reference_agree_under_an_adversary_slow() -> None:
    _run(examples=200, steps=50)
