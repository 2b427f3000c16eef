"""The payment channel protocol, both roles, as a sans-I/O state machine (DESIGN s5).

No asyncio, sockets, files or clocks: time is the ``now`` argument (seconds, monotonic), wall
time for the tariff is the meter reading's ``ts_s``. Every entry point returns a list of
actions and events, executed by the driver IN ORDER:

- ``Persist(record)``: write durably before anything after it happens (agent/channel/store.py);
- ``Send(data)``: publish one message to the peer;
- events (``Opened``, ``Funded``, ``Paid``, ``Closed``, ``Rejected`` ...): for the application.

The roles are agent/channel/station.py (StationChannel) and agent/channel/vehicle.py
(VehicleChannel); this module holds what they share.

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
   Nonces stay at or below state.MAX_NONCE (what the contract stores) by the wire format:
   a CBOR unsigned integer ends at 2**64 - 1 (RFC 8949 s3.1), so a larger one is a
   ``malformed-state``.
5. Credit window: the station allows delivery only while metered import minus the ``wh`` of
   the latest co-signed state is below ``credit_window_wh`` (events DeliveryPaused/Resumed).
6. The vehicle pays only for a METER whose import is within tolerance of its own estimate
   (when it has one) and whose charge is within the signed tariff priced by the vehicle's
   OWN clock: the METER's time must be within ``clock_tolerance_s`` of it, and the charge
   at most the energy times the highest price in force since the previous METER (the
   first: since the vehicle accepted OPEN); otherwise it withholds payment and tells the
   station (REJECT energy-mismatch / meter-charge-mismatch / meter-clock-mismatch).
7. QoS 1 is at-least-once: duplicates are answered idempotently (re-ACK), stale messages are
   counted and dropped, lost messages are retransmitted on the timer.

Errors from peer input never escape ``receive``: they become a ``Rejected`` event, a counter
(``counters[reason]``) and, for authenticated content that breaks a rule, a REJECT message.
Calling a verb in the wrong phase raises LocalProtocolError.
"""

from __future__ import annotations

import enum
from collections import Counter
from dataclasses import dataclass
from typing import Protocol

from agent.channel import messages as m
from agent.channel.messages import Domain, MsgType
from agent.channel.records import (
    CosignedRecord,
    MeterInfo,
    OpenParams,
    Party,
    Record,
)
from agent.channel.state import (
    ChannelState,
    check_balances,
    check_state_signature,
    derive_channel_id,
    recover_signer,
)
from agent.errors import BadSignature, ChannelError, EdgeAgentError

RTO_INITIAL_S = 0.2
RTO_MAX_S = 2.0


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
    """Write ``record`` before the actions after it. ``sync=False`` (the station's METER
    records only, see station.METER_RESERVE) may be flushed by a later write instead."""

    record: Record
    sync: bool = True


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
class ExportPaused:
    """The vehicle must stop feeding energy back (V2G): unpaid export reached its export
    credit window, or the station's deposit is not confirmed on the ledger."""

    unpaid_wh: int


@dataclass(frozen=True, slots=True)
class ExportResumed:
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
          | DeliveryResumed | ExportPaused | ExportResumed | PaymentWithheld | CloseRequested
          | Closed | Rejected | PeerRejected)


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
    "meter-clock-mismatch": "METER time further from the vehicle's own clock than its tolerance",
    "meter-clock-unknown": "a time-of-use METER, and the vehicle has no clock to price it by",
    "dispute-window-too-short": "OPEN's dispute window below the vehicle's minimum",
    "station-deposit-too-small": "V2G OPEN whose station deposit cannot pay one export window",
    "energy-mismatch": "metered energy beyond the vehicle's estimate plus tolerance",
    "conflicting-state": "peer holds another co-signed state with our nonce",
    "after-final": "a state proposed after the final one was co-signed",
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
        self.wall_s: float | None = None   # our wall clock at the message being handled
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

    def receive(self, data: bytes, now: float, wall_s: float | None = None) -> list[Action]:
        """One message from the peer. Never raises for bad input: see module doc.
        ``wall_s`` is our own wall clock (unix seconds) at arrival: the vehicle prices each
        METER with it (rule 6); None when the caller has no clock."""
        self.wall_s = wall_s
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
            error = ChannelError(f"{wire.msg_type.name} in phase {self.phase.value}",
                                 reason="unexpected-message")
            return self._reject(error, wire.msg_type, reply=False)
        try:
            actions: list[Action] = getattr(self, handler)(wire.body, now)
            return actions
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
        out: list[Action] = [PeerRejected(reason, rejected, last)]
        return out + self._peer_rejected(rejected)

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
                check_state_signature(state, sig_ev, ev.address)
                check_state_signature(state, sig_cs, cs.address)
                out += self._adopt(CosignedRecord(state, sig_ev, sig_cs))
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
        sync = self._sync_cosigned(record.state)  # asked while self.cosigned is the old one
        self.cosigned = record
        out: list[Action] = [Persist(record, sync=sync)]
        if record.state.final:
            self.phase = Phase.CLOSED
            self._deadline = None
            out.append(Closed(record.state, record.sig_ev, record.sig_cs))
        else:
            out.append(Paid(record.state))
        return out

    def _sync_cosigned(self, state: ChannelState) -> bool:
        """Must a co-signed ``state`` be fsync'd before what follows it? Yes, unless the
        role says otherwise (the vehicle, see VehicleChannel._sync_cosigned)."""
        return True

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
