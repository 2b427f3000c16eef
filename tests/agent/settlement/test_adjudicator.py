"""Reference adjudicator vs the contract on generated traces (DESIGN s6: "both must agree").

Each trace is a random sequence of open / deposit / cooperative close / close / challenge /
settle / wait calls by the EV, the station or an outsider, on two channels, with honest and
forged states (high s, wrong signer, foreign chain / contract / channel, bad v, balances out
of range). Every call goes to the contract on eth-tester (a real transaction with fixed gas,
so the decision is made in the block it lands in) and to the reference with that block's
timestamp. After every step: same accept/reject, same stored channel hash, same token
balances. Each trace starts from the same chain snapshot.
"""

from __future__ import annotations

import dataclasses
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from web3 import Web3

from agent.channel.state import ChannelState, derive_channel_id, sign_digest
from agent.errors import SettlementError
from agent.keys import SettlementKey
from agent.settlement.adjudicator import Adjudicator, Rejected, balances
from agent.settlement.chain import DEFAULT_MAX_WINDOW_S, InProcessChain
from agent.settlement.model import ChannelRecord

from .conftest import TOKENS, Parties, Raw, fund_party

SALTS = (b"\x01" * 32, b"\x02" * 32)
SETTLED = (1).to_bytes(32, "big")
GAS = 400_000
VARIANTS = ("good",) * 14 + ("high-s", "wrong-signer", "ev-only", "foreign-chain",
                             "foreign-contract", "foreign-channel", "bad-v")

BAD = ("high-s", "wrong-signer", "ev-only", "foreign-chain", "foreign-contract",
       "foreign-channel", "bad-v", "overdraw-ev", "overdraw-cs")
EDGES = (1000, 1500, 1501, 2**255, 2**256 - 1)


