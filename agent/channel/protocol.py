"""The payment channel protocol, both roles, as a sans-I/O state machine (DESIGN s5).

No asyncio, sockets, files or clocks: time is the ``now`` argument (seconds, monotonic), wall
time for the tariff is the meter reading's ``ts_s``. Every entry point returns a list of
actions and events, executed by the driver IN ORDER:

- ``Persist(record)``: write durably before anything after it happens (agent/channel/store.py);
- ``Send(data)``: publish one message to the peer;
- events (``Opened``, ``Funded``, ``Paid``, ``Closed``, ``Rejected`` ...): for the application.

Verbs: ``receive(data, now)``, station ``open/meter/close``, vehicle ``funded/estimate/close``,
``reestablish(now)`` after a (re)connect or restart, ``get_timer()`` / ``handle_timer(now)``.
A restarted party is rebuilt with ``restore(records)`` from what it persisted.

Rules (each enforced here, each violation a distinct reason code, see REASONS):

1. Single proposer: the vehicle proposes every state (PAY, and the final state in CLOSE); the
   station countersigns (ACK, CLOSED). One proposer means two parties never race for one
   nonce. The station still controls what it pays (V2G, ``t_cs``): it countersigns only
   amounts equal to a METER it signed itself.
2. A state pays exactly one METER: ``t_ev = charge_milli // 1000``, ``t_cs =
   credit_milli // 1000``, ``wh = import_wh`` (rounding rule in records.MeterInfo).
3. Nonces: a party signs a nonce at most once (the vehicle persists each signed proposal, the
   station each co-signed state, before the signature leaves). Nonces only grow; a proposal
   the station rejected is abandoned and the next one takes the next nonce.
4. ``t_ev``, ``t_cs``, ``wh`` never decrease; derived balances stay within the deposits.
5. Credit window: the station allows delivery only while metered import minus the ``wh`` of
   the latest co-signed state is below ``credit_window_wh`` (events DeliveryPaused/Resumed).
6. The vehicle pays only for a METER whose import is within tolerance of its own estimate
   (when it has one) and whose charge is within the signed tariff; otherwise it withholds
   payment and tells the station (REJECT energy-mismatch / meter-charge-mismatch).
7. QoS 1 is at-least-once: duplicates are answered idempotently (re-ACK), stale messages are
   counted and dropped, lost messages are retransmitted on the timer.

Errors from peer input never escape ``receive``: they become a ``Rejected`` event, a counter
(``counters[reason]``) and, for authenticated content that breaks a rule, a REJECT message.
Calling a verb in the wrong phase raises LocalProtocolError.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from agent.channel import messages as m
from agent.channel.messages import Domain, MsgType, Tariff
from agent.channel.records import (
    CosignedRecord,
    FundedRecord,
    MeterInfo,
    MeterRecord,
    OpenParams,
    OpenRecord,
    Party,
    Record,
    SignedRecord,
)
from agent.channel.state import (
    ChannelState,
    check_balances,
    check_state_signature,
    derive_channel_id,
    recover_signer,
)
from agent.errors import BadSignature, ChannelError, EdgeAgentError, LocalProtocolError

RTO_INITIAL_S = 0.2
RTO_MAX_S = 2.0
KEEP_METERS = 256


class IdentitySigner(Protocol):  # agent.keys.IdentityKey
    kid: bytes
    public: bytes

    def sign(self, message: bytes) -> bytes: ...


class SettlementSigner(Protocol):  # agent.keys.SettlementKey
    address: bytes

    def sign_digest(self, digest: bytes) -> bytes: ...


class Role(enum.Enum):
    VEHICLE = "ev"
    STATION = "cs"


class Phase(enum.Enum):
    IDLE = "idle"          # station: before open(); vehicle: waiting for OPEN
    OPENING = "opening"    # OPEN sent / accepted, waiting for the vehicle's funding
    ACTIVE = "active"      # METER / PAY / ACK
    CLOSING = "closing"    # final METER sent / close requested, final state pending
    CLOSED = "closed"      # final state co-signed


# --------------------------------------------------------------------- actions and events


@dataclass(frozen=True, slots=True)
class Persist:
    record: Record


@dataclass(frozen=True, slots=True)
class Send:
    msg_type: MsgType
    data: bytes


@dataclass(frozen=True, slots=True)
class Opened:
    params: OpenParams


@dataclass(frozen=True, slots=True)
class Funded:
    reference: bytes


@dataclass(frozen=True, slots=True)
class MeterAccepted:
    meter: MeterInfo


@dataclass(frozen=True, slots=True)
class Paid:
    state: ChannelState


@dataclass(frozen=True, slots=True)
class DeliveryPaused:
    unpaid_wh: int


@dataclass(frozen=True, slots=True)
class DeliveryResumed:
    unpaid_wh: int


@dataclass(frozen=True, slots=True)
class PaymentWithheld:
    reason: str
    counter: int


@dataclass(frozen=True, slots=True)
class CloseRequested:
    pass


@dataclass(frozen=True, slots=True)
class Closed:
    """The final co-signed state: what the caller settles on the ledger."""

    state: ChannelState
    sig_ev: bytes
    sig_cs: bytes


@dataclass(frozen=True, slots=True)
class Rejected:
    """We rejected peer input (counted in ``counters[reason]``)."""

    reason: str
    msg_type: MsgType | None
    detail: str


@dataclass(frozen=True, slots=True)
class PeerRejected:
    reason: str
    nonce: int | None
    last_cosigned: int


Action = (Persist | Send | Opened | Funded | MeterAccepted | Paid | DeliveryPaused
          | DeliveryResumed | PaymentWithheld | CloseRequested | Closed | Rejected | PeerRejected)


# ---------------------------------------------------------------------- transition table

_ANY = tuple(Phase)
_LIVE = (Phase.OPENING, Phase.ACTIVE, Phase.CLOSING, Phase.CLOSED)
# (role, message received, phases in which it is legal, handler). Anything else is
# "unexpected-message". The table is data: docs/channel.md and the tests iterate it.
TRANSITION_SPEC: tuple[tuple[Role, MsgType, tuple[Phase, ...], str], ...] = (
    (Role.STATION, MsgType.FUNDED, (Phase.OPENING,), "_on_funded"),
    (Role.STATION, MsgType.FUNDED, (Phase.ACTIVE, Phase.CLOSING, Phase.CLOSED), "_on_duplicate"),
    (Role.STATION, MsgType.PAY, (Phase.ACTIVE, Phase.CLOSING, Phase.CLOSED), "_on_pay"),
    (Role.STATION, MsgType.CLOSE, (Phase.ACTIVE, Phase.CLOSING, Phase.CLOSED), "_on_close"),
    (Role.STATION, MsgType.REJECT, _ANY, "_on_reject"),
    (Role.STATION, MsgType.REESTABLISH, _LIVE, "_on_reestablish"),
    (Role.VEHICLE, MsgType.OPEN, _ANY, "_on_open"),
    (Role.VEHICLE, MsgType.METER, (Phase.ACTIVE, Phase.CLOSING), "_on_meter"),
    (Role.VEHICLE, MsgType.METER, (Phase.CLOSED,), "_on_duplicate"),
    (Role.VEHICLE, MsgType.ACK, (Phase.ACTIVE, Phase.CLOSING, Phase.CLOSED), "_on_ack"),
    (Role.VEHICLE, MsgType.CLOSED, (Phase.ACTIVE, Phase.CLOSING, Phase.CLOSED), "_on_closed"),
    (Role.VEHICLE, MsgType.REJECT, _ANY, "_on_reject"),
    (Role.VEHICLE, MsgType.REESTABLISH, _LIVE, "_on_reestablish"),
)
TRANSITIONS: dict[tuple[Role, Phase, MsgType], str] = {
    (role, phase, msg): handler
    for role, msg, phases, handler in TRANSITION_SPEC for phase in phases}

# Every reason code a rejection can carry, with what it means (docs are generated from this).
REASONS: dict[str, str] = {
    "malformed-cbor": "not well-formed CBOR",
    "non-deterministic-cbor": "CBOR that is not in RFC 8949 s4.2 deterministic form",
    "duplicate-map-key": "a CBOR map repeats a key",
    "oversize": "message larger or deeper than accepted",
    "malformed-message": "fields missing or of the wrong type",
    "unknown-message-type": "message type not in the protocol",
    "malformed-state": "the embedded state is not a valid ChannelState",
    "state-version": "unknown ChannelState version",
    "malformed-tariff": "the tariff in OPEN does not decode",
    "wrong-channel": "message or state for another channel",
    "wrong-chain": "state for another chain id",
    "wrong-contract": "state for another settlement contract",
    "unknown-key": "transport signature by a key that is not the peer's",
    "bad-signature": "transport signature does not verify",
    "signature-for-other-type": "transport signature made for another message type",
    "bad-tariff-signature": "tariff not signed by the station",
    "malleated-signature": "secp256k1 signature with high s (EIP-2) or r/s out of range",
    "wrong-signer": "secp256k1 state signature by another key",
    "bad-sig-length": "secp256k1 signature not 65 bytes",
    "bad-sig-v": "secp256k1 signature v not 27/28",
    "unexpected-message": "message not allowed in this phase (transition table)",
    "replayed-state": "a state with a nonce at or below the latest co-signed one",
    "unexpected-final": "final flag set outside CLOSE",
    "not-final": "CLOSE carries a state without the final flag",
    "unknown-meter": "state pays a METER counter the station did not sign",
    "amount-mismatch": "state amounts differ from the METER it pays",
    "amount-decreased": "t_ev, t_cs or wh lower than in the latest co-signed state",
    "balance-out-of-range": "derived balances leave the deposits",
    "unknown-nonce": "ACK/CLOSED for a nonce we did not propose",
    "tariff-changed": "tariff differs from the one signed at OPEN",
    "open-mismatch": "OPEN parameters differ from ours",
    "tariff-too-expensive": "tariff above the vehicle's limit",
    "deposit-too-large": "OPEN asks for more deposit than the vehicle allows",
    "stale-meter": "METER older than one already accepted",
    "meter-equivocation": "two different METERs with one counter",
    "meter-decreased": "cumulative energy or charge went down",
    "meter-time-backwards": "METER timestamp older than the previous one",
    "meter-charge-mismatch": "METER charge not within energy x signed tariff",
    "energy-mismatch": "metered energy beyond the vehicle's estimate plus tolerance",
    "conflicting-state": "peer holds another co-signed state with our nonce",
}


# ------------------------------------------------------------------------------ the core


def _check_signer(digest: bytes, signature: bytes, address: bytes) -> None:
    """state.check_state_signature with the digest computed once by the caller."""
    if recover_signer(digest, signature) != address:
        raise BadSignature("state signed by another key", reason="wrong-signer")


class Channel:
    """Shared machinery: decoding, authentication, dispatch, counters, co-signed state."""

    role: Role

    def __init__(self, identity: IdentitySigner, settlement: SettlementSigner, peer: Party,
                 chain_id: int, contract: bytes, salt: bytes) -> None:
        self.identity, self.settlement, self.peer = identity, settlement, peer
        self.chain_id, self.contract, self.salt = chain_id, contract, salt
        self.params: OpenParams | None = None
        self.phase = Phase.IDLE
        self.cosigned: CosignedRecord | None = None
        self.counters: Counter[str] = Counter()
        self.duplicates = 0
        self._deadline: float | None = None
        self._rto = RTO_INITIAL_S
        self.funding_ref = b""
        self._domain = Domain(chain_id, contract, self.channel_id)

    # ---- identity of the channel

    def _parties(self) -> tuple[Party, Party]:
        me = Party(self.identity.public, self.settlement.address)
        return (me, self.peer) if self.role is Role.VEHICLE else (self.peer, me)

    @property
    def channel_id(self) -> bytes:
        ev, cs = self._parties()
        return derive_channel_id(self.chain_id, self.contract, ev.address, cs.address, self.salt)

    @property
    def domain(self) -> Domain:
        return self._domain

    @property
    def nonce(self) -> int:
        """Nonce of the latest co-signed state (0: none yet)."""
        return self.cosigned.state.nonce if self.cosigned else 0

    # ---- verbs

    def receive(self, data: bytes, now: float) -> list[Action]:
        """One message from the peer. Never raises for bad input: see module doc."""
        msg_type: MsgType | None = None
        try:
            wire = m.decode(data)
            msg_type = wire.msg_type
            if wire.channel_id != self._domain.channel_id:
                raise ChannelError("message for another channel", reason="wrong-channel")
            m.authenticate(wire, self._domain, self.peer.identity)
        except EdgeAgentError as exc:
            return self._reject(exc, msg_type, reply=False)
        handler = TRANSITIONS.get((self.role, self.phase, wire.msg_type))
        if handler is None:
            exc = ChannelError(f"{wire.msg_type.name} in phase {self.phase.value}",
                               reason="unexpected-message")
            return self._reject(exc, wire.msg_type, reply=False)
        try:
            return getattr(self, handler)(wire.body, now)
        except EdgeAgentError as exc:  # authenticated peer broke a rule: tell it why
            return self._reject(exc, wire.msg_type, reply=exc.reason not in _SILENT)

    def get_timer(self) -> float | None:
        return self._deadline

    def handle_timer(self, now: float) -> list[Action]:
        if self._deadline is None or now < self._deadline:
            return []
        actions = self._retransmit(now)
        self._rto = min(self._rto * 2, RTO_MAX_S)
        self._deadline = now + self._rto if actions else None
        return actions

    def reestablish(self, now: float) -> list[Action]:
        """After a (re)connect or a restart: tell the peer our latest co-signed state and
        resend whatever is outstanding."""
        if self.phase is Phase.IDLE:
            return []
        self._rto = RTO_INITIAL_S
        out: list[Action] = [self._send(MsgType.REESTABLISH, self._reestablish_body())]
        out += self._retransmit(now)
        self._deadline = now + self._rto if len(out) > 1 else self._deadline
        return out

    # ---- shared handlers

    def _on_duplicate(self, body: dict[int, object], now: float) -> list[Action]:
        self.duplicates += 1
        return []

    def _on_reject(self, body: dict[int, object], now: float) -> list[Action]:
        reason = m.field(body, 0, str)
        rejected = m.field(body, 1, int, optional=True)
        last = m.field(body, 2, int)
        self.counters[f"peer:{reason}"] += 1
        out: list[Action] = [PeerRejected(reason, rejected, last)]  # type: ignore[arg-type]
        return out + self._peer_rejected(rejected)  # type: ignore[arg-type]

    def _peer_rejected(self, nonce: int | None) -> list[Action]:
        return []

    def _on_reestablish(self, body: dict[int, object], now: float) -> list[Action]:
        peer_nonce = m.field(body, 0, int)
        out: list[Action] = []
        if body.get(1) is not None:
            state = ChannelState.from_cbor_item(body[1])
            sig_ev = m.field(body, 2, bytes)
            sig_cs = m.field(body, 3, bytes)
            if state.nonce != peer_nonce:
                raise ChannelError("REESTABLISH nonce and state disagree",
                                   reason="malformed-message")
            if state.nonce == self.nonce and self.cosigned and self.cosigned.state != state:
                raise ChannelError("peer holds another state with our nonce",
                                   reason="conflicting-state", nonce=state.nonce)
            if state.nonce > self.nonce:
                self._check_state_domain(state)
                ev, cs = self._parties()
                check_state_signature(state, sig_ev, ev.address)  # type: ignore[arg-type]
                check_state_signature(state, sig_cs, cs.address)  # type: ignore[arg-type]
                out += self._adopt(CosignedRecord(state, sig_ev, sig_cs))  # type: ignore[arg-type]
        if peer_nonce < self.nonce:
            out.append(self._send(MsgType.REESTABLISH, self._reestablish_body()))
        out += self._retransmit(now)
        return out

    def _reestablish_body(self) -> dict[int, object]:
        c = self.cosigned
        if c is None:
            return {0: 0, 1: None, 2: None, 3: None}
        return {0: c.state.nonce, 1: c.state.to_cbor_item(), 2: c.sig_ev, 3: c.sig_cs}

    # ---- helpers

    def _adopt(self, record: CosignedRecord) -> list[Action]:
        """Take a co-signed state as the latest (persisted before anything acts on it)."""
        self.cosigned = record
        out: list[Action] = [Persist(record)]
        if record.state.final:
            self.phase = Phase.CLOSED
            self._deadline = None
            out.append(Closed(record.state, record.sig_ev, record.sig_cs))
        else:
            out.append(Paid(record.state))
        return out

    def _check_state_domain(self, state: ChannelState) -> None:
        if state.chain_id != self.chain_id:
            raise ChannelError("state for another chain", reason="wrong-chain", nonce=state.nonce)
        if state.contract != self.contract:
            raise ChannelError("state for another contract", reason="wrong-contract",
                               nonce=state.nonce)
        if state.channel_id != self._domain.channel_id:
            raise ChannelError("state for another channel", reason="wrong-channel",
                               nonce=state.nonce)

    def _check_progress(self, state: ChannelState) -> None:
        """Rule 4: monotone amounts, balances within the deposits."""
        assert self.params is not None
        if self.cosigned is not None:
            old = self.cosigned.state
            if state.t_ev < old.t_ev or state.t_cs < old.t_cs or state.wh < old.wh:
                raise ChannelError("amounts lower than the latest co-signed state",
                                   reason="amount-decreased", nonce=state.nonce)
        check_balances(state, self.params.deposit_ev, self.params.deposit_cs)

    def _send(self, msg_type: MsgType, body: dict[int, object]) -> Send:
        return Send(msg_type, m.encode(self._domain, msg_type, body, self.identity))

    def _reject(self, exc: EdgeAgentError, msg_type: MsgType | None, *,
                reply: bool) -> list[Action]:
        reason = exc.reason
        self.counters[reason] += 1
        out: list[Action] = [Rejected(reason, msg_type, str(exc))]
        if reply and self.phase is not Phase.IDLE:
            nonce = getattr(exc, "nonce", None)
            out.append(self._send(MsgType.REJECT, {0: reason, 1: nonce, 2: self.nonce}))
        return out

    def _arm(self, now: float) -> None:
        self._rto = RTO_INITIAL_S
        self._deadline = now + self._rto

    def _retransmit(self, now: float) -> list[Action]:
        raise NotImplementedError


# Rejections not answered with a REJECT: stale input is normal under QoS 1 reordering, and
# answering it would only add noise.
_SILENT = frozenset({"replayed-state", "stale-meter", "unknown-nonce"})


# ------------------------------------------------------------------------------- station


class StationChannel(Channel):
    """The charging station: opens the channel, meters, countersigns."""

    role = Role.STATION

    def __init__(self, identity: IdentitySigner, settlement: SettlementSigner, vehicle: Party, *,
                 chain_id: int, contract: bytes, salt: bytes, tariff: Tariff, tariff_sig: bytes,
                 deposit_ev: int, deposit_cs: int, dispute_window_s: int,
                 credit_window_wh: int, pay_step_wh: int) -> None:
        super().__init__(identity, settlement, vehicle, chain_id, contract, salt)
        ev, cs = self._parties()
        self.params = OpenParams(chain_id, contract, salt, ev, cs, deposit_ev, deposit_cs,
                                 dispute_window_s, tariff, tariff_sig, credit_window_wh,
                                 pay_step_wh)
        self.tariff_id = tariff.tariff_id()
        self.meters: dict[int, MeterInfo] = {}
        self.last_meter: MeterInfo | None = None
        self.base: tuple[int, int] | None = None
        self.import_wh = self.export_wh = self.charge_milli = self.credit_milli = 0
        self.ts_s = 0
        self.delivering = False
        self.funding_ref = b""

    @property
    def paid_wh(self) -> int:
        return self.cosigned.state.wh if self.cosigned else 0

    @property
    def unpaid_wh(self) -> int:
        return self.import_wh - self.paid_wh

    @property
    def headroom_wh(self) -> int:
        """Energy the charger may still deliver before the credit window is exhausted."""
        if self.phase is not Phase.ACTIVE:
            return 0
        assert self.params is not None
        return max(0, self.params.credit_window_wh - self.unpaid_wh)

    # ---- verbs

    def open(self, now: float) -> list[Action]:
        if self.phase is not Phase.IDLE:
            raise LocalProtocolError("open() twice", reason="already-open")
        assert self.params is not None
        self.phase = Phase.OPENING
        self._arm(now)
        return [Persist(OpenRecord(self.params)), self._send(MsgType.OPEN, self.params.to_body())]

    def meter(self, import_wh: int, export_wh: int, ts_s: int, now: float) -> list[Action]:
        """A cumulative meter reading (raw register values, Wh). Accounts the energy since
        the previous reading at the tariff in force at ``ts_s`` and sends a METER every
        ``pay_step_wh``."""
        if self.phase in (Phase.CLOSING, Phase.CLOSED):
            self.counters["meter-ignored"] += 1
            return []
        if self.base is None:
            self.base = (import_wh, export_wh)
        imp, exp = import_wh - self.base[0], export_wh - self.base[1]
        if imp < self.import_wh or exp < self.export_wh or ts_s < self.ts_s:
            self.counters["meter-decreased"] += 1
            return [Rejected("meter-decreased", None, "local meter went backwards")]
        assert self.params is not None
        tariff = self.params.tariff
        self.charge_milli += (imp - self.import_wh) * tariff.price_at(ts_s)
        self.credit_milli += (exp - self.export_wh) * tariff.export_price_per_kwh
        self.import_wh, self.export_wh, self.ts_s = imp, exp, ts_s
        out: list[Action] = []
        if self.phase is Phase.ACTIVE:
            last = self.last_meter
            step = self.params.pay_step_wh
            if (last is None and (imp or exp)) or (last is not None and (
                    imp - last.import_wh >= step or exp - last.export_wh >= step)):
                out += self._send_meter(now, final=False)
        return out + self._window_events()

    def close(self, now: float) -> list[Action]:
        """Stop delivery and send the final METER; the vehicle answers with the final state."""
        if self.phase is not Phase.ACTIVE:
            raise LocalProtocolError(f"close() in phase {self.phase.value}", reason="not-active")
        out = self._send_meter(now, final=True)
        self.phase = Phase.CLOSING
        return out + self._window_events()

    # ---- handlers

    def _on_funded(self, body: dict[int, object], now: float) -> list[Action]:
        self.funding_ref = m.field(body, 0, bytes)  # type: ignore[assignment]
        self.phase = Phase.ACTIVE
        self._deadline = None
        out: list[Action] = [Persist(FundedRecord(self.funding_ref)), Funded(self.funding_ref)]
        return out + self._window_events()

    def _on_pay(self, body: dict[int, object], now: float) -> list[Action]:
        state, sig_ev, digest = self._proposal(body, final=False)
        if state is None:
            return self._duplicate_answer(MsgType.ACK)
        sig_cs = self.settlement.sign_digest(digest)
        out = self._adopt(CosignedRecord(state, sig_ev, sig_cs))
        out.append(self._send(MsgType.ACK, {0: state.nonce, 1: sig_cs}))
        if not self._retransmit(now):
            self._deadline = None
        return out + self._window_events()

    def _on_close(self, body: dict[int, object], now: float) -> list[Action]:
        if body.get(0) is None:
            if self.phase is Phase.ACTIVE:
                return [CloseRequested(), *self.close(now)]
            if self.phase is Phase.CLOSED:
                return self._duplicate_answer(MsgType.CLOSED)
            self.duplicates += 1
            return self._retransmit(now)
        state, sig_ev, digest = self._proposal(body, final=True)
        if state is None:
            return self._duplicate_answer(MsgType.CLOSED)
        sig_cs = self.settlement.sign_digest(digest)
        out = self._adopt(CosignedRecord(state, sig_ev, sig_cs))
        out.append(self._send(MsgType.CLOSED, {0: state.nonce, 1: sig_cs}))
        return out

    def _proposal(self, body: dict[int, object], *, final: bool
                  ) -> tuple[ChannelState | None, bytes, bytes]:
        """Validate a PAY / final CLOSE. (None, ...) for an exact duplicate of the latest."""
        state = ChannelState.from_cbor_item(body.get(0))
        sig_ev: bytes = m.field(body, 1, bytes)  # type: ignore[assignment]
        counter: int = m.field(body, 2, int)  # type: ignore[assignment]
        self._check_state_domain(state)
        if state.nonce <= self.nonce:
            if self.cosigned is not None and state == self.cosigned.state:
                return None, sig_ev, b""
            raise ChannelError("state older than the latest co-signed one",
                               reason="replayed-state", nonce=state.nonce)
        if state.final != final:
            raise ChannelError("final flag does not match the message",
                               reason="not-final" if final else "unexpected-final",
                               nonce=state.nonce)
        meter = self.meters.get(counter)
        if meter is None or (final and not meter.final):
            raise ChannelError(f"no signed METER {counter} to pay", reason="unknown-meter",
                               nonce=state.nonce)
        if (state.t_ev, state.t_cs, state.wh) != (meter.t_ev, meter.t_cs, meter.import_wh):
            raise ChannelError("amounts differ from the METER", reason="amount-mismatch",
                               nonce=state.nonce)
        self._check_progress(state)
        digest = state.digest()
        _check_signer(digest, sig_ev, self.peer.address)
        return state, sig_ev, digest

    def _duplicate_answer(self, msg_type: MsgType) -> list[Action]:
        self.duplicates += 1
        assert self.cosigned is not None
        return [self._send(msg_type, {0: self.cosigned.state.nonce, 1: self.cosigned.sig_cs})]

    # ---- internals

    def _send_meter(self, now: float, *, final: bool) -> list[Action]:
        counter = (self.last_meter.counter + 1) if self.last_meter else 1
        info = MeterInfo(counter, self.import_wh, self.export_wh, self.ts_s, self.charge_milli,
                         self.credit_milli, self.tariff_id, final)
        self._remember(info)
        assert self.base is not None or not (self.import_wh or self.export_wh)
        base = self.base or (0, 0)
        self._arm(now)
        return [Persist(MeterRecord(info, base[0], base[1])),
                self._send(MsgType.METER, info.to_body())]

    def _remember(self, info: MeterInfo) -> None:
        self.meters[info.counter] = info
        self.last_meter = info
        if len(self.meters) > KEEP_METERS:
            del self.meters[min(self.meters)]

    def _window_events(self) -> list[Action]:
        allowed = self.headroom_wh > 0
        if allowed == self.delivering:
            return []
        self.delivering = allowed
        return [DeliveryResumed(self.unpaid_wh) if allowed else DeliveryPaused(self.unpaid_wh)]

    def _retransmit(self, now: float) -> list[Action]:
        assert self.params is not None
        if self.phase is Phase.OPENING:
            return [self._send(MsgType.OPEN, self.params.to_body())]
        last = self.last_meter
        if self.phase in (Phase.ACTIVE, Phase.CLOSING) and last is not None and (
                last.final or last.import_wh > self.paid_wh):
            return [self._send(MsgType.METER, last.to_body())]
        return []

    # ---- restart

    @classmethod
    def restore(cls, records: Iterable[Record], **kwargs: object) -> StationChannel:
        """Rebuild from the store; ``kwargs`` are the constructor's (same config)."""
        ch = cls(**kwargs)  # type: ignore[arg-type]
        for record in records:
            if isinstance(record, OpenRecord):
                ch.params = record.params
                ch.phase = Phase.OPENING
            elif isinstance(record, FundedRecord):
                ch.phase, ch.funding_ref = Phase.ACTIVE, record.reference
            elif isinstance(record, MeterRecord):
                info = record.meter
                ch._remember(info)
                ch.base = (record.base_import, record.base_export)
                ch.import_wh, ch.export_wh, ch.ts_s = info.import_wh, info.export_wh, info.ts_s
                ch.charge_milli, ch.credit_milli = info.charge_milli, info.credit_milli
                if info.final:
                    ch.phase = Phase.CLOSING
            elif isinstance(record, CosignedRecord):
                if record.state.nonce > ch.nonce:
                    ch.cosigned = record
                    if record.state.final:
                        ch.phase = Phase.CLOSED
        ch.delivering = ch.headroom_wh > 0
        return ch


