"""Both parties under a hostile network and crashes (hypothesis RuleBasedStateMachine).

The network loses, duplicates and reorders messages; either party may crash before any
of the records a step persists or after the last one (then it is rebuilt from what a sync
made durable, losing unsynced records, and says REESTABLISH, as the session does after a
restart). Invariants (issue 6):

- no two different co-signed states with one nonce, anywhere, ever; no state signature
  that left a party for one nonce differs from another;
- t_ev, t_cs (and wh) never decrease along each party's co-signed history;
- derived balances stay within the deposits;
- the station's unpaid energy never exceeds the credit window (the charger obeys it);
- after the network heals, both sides converge on the same latest co-signed state.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from agent.channel import messages as m
from agent.channel.messages import MsgType
from agent.channel.protocol import Action, Persist, Phase, Send
from agent.channel.records import CosignedRecord, Record
from agent.channel.state import ChannelState, check_balances
from tests.agent.channel.harness import Setup

SIDES = st.sampled_from(["cs", "ev"])
CRASH = st.one_of(st.none(), st.none(), st.integers(0, 2))  # see ChannelMachine.execute
WINDOW_WH = 60


class ChannelMachine(RuleBasedStateMachine):
    @initialize()
    def start(self) -> None:
        self.setup = Setup(credit_window_wh=WINDOW_WH, pay_step_wh=10)
        self.party = {"cs": self.setup.station(), "ev": self.setup.vehicle()}
        self.store: dict[str, list[Record]] = {"cs": [], "ev": []}
        self.durable: dict[str, int] = {"cs": 0, "ev": 0}  # store prefix a sync made durable
        self.inbox: dict[str, list[bytes]] = {"cs": [], "ev": []}
        self.history: dict[str, list[ChannelState]] = {"cs": [], "ev": []}
        self.cosigned_by_nonce: dict[int, ChannelState] = {}
        self.signed_out: dict[int, ChannelState] = {}
        self.now = 0.0
        self.phys_imp, self.phys_exp = 5_000_000, 70_000
        self.crashes = 0
        self.execute("cs", self.party["cs"].meter(self.phys_imp, self.phys_exp, 1_700_000_000,
                                                  self.now))
        self.execute("cs", self.party["cs"].open(self.now))
        self.deliver_all()
        self.execute("ev", self.party["ev"].funded(b"tx", self.now))
        self.deliver_all()
        assert self.party["cs"].phase is Phase.ACTIVE

    # ---- plumbing

    def execute(self, side: str, actions: list[Action], crash: int | None = None) -> None:
        """Run ``actions`` in order; with ``crash = k`` the party dies just before its
        k-th Persist, or (k = number of persists) after the last one, before anything it
        would have sent next."""
        persists = 0
        for action in actions:
            at_point = isinstance(action, Persist) or (isinstance(action, Send) and persists)
            if crash is not None and persists == crash and at_point:
                self.restart(side)
                return
            if isinstance(action, Persist):
                persists += 1
                self.persist(side, action.record, action.sync)
            elif isinstance(action, Send):
                self.sent(side, action.data)

    def persist(self, side: str, record: Record, sync: bool = True) -> None:
        self.store[side].append(record)
        if sync:  # an fsync makes everything written before it durable too
            self.durable[side] = len(self.store[side])
        if isinstance(record, CosignedRecord):
            state = record.state
            known = self.cosigned_by_nonce.setdefault(state.nonce, state)
            assert known == state, f"two co-signed states with nonce {state.nonce}"
            history = self.history[side]
            if history:
                last = history[-1]
                assert state.nonce > last.nonce
                assert state.t_ev >= last.t_ev and state.t_cs >= last.t_cs
                assert state.wh >= last.wh
            history.append(state)

    def sent(self, side: str, data: bytes) -> None:
        wire = m.decode(data)
        if wire.msg_type in (MsgType.PAY, MsgType.CLOSE) and wire.body.get(0) is not None:
            state = ChannelState.from_cbor_item(wire.body[0])
            known = self.signed_out.setdefault(state.nonce, state)
            assert known == state, f"vehicle signed two states with nonce {state.nonce}"
        self.inbox["ev" if side == "cs" else "cs"].append(data)

    def restart(self, side: str) -> None:
        self.crashes += 1
        # Unsynced records written after the last fsync are lost (the worst case).
        del self.store[side][self.durable[side]:]
        records = list(self.store[side])
        # What the party holds now: a co-signed state lost with its unsynced record may be
        # adopted again (the same state: cosigned_by_nonce checks that).
        self.history[side] = [r.state for r in records if isinstance(r, CosignedRecord)]
        self.party[side] = (self.setup.station(records) if side == "cs"
                            else self.setup.vehicle(records))
        if side == "cs":  # the driver's meter loop reads the meter again at once
            self.execute("cs", self.party["cs"].meter(self.phys_imp, self.phys_exp,
                                                      1_700_000_000, self.now))
        self.execute(side, self.party[side].reestablish(self.now))

    def deliver_all(self, rounds: int = 200) -> None:
        for _ in range(rounds):
            side = "cs" if self.inbox["cs"] else "ev" if self.inbox["ev"] else None
            if side is None:
                return
            data = self.inbox[side].pop(0)
            self.execute(side, self.party[side].receive(data, self.now))
        raise AssertionError("messages never stop flowing")

    # ---- rules

    @rule(wh=st.integers(1, 40), crash=CRASH)
    def meter(self, wh: int, crash: int | None) -> None:
        cs = self.party["cs"]
        delivered = min(wh, cs.headroom_wh)  # the charger obeys the credit window
        self.phys_imp += delivered
        self.execute("cs", cs.meter(self.phys_imp, self.phys_exp, 1_700_000_000, self.now),
                     crash)

    @rule(wh=st.integers(1, 20), crash=CRASH)
    def export(self, wh: int, crash: int | None) -> None:
        cs = self.party["cs"]
        if cs.phase is not Phase.ACTIVE:
            return
        self.phys_exp += wh
        self.execute("cs", cs.meter(self.phys_imp, self.phys_exp, 1_700_000_000, self.now),
                     crash)

    @rule(side=SIDES, index=st.integers(0, 50), crash=CRASH)
    def deliver(self, side: str, index: int, crash: int | None) -> None:
        if self.inbox[side]:
            data = self.inbox[side].pop(index % len(self.inbox[side]))  # reordering
            self.execute(side, self.party[side].receive(data, self.now), crash)

    @rule(count=st.integers(1, 12), wh=st.integers(0, 30), crash=CRASH)
    def charge_and_pump(self, count: int, wh: int, crash: int | None) -> None:
        """Normal operation: meter, then deliver ``count`` messages in order; the crash (if
        any) hits the party handling the last one."""
        self.meter(wh, None)
        for i in range(count):
            side = "cs" if self.inbox["cs"] else "ev" if self.inbox["ev"] else None
            if side is None:
                return
            data = self.inbox[side].pop(0)
            self.execute(side, self.party[side].receive(data, self.now),
                         crash if i == count - 1 else None)

    @rule(side=SIDES, index=st.integers(0, 50))
    def duplicate(self, side: str, index: int) -> None:
        if self.inbox[side]:
            data = self.inbox[side][index % len(self.inbox[side])]
            self.execute(side, self.party[side].receive(data, self.now))

    @rule(side=SIDES, index=st.integers(0, 50))
    def lose(self, side: str, index: int) -> None:
        if self.inbox[side]:
            self.inbox[side].pop(index % len(self.inbox[side]))

    @rule(side=SIDES, crash=CRASH)
    def timer(self, side: str, crash: int | None) -> None:
        self.now += 0.5
        self.execute(side, self.party[side].handle_timer(self.now), crash)

    @rule(side=SIDES)
    def crash_between_steps(self, side: str) -> None:
        self.restart(side)

    @precondition(lambda self: self.party["cs"].phase is Phase.ACTIVE
                  and self.party["cs"].nonce >= 5)
    @rule(crash=CRASH)
    def station_closes(self, crash: int | None) -> None:
        self.execute("cs", self.party["cs"].close(self.now), crash)

    @precondition(lambda self: self.party["ev"].phase is Phase.ACTIVE
                  and self.party["ev"].nonce >= 5)
    @rule()
    def vehicle_closes(self) -> None:
        self.execute("ev", self.party["ev"].close(self.now))

    @rule()
    def heal_and_converge(self) -> None:
        """The network heals: both reconnect (REESTABLISH), timers fire, all is delivered."""
        for side in ("cs", "ev"):
            self.execute(side, self.party[side].reestablish(self.now))
        for _ in range(30):
            self.deliver_all()
            self.now += 3.0
            for side in ("cs", "ev"):
                self.execute(side, self.party[side].handle_timer(self.now))
            if not self.inbox["cs"] and not self.inbox["ev"]:
                break
        self.deliver_all()
        cs, ev = self.party["cs"], self.party["ev"]
        assert cs.nonce == ev.nonce, (cs.nonce, ev.nonce)
        assert cs.cosigned == ev.cosigned
        # Everything metered and signed as METER is paid once the network is healthy.
        if cs.last_meter is not None and not cs.last_meter.final:
            assert cs.paid_wh == cs.last_meter.import_wh

    def teardown(self) -> None:
        if hasattr(self, "party"):
            nonce = self.party["cs"].nonce
            event("co-signed nonce: " + ("0" if nonce == 0 else "1-4" if nonce < 5
                                         else "5-19" if nonce < 20 else "20+"))
            event(f"station phase: {self.party['cs'].phase.value}")
            event(f"crashes: {min(self.crashes, 3)}+")

    # ---- invariants

    @invariant()
    def within_deposits_and_credit_window(self) -> None:
        for side in ("cs", "ev"):
            c = self.party[side].cosigned
            if c is not None:
                check_balances(c.state, self.setup.deposit_ev, self.setup.deposit_cs)
        cs = self.party["cs"]
        assert cs.unpaid_wh <= WINDOW_WH, cs.unpaid_wh
        if cs.base is not None:
            assert (self.phys_imp - cs.base[0]) - cs.paid_wh <= WINDOW_WH


ChannelMachine.TestCase.settings = settings(
    max_examples=300, stateful_step_count=60, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestChannelMachine = ChannelMachine.TestCase


class LongChannelMachine(ChannelMachine):
    """The same machine, many more and longer runs (``pytest -m slow``)."""


LongChannelMachine.TestCase.settings = settings(
    max_examples=3000, stateful_step_count=120, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestLongChannelMachine = pytest.mark.slow(LongChannelMachine.TestCase)