def make_trace(rnd: random.Random) -> list[tuple]:  # type: ignore[type-arg]
    """An honest session (open, deposit, a few co-signed states) and then a random mix of
    dispute moves on it: honest or forged states of any nonce, by anyone, at any time.

    Drawn from a hypothesis-seeded Random so the mix is uniform (hypothesis's own choices
    favour the first, "simplest" branch) and every example replays from its seed."""
    dep_ev, dep_cs = rnd.choice([0, 300, 1000, 1000]), rnd.choice([0, 500, 500])
    window = rnd.choice([5, 40])
    trace: list[tuple] = [("open", "ev", 0, window, dep_ev)]  # type: ignore[type-arg]
    if dep_cs:
        trace.append(("deposit", "cs", 0, dep_cs))
    t_ev = t_cs = 0
    states = [(0, 0, 0)]
    for nonce in range(1, rnd.randint(1, 6)):
        t_ev += rnd.randint(0, dep_ev // 5)
        t_cs += rnd.choice([0, 0, rnd.randint(0, dep_cs // 5)])
        states.append((nonce, t_ev, t_cs))

    def who() -> str:
        return rnd.choice(["ev", "cs", "ev", "cs", "other"])

    def salt() -> int:
        return rnd.choice([0] * 7 + [1])

    def state() -> tuple[str, int, int, int]:
        nonce, a, b = rnd.choice(states)
        variant = rnd.choice(BAD) if rnd.random() < 0.25 else "good"
        if rnd.random() < 0.1:
            a, b = rnd.choice(EDGES + (a,)), rnd.choice(EDGES + (b,))
        return variant, nonce, a, b

    def anything() -> tuple:  # type: ignore[type-arg]
        return rnd.choice([
            lambda: ("close", who(), salt(), state()),
            lambda: ("challenge", who(), salt(), state()),
            lambda: ("coopClose", who(), salt(), state()),
            lambda: ("settle", who(), salt()),
            lambda: ("wait", rnd.choice([1, 3, 10, 30, 45])),
            lambda: ("deposit", who(), salt(), rnd.choice([0, 7, 400, TOKENS + 1])),
            lambda: ("open", who(), salt(), rnd.choice([0, 1, 40, DEFAULT_MAX_WINDOW_S,
                                                        DEFAULT_MAX_WINDOW_S + 1]),
                     rnd.choice([0, 9, TOKENS + 1])),
        ])()

    # A session's shape: a few moves, usually a close, a dispute, time passing, a settle,
    # and then anything (which must all be rejected or harmless).
    trace += [anything() for _ in range(rnd.randint(0, 2))]
    if rnd.random() < 0.85:
        trace.append(("close", rnd.choice(["ev", "cs"]), 0, state()))
    for _ in range(rnd.randint(0, 3)):
        trace.append(rnd.choice([("challenge", who(), 0, state())] * 3
                                + [("wait", rnd.randint(1, window)),
                                   ("coopClose", who(), 0, state())]))
    trace.append(("wait", rnd.choice([1, window - 1, window, window + 1, window + 9])))
    if rnd.random() < 0.9:
        trace.append(("settle", who(), 0))
    trace += [anything() for _ in range(rnd.randint(0, 2))]
    return trace


class Setup:
    """One chain for the module; every trace starts from ``snapshot``."""

    def __init__(self) -> None:
        chain = InProcessChain.start(min_window_s=1)
        keys = [SettlementKey.generate() for _ in range(3)]
        for key in keys:
            fund_party(chain, key)
        chain.advance_time(10**6)  # past wall-clock time: block timestamps are parent + 1
        self.p = Parties(chain, *keys)
        self.keys = {"ev": keys[0], "cs": keys[1], "other": keys[2]}
        self.raw = {name: Raw(chain.w3, chain.contract, key) for name, key in self.keys.items()}
        self.channel = self.p.client(keys[0]).contract
        self.token = self.p.client(keys[0]).token
        self.caller = {"from": Web3.to_checksum_address(keys[0].address)}  # skips a lookup
        self.tokens = {a: self.balance(a) for a in [k.address for k in keys] + [chain.contract]}
        self.snapshot = chain.snapshot()

    def balance(self, address: bytes) -> int:
        return self.token.functions.balanceOf(Web3.to_checksum_address(address)).call(
            self.caller)


@pytest.fixture(scope="module")
def setup() -> Setup:
    return Setup()


class Trace:
    def __init__(self, setup: Setup) -> None:
        p = self.p = setup.p
        self.setup, self.keys = setup, setup.keys
        self.ref = Adjudicator(p.chain.chain_id, p.chain.contract, 1, DEFAULT_MAX_WINDOW_S,
                               tokens=dict(setup.tokens))
        self.ids = [derive_channel_id(p.chain.chain_id, p.chain.contract, p.ev.address,
                                      p.cs.address, s) for s in SALTS]

    def signed(self, cid: bytes, variant: str, nonce: int, t_ev: int, t_cs: int,
               final: bool) -> tuple[ChannelState, bytes, bytes]:
        p = self.p
        state = p.state(cid, nonce, t_ev, t_cs, wh=nonce * 10, final=final)
        signed = state
        if variant == "foreign-chain":
            signed = dataclasses.replace(state, chain_id=state.chain_id + 1)
        elif variant == "foreign-contract":
            signed = dataclasses.replace(state, contract=b"\x42" * 20)
        elif variant == "foreign-channel":
            signed = dataclasses.replace(state, channel_id=self.ids[1 - self.ids.index(cid)])
        sig_ev = sign_digest(p.ev.private_key, signed.digest())
        sig_cs = sign_digest(p.cs.private_key, signed.digest())
        if variant == "high-s":
            s = int.from_bytes(sig_cs[32:64], "big")
            n = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
            sig_cs = sig_cs[:32] + (n - s).to_bytes(32, "big") + bytes([55 - sig_cs[64]])
        elif variant == "wrong-signer":
            sig_ev = sign_digest(p.other.private_key, signed.digest())
        elif variant == "ev-only":
            sig_cs = sig_ev
        elif variant == "bad-v":
            sig_ev = sig_ev[:64] + bytes([sig_ev[64] - 27])
        return state, sig_ev, sig_cs

    def forge_amounts(self, cid: bytes, variant: str, t_ev: int, t_cs: int) -> tuple[int, int]:
        """The "overdraw" variants: honestly co-signed, but paying out more than was deposited."""
        record = self.ref.channels.get(cid)
        dep_ev, dep_cs = (record.dep_ev, record.dep_cs) if record else (0, 0)
        top = 2**256 - 1  # near the top the forgery may add up again: the rules decide
        if variant == "overdraw-ev":
            return min(dep_ev + t_cs + 1, top), t_cs
        if variant == "overdraw-cs":
            return t_ev, min(dep_cs + t_ev + 1, top)
        return t_ev, t_cs

    def record(self, cid: bytes) -> ChannelRecord:
        """The reference's record (the contract rejects any other), or a dummy one."""
        return self.ref.channels.get(cid) or ChannelRecord(self.p.ev.address, self.p.cs.address,
                                                           0, 0, 1)

    def step(self, op: tuple) -> str:  # type: ignore[type-arg]
        if op[0] == "wait":
            self.p.chain.advance_time(op[1])
            return "wait"
        name, actor, salt_index = op[0], self.keys[op[1]], op[2]
        cid = self.ids[salt_index]
        now = self.p.chain.w3.eth.get_block("pending")["timestamp"]
        raw = self.setup.raw[op[1]]
        if name == "open":
            window, amount = op[3], op[4]
            args: tuple = (self.p.ev.address, self.p.cs.address, SALTS[salt_index], window,
                           amount)
            ref = lambda: self.ref.open(actor.address, *args, now=now)  # noqa: E731
        elif name == "deposit":
            args = (cid, self.record(cid), op[3])
            ref = lambda: self.ref.deposit(actor.address, cid, op[3], now)  # noqa: E731
        elif name == "settle":
            args = (cid, self.record(cid))
            ref = lambda: self.ref.settle(actor.address, cid, now)  # noqa: E731
        else:
            variant, nonce, t_ev, t_cs = op[3]
            t_ev, t_cs = self.forge_amounts(cid, variant, t_ev, t_cs)
            state, sig_ev, sig_cs = self.signed(cid, variant, nonce, t_ev, t_cs,
                                                final=name == "coopClose")
            args = (cid, self.record(cid), state, sig_ev, sig_cs)
            method = {"coopClose": self.ref.coop_close, "close": self.ref.close,
                      "challenge": self.ref.challenge}[name]
            ref = lambda: method(actor.address, cid, state, sig_ev, sig_cs, now)  # noqa: E731
        try:
            ref()
            expected = "ok"
        except Rejected as exc:
            expected = f"rejected ({exc.why})"
        try:
            data = raw.abi.encode_abi(name, args=[_abi(a) for a in args])
            tx = raw.sender.transact(self.p.chain.contract, bytes.fromhex(data[2:]), name,
                                     gas=GAS)
            got = "ok"
            assert tx.block_timestamp == now
        except SettlementError as exc:
            assert exc.reason == "reverted", exc
            got = "reverted"
        assert (expected == "ok") == (got == "ok"), f"{op}: reference {expected}, contract {got}"
        self.compare(balances=got == "ok")
        return f"{name}:{got}"

    def compare(self, balances: bool = True) -> None:
        """The channel's three storage slots always; token balances when something may have
        moved."""
        for cid in self.ids:
            stored = tuple(self.setup.channel.functions.read(cid).call(self.setup.caller))
            if cid not in self.ref.channels:
                assert stored == (bytes(32), 0, 0)
            elif self.ref.channels[cid] is None:
                assert stored == (SETTLED, 0, 0)
            else:
                r = self.ref.channels[cid]
                assert stored == (r.terms_hash(), r.packed_deposits(), r.packed_closing())
        if balances:
            for address, amount in self.ref.tokens.items():
                assert self.setup.balance(address) == amount


def _abi(value: object) -> object:
    from .conftest import _abi as convert
    return convert(value)


@pytest.mark.parametrize("examples", [
    120, pytest.param(2000, marks=pytest.mark.slow, id="2000-slow")])
def test_contract_and_reference_agree_on_generated_traces(setup: Setup, examples: int) -> None:
    p, snapshot = setup.p, setup.snapshot
    seen: dict[str, int] = {}
    traces = 0

    @settings(max_examples=examples, deadline=None, derandomize=examples <= 120, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(st.randoms(use_true_random=True).map(make_trace))
    def run(trace: list[tuple]) -> None:  # type: ignore[type-arg]
        nonlocal traces
        p.chain.revert(snapshot)
        runner = Trace(setup)
        for op in trace:
            outcome = runner.step(op)
            seen[outcome] = seen.get(outcome, 0) + 1
        traces += 1

    run()
    p.chain.revert(snapshot)
    assert traces >= examples
    # The traces must reach the interesting outcomes, not only rejections.
    for outcome in ("coopClose:ok", "close:ok", "challenge:ok", "settle:ok", "deposit:ok",
                    "coopClose:reverted", "challenge:reverted", "settle:reverted"):
        assert seen.get(outcome, 0) > 0, (outcome, seen)
    print(traces, "traces;", sorted(seen.items()))


def test_reference_balances_rule() -> None:
    record = ChannelRecord(b"\x01" * 20, b"\x02" * 20, 1000, 500, 10)
    assert balances(record, 300, 100) == (800, 700)
    assert balances(record, 1600, 600) == (0, 1500)
    with pytest.raises(Rejected):
        balances(record, 1001, 0)
    with pytest.raises(Rejected):
        balances(record, 0, 501)


def test_reference_rejects_what_the_contract_rejects_in_order() -> None:
    ev, cs = SettlementKey.generate(), SettlementKey.generate()
    ref = Adjudicator(1, b"\x09" * 20, 1, 100, tokens={ev.address: 100, cs.address: 100})
    with pytest.raises(Rejected, match="window"):
        ref.open(ev.address, ev.address, cs.address, bytes(32), 0, 10, now=0)
    cid = ref.open(ev.address, ev.address, cs.address, bytes(32), 10, 60, now=0)
    with pytest.raises(Rejected, match="channel id used"):
        ref.open(cs.address, ev.address, cs.address, bytes(32), 10, 0, now=0)
    ref.close(cs.address, cid, ChannelState(1, b"\x09" * 20, cid, 0, 0, 0, 0), b"", b"", 5)
    with pytest.raises(Rejected, match="window"):
        ref.settle(ev.address, cid, 15)
    assert ref.settle(ev.address, cid, 16) == (60, 0)
    assert ref.tokens[ev.address] == 100 and ref.tokens[ref.contract] == 0
    with pytest.raises(Rejected, match="record"):
        ref.settle(ev.address, cid, 17)
    assert Web3.to_checksum_address(ev.address)  # addresses are plain 20-byte values