# ------------------------------------------------------------------------------- vehicle


class VehicleChannel(Channel):
    """The vehicle: checks OPEN and METERs, proposes (and signs first) every state."""

    role = Role.VEHICLE

    def __init__(self, identity: IdentitySigner, settlement: SettlementSigner, station: Party, *,
                 chain_id: int, contract: bytes, salt: bytes, max_price_per_kwh: int,
                 max_deposit_ev: int, tolerance_wh: int = 50, tolerance_ppm: int = 20_000,
                 window: int = 1) -> None:
        super().__init__(identity, settlement, station, chain_id, contract, salt)
        self.max_price_per_kwh, self.max_deposit_ev = max_price_per_kwh, max_deposit_ev
        self.tolerance_wh, self.tolerance_ppm = tolerance_wh, tolerance_ppm
        if window < 1:
            raise ValueError("window must be at least 1")
        self.window = window  # proposals in flight at most (1: stop-and-wait)
        self.estimate_wh: int | None = None
        self.meter_seen: MeterInfo | None = None
        self.signed: dict[int, SignedRecord] = {}   # our proposals above the co-signed nonce
        self.highest_signed = 0
        self.abandoned: set[int] = set()
        self.withheld: int | None = None            # METER counter we refused to pay
        self.paid_counter = 0                       # highest METER counter we proposed for
        self._digests: dict[int, bytes] = {}        # EIP-712 digests of our live proposals
        self.close_wanted = False

    # ---- verbs

    def funded(self, reference: bytes, now: float) -> list[Action]:
        """The funding step is done: tell the station (FUNDED)."""
        if self.phase is not Phase.OPENING:
            raise LocalProtocolError(f"funded() in phase {self.phase.value}",
                                     reason="not-opening")
        self.phase = Phase.ACTIVE
        self.funding_ref = reference
        return [Persist(FundedRecord(reference)), self._send(MsgType.FUNDED, {0: reference})]

    def estimate(self, delivered_wh: int, now: float) -> list[Action]:
        """The vehicle's own cumulative estimate of energy received (Wh since the start)."""
        self.estimate_wh = delivered_wh
        return self._maybe_pay(now)

    def close(self, now: float) -> list[Action]:
        """Ask the station to stop and send its final METER."""
        if self.phase is not Phase.ACTIVE:
            raise LocalProtocolError(f"close() in phase {self.phase.value}", reason="not-active")
        self.phase = Phase.CLOSING
        self.close_wanted = True
        self._arm(now)
        return [self._send(MsgType.CLOSE, {0: None, 1: None, 2: None})]

    def _live(self) -> list[int]:
        return [n for n in self.signed if n > self.nonce and n not in self.abandoned]

    @property
    def pending(self) -> SignedRecord | None:
        """Our highest proposal not yet co-signed (a co-signed higher nonce supersedes
        lower ones, so retransmitting this one is enough)."""
        live = self._live()
        return self.signed[max(live)] if live else None

    # ---- handlers

    def _on_open(self, body: dict[int, object], now: float) -> list[Action]:
        params = OpenParams.from_body(body)
        if self.params is not None:
            if params == self.params:
                self.duplicates += 1
                if self.phase is Phase.OPENING:
                    return []
                return [self._send(MsgType.FUNDED, {0: self.funding_ref})]
            reason = "tariff-changed" if params.tariff != self.params.tariff else "open-mismatch"
            raise ChannelError("OPEN differs from the accepted one", reason=reason)
        ev, cs = self._parties()
        if params.chain_id != self.chain_id:
            raise ChannelError("OPEN for another chain", reason="wrong-chain")
        if params.contract != self.contract:
            raise ChannelError("OPEN for another contract", reason="wrong-contract")
        if (params.ev, params.cs, params.salt) != (ev, cs, self.salt):
            raise ChannelError("OPEN names other parties or salt", reason="open-mismatch")
        m.check_tariff(params.tariff, params.tariff_sig, cs.identity)
        highest = max([params.tariff.price_per_kwh] + [p for _, p in params.tariff.tou])
        if highest > self.max_price_per_kwh:
            raise ChannelError("tariff above our limit", reason="tariff-too-expensive")
        if params.deposit_ev > self.max_deposit_ev:
            raise ChannelError("deposit above our limit", reason="deposit-too-large")
        self.params = params
        self.phase = Phase.OPENING
        return [Persist(OpenRecord(params)), Opened(params)]

    def _on_meter(self, body: dict[int, object], now: float) -> list[Action]:
        info = MeterInfo.from_body(body)
        assert self.params is not None
        if info.tariff_id != self.params.tariff.tariff_id():
            raise ChannelError("METER under another tariff", reason="tariff-changed")
        seen = self.meter_seen
        if seen is not None:
            if info.counter < seen.counter:
                raise ChannelError("METER older than the last one", reason="stale-meter")
            if info.counter == seen.counter:
                if info != seen:
                    raise ChannelError("two METERs with one counter",
                                       reason="meter-equivocation")
                self.duplicates += 1
                return self._maybe_pay(now)
        self._check_meter(seen, info)
        self.meter_seen = info
        return [MeterAccepted(info), *self._maybe_pay(now)]

    def _check_meter(self, seen: MeterInfo | None, info: MeterInfo) -> None:
        assert self.params is not None
        base_imp = seen.import_wh if seen else 0
        base_exp = seen.export_wh if seen else 0
        base_charge = seen.charge_milli if seen else 0
        base_credit = seen.credit_milli if seen else 0
        if (info.import_wh < base_imp or info.export_wh < base_exp
                or info.charge_milli < base_charge or info.credit_milli < base_credit):
            raise ChannelError("cumulative values went down", reason="meter-decreased")
        tariff = self.params.tariff
        if seen is not None:
            if info.ts_s < seen.ts_s:
                raise ChannelError("METER time went backwards", reason="meter-time-backwards")
            low, high = tariff.price_range(seen.ts_s, info.ts_s)
        else:
            low, high = tariff.price_range(0, 86_400)
        d_imp = info.import_wh - base_imp
        d_charge = info.charge_milli - base_charge
        d_credit = info.credit_milli - base_credit
        if not d_imp * low <= d_charge <= d_imp * high or (
                d_credit != (info.export_wh - base_exp) * tariff.export_price_per_kwh):
            raise ChannelError("METER charge does not follow the signed tariff",
                               reason="meter-charge-mismatch")

    def _on_ack(self, body: dict[int, object], now: float) -> list[Action]:
        return self._on_countersigned(body, now, final=False)

    def _on_closed(self, body: dict[int, object], now: float) -> list[Action]:
        return self._on_countersigned(body, now, final=True)

    def _on_countersigned(self, body: dict[int, object], now: float, *,
                          final: bool) -> list[Action]:
        nonce: int = m.field(body, 0, int)  # type: ignore[assignment]
        sig_cs: bytes = m.field(body, 1, bytes)  # type: ignore[assignment]
        if nonce <= self.nonce:
            self.duplicates += 1
            return []
        proposal = self.signed.get(nonce)
        if proposal is None or proposal.state.final != final:
            raise ChannelError(f"countersignature for nonce {nonce} we did not propose",
                               reason="unknown-nonce", nonce=nonce)
        digest = self._digests.pop(nonce, None) or proposal.state.digest()
        _check_signer(digest, sig_cs, self.peer.address)
        out = self._adopt(CosignedRecord(proposal.state, proposal.sig, sig_cs))
        self._deadline = (now + self._rto) if self._live() else None
        return out + self._maybe_pay(now)

    def _adopt(self, record: CosignedRecord) -> list[Action]:
        out = super()._adopt(record)
        nonce = record.state.nonce
        self.signed = {n: r for n, r in self.signed.items() if n > nonce}
        self.abandoned = {n for n in self.abandoned if n > nonce}
        return out

    def _peer_rejected(self, nonce: int | None) -> list[Action]:
        if nonce is not None and nonce in self.signed:
            self.abandoned.add(nonce)
            if self.pending is None:
                self._deadline = None
        return []

    # ---- paying

    def _maybe_pay(self, now: float) -> list[Action]:
        meter = self.meter_seen
        if (self.phase not in (Phase.ACTIVE, Phase.CLOSING) or meter is None
                or len(self._live()) >= self.window):
            return []
        if meter.counter <= self.paid_counter:
            return []
        cos = self.cosigned.state if self.cosigned else None
        if not meter.final and (meter.t_ev, meter.t_cs, meter.import_wh) == (
                (cos.t_ev, cos.t_cs, cos.wh) if cos else (0, 0, 0)):
            return []  # nothing new to pay for
        if self.estimate_wh is not None:
            allowed = self.estimate_wh + self.tolerance_wh + \
                meter.import_wh * self.tolerance_ppm // 1_000_000
            if meter.import_wh > allowed:
                if self.withheld == meter.counter:
                    return []
                self.withheld = meter.counter
                self.counters["energy-mismatch"] += 1
                return [PaymentWithheld("energy-mismatch", meter.counter),
                        self._send(MsgType.REJECT, {0: "energy-mismatch", 1: None,
                                                    2: self.nonce})]
        return self._propose(meter, now)

    def _propose(self, meter: MeterInfo, now: float) -> list[Action]:
        assert self.params is not None
        nonce = max(self.highest_signed, self.nonce) + 1
        state = ChannelState(self.chain_id, self.contract, self._domain.channel_id, nonce,
                             meter.t_ev, meter.t_cs, meter.import_wh, meter.final)
        try:
            self._check_progress(state)
        except ChannelError as exc:
            self.counters[exc.reason] += 1
            return [PaymentWithheld(exc.reason, meter.counter)]
        digest = state.digest()
        sig = self.settlement.sign_digest(digest)
        record = SignedRecord(state, sig, meter)
        self._digests[nonce] = digest
        if len(self._digests) > 4 * self.window + 8:
            del self._digests[min(self._digests)]
        self.signed[nonce] = record
        self.highest_signed = nonce
        self.paid_counter = meter.counter
        if meter.final:
            self.phase = Phase.CLOSING
        self._arm(now)
        return [Persist(record), self._proposal_message(record)]

    def _proposal_message(self, record: SignedRecord) -> Send:
        kind = MsgType.CLOSE if record.state.final else MsgType.PAY
        return self._send(kind, {0: record.state.to_cbor_item(), 1: record.sig,
                                 2: record.meter.counter})

    def _retransmit(self, now: float) -> list[Action]:
        if self.phase is Phase.OPENING or self.phase is Phase.IDLE:
            return []
        pending = self.pending
        if pending is not None:
            return [self._proposal_message(pending)]
        if self.phase is Phase.CLOSING and self.close_wanted and self.cosigned and \
                not self.cosigned.state.final:
            return [self._send(MsgType.CLOSE, {0: None, 1: None, 2: None})]
        return []

    # ---- restart

    @classmethod
    def restore(cls, records: Iterable[Record], **kwargs: object) -> VehicleChannel:
        ch = cls(**kwargs)  # type: ignore[arg-type]
        ch.funding_ref = b""
        for record in records:
            if isinstance(record, OpenRecord):
                ch.params, ch.phase = record.params, Phase.OPENING
            elif isinstance(record, FundedRecord):
                ch.phase, ch.funding_ref = Phase.ACTIVE, record.reference
            elif isinstance(record, SignedRecord):
                ch.signed[record.state.nonce] = record
                ch.highest_signed = max(ch.highest_signed, record.state.nonce)
                ch.paid_counter = max(ch.paid_counter, record.meter.counter)
                if ch.meter_seen is None or record.meter.counter > ch.meter_seen.counter:
                    ch.meter_seen = record.meter
                if record.state.final:
                    ch.phase = Phase.CLOSING
            elif isinstance(record, CosignedRecord):
                if record.state.nonce > ch.nonce:
                    ch.cosigned = record
                    if record.state.final:
                        ch.phase = Phase.CLOSED
        ch.signed = {n: r for n, r in ch.signed.items() if n > ch.nonce}
        return ch
