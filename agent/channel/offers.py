"""Charging-session messages before a channel exists: offers, requests, answers, commands.
Sans-I/O (DESIGN s5b; the wire formats are docs/charging.md).

Wire form (deterministic CBOR, RFC 8949 s4.2, decoded strictly by agent.dcbor)::

    [msg_type: uint, kid: bstr(8), body: {uint: any}, sig: bstr(64)]

``sig`` is the sender's Ed25519 signature (RFC 8032) over
``dCBOR([b"evedge/v1/session", msg_type, body])``: it binds the message type, so an offer
cannot be replayed as an answer; each body names its sender and its recipient (station id,
vehicle id), so it cannot be replayed to another device; requests and commands carry a
random id and their issue time, so a replay is noticed (the receiver keeps the ids it saw
for as long as it accepts that issue time).

Who signs, and how the receiver knows the key:

    OFFER    the station; the body carries its identity key (the vehicle checks it against
             its fleet registry when it has one)
    REQUEST  the vehicle; the body carries its identity key (the station checks it against
             its fleet registry, or accepts anyone under an open policy)
    ACCEPT   the station, with the key of the offer the vehicle acted on
    REFUSAL  the station, likewise; ``reason`` is a code of REFUSALS
    COMMAND  a fleet operator key named in the vehicle's config ([channel] operator_keys)

Bodies (integer keys; ``None`` is CBOR null)::

    OFFER    0 station, 1 connector, 2 identity (32 B), 3 address (20 B), 4 tariff,
             5 tariff signature, 6 chain id, 7 contract (20 B), 8 dispute_window_s,
             9 credit_window_wh, 10 pay_step_wh, 11 deposit_ev, 12 connector state,
             13 issued_s, 14 meter_key (optional: the Eichrecht meter's public key)
    REQUEST  0 request id (16 B), 1 station, 2 connector, 3 vehicle, 4 identity (32 B),
             5 address (20 B), 6 salt half (16 B), 7 max_wh or null, 8 max price per kWh
             or null, 9 issued_s
    ACCEPT   0 request id, 1 station, 2 connector, 3 vehicle, 4 salt half (16 B),
             5 channel id (32 B), 6 issued_s
    REFUSAL  0 request id, 1 station, 2 connector, 3 vehicle, 4 reason, 5 detail, 6 issued_s
    COMMAND  0 command id (16 B), 1 vehicle, 2 action ("start" | "stop"), 3 station or null,
             4 connector or null, 5 max_wh or null, 6 max price or null, 7 issued_s

The channel salt is ``sha256(b"evedge/v1/salt" || vehicle half || station half)``: neither
side alone picks the channel id (state.derive_channel_id), so neither can steer it onto a
channel that already exists.

Every decoding failure raises one of our RemoteProtocolError subclasses (reason code);
a signature that does not check raises BadSignature / UnknownKey.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass
from typing import ClassVar, Protocol, TypeVar

from agent import dcbor
from agent.channel.messages import Tariff, field, key_id, verify_ed25519
from agent.errors import MalformedEnvelope, UnknownKey

SESSION_DOMAIN = b"evedge/v1/session"
SALT_DOMAIN = b"evedge/v1/salt"
MAX_MESSAGE_BYTES = 2048
MAX_ID_LEN = 64
ID_BYTES = 16

# Every refusal a station signs, with what it means (docs/charging.md is generated from it).
REFUSALS: dict[str, str] = {
    "connector-occupied": "another vehicle is charging at this connector",
    "not-plugged-in": "the connector's charger reports no vehicle plugged in (IEC 61851 "
                      "state A): plug in first",
    "connector-faulted": "the connector's charger reports an error (state E/F) or does not "
                         "answer",
    "unknown-connector": "the station offers no such connector",
    "vehicle-not-allowed": "the vehicle's key is not in the station's fleet registry",
    "key-revoked": "the vehicle's key is revoked in the station's fleet registry",
    "price-above-limit": "the station's tariff is above the vehicle's price limit",
    "vehicle-busy": "this vehicle already has a session at the station",
}
CONNECTOR_STATES = ("available", "occupied", "faulted")
ACTIONS = ("start", "stop")


class MsgType(enum.IntEnum):
    OFFER = 1
    REQUEST = 2
    ACCEPT = 3
    REFUSAL = 4
    COMMAND = 5


class Signer(Protocol):  # agent.keys.IdentityKey
    kid: bytes

    def sign(self, message: bytes) -> bytes: ...


def _text(body: dict[int, object], key: int, what: str) -> str:
    value = field(body, key, str)
    assert isinstance(value, str)
    if not 0 < len(value) <= MAX_ID_LEN or any(c in value for c in "/+#\0"):
        raise MalformedEnvelope(f"{what} is not a device id", reason="malformed-message")
    return value


def _int(body: dict[int, object], key: int, *, optional: bool = False) -> int | None:
    value = field(body, key, int, optional=optional)
    assert value is None or isinstance(value, int)
    if value is not None and value >= 1 << 64:
        raise MalformedEnvelope(f"body field {key} out of range", reason="malformed-message")
    return value


def _req_int(body: dict[int, object], key: int) -> int:
    value = _int(body, key)
    assert value is not None
    return value


def _bytes(body: dict[int, object], key: int, size: int) -> bytes:
    value = field(body, key, bytes, size=size)
    assert isinstance(value, bytes)
    return value


@dataclass(frozen=True, slots=True)
class Offer:
    """One connector of a station, as the station advertises it (retained)."""

    TYPE: ClassVar[MsgType] = MsgType.OFFER
    station: str
    connector: int
    identity: bytes
    address: bytes
    tariff: Tariff
    tariff_sig: bytes
    chain_id: int
    contract: bytes
    dispute_window_s: int
    credit_window_wh: int
    pay_step_wh: int
    deposit_ev: int
    state: str
    issued_s: int
    # The connector's Eichrecht meter (optional, body key 14, encoded only when set): its
    # public key as the meter reports it (hex of the DER SubjectPublicKeyInfo, the source's
    # ``Meter.PublicKey`` reading). The final METER then carries the record the meter signed
    # for the session, and the vehicle checks it with this key (agent/channel/meter_proof.py).
    meter_key: str = ""

    def to_body(self) -> dict[int, object]:
        body: dict[int, object] = {
            0: self.station, 1: self.connector, 2: self.identity, 3: self.address,
            4: self.tariff.to_cbor_item(), 5: self.tariff_sig, 6: self.chain_id,
            7: self.contract, 8: self.dispute_window_s, 9: self.credit_window_wh,
            10: self.pay_step_wh, 11: self.deposit_ev, 12: self.state, 13: self.issued_s}
        if self.meter_key:
            body[14] = self.meter_key
        return body

    @classmethod
    def from_body(cls, body: dict[int, object]) -> Offer:
        state = field(body, 12, str)
        if state not in CONNECTOR_STATES:
            raise MalformedEnvelope("unknown connector state", reason="malformed-message")
        meter_key = body.get(14, "")
        if not isinstance(meter_key, str) or 14 in body and not meter_key \
                or len(meter_key) > 512:
            raise MalformedEnvelope("offer meter key must be a non-empty string when present",
                                    reason="malformed-message")
        return cls(_text(body, 0, "station"), _req_int(body, 1), _bytes(body, 2, 32),
                   _bytes(body, 3, 20), Tariff.from_cbor_item(body.get(4)), _bytes(body, 5, 64),
                   _req_int(body, 6), _bytes(body, 7, 20), _req_int(body, 8),
                   _req_int(body, 9), _req_int(body, 10), _req_int(body, 11), str(state),
                   _req_int(body, 13), meter_key)

    @property
    def highest_price(self) -> int:
        """The highest import price of the tariff at any time of day."""
        return max([self.tariff.price_per_kwh] + [p for _, p in self.tariff.tou])


@dataclass(frozen=True, slots=True)
class Request:
    """A vehicle asks a station to open a channel on one connector."""

    TYPE: ClassVar[MsgType] = MsgType.REQUEST
    request_id: bytes
    station: str
    connector: int
    vehicle: str
    identity: bytes
    address: bytes
    salt_half: bytes
    max_wh: int | None
    max_price_per_kwh: int | None
    issued_s: int

    def to_body(self) -> dict[int, object]:
        return {0: self.request_id, 1: self.station, 2: self.connector, 3: self.vehicle,
                4: self.identity, 5: self.address, 6: self.salt_half, 7: self.max_wh,
                8: self.max_price_per_kwh, 9: self.issued_s}

    @classmethod
    def from_body(cls, body: dict[int, object]) -> Request:
        return cls(_bytes(body, 0, ID_BYTES), _text(body, 1, "station"), _req_int(body, 2),
                   _text(body, 3, "vehicle"), _bytes(body, 4, 32), _bytes(body, 5, 20),
                   _bytes(body, 6, ID_BYTES), _int(body, 7, optional=True),
                   _int(body, 8, optional=True), _req_int(body, 9))


@dataclass(frozen=True, slots=True)
class Accept:
    """The station accepts a request: its half of the salt, and the channel id."""

    TYPE: ClassVar[MsgType] = MsgType.ACCEPT
    request_id: bytes
    station: str
    connector: int
    vehicle: str
    salt_half: bytes
    channel_id: bytes
    issued_s: int

    def to_body(self) -> dict[int, object]:
        return {0: self.request_id, 1: self.station, 2: self.connector, 3: self.vehicle,
                4: self.salt_half, 5: self.channel_id, 6: self.issued_s}

    @classmethod
    def from_body(cls, body: dict[int, object]) -> Accept:
        return cls(_bytes(body, 0, ID_BYTES), _text(body, 1, "station"), _req_int(body, 2),
                   _text(body, 3, "vehicle"), _bytes(body, 4, ID_BYTES), _bytes(body, 5, 32),
                   _req_int(body, 6))


@dataclass(frozen=True, slots=True)
class Refusal:
    """The station refuses a request; ``reason`` is a code of REFUSALS."""

    TYPE: ClassVar[MsgType] = MsgType.REFUSAL
    request_id: bytes
    station: str
    connector: int
    vehicle: str
    reason: str
    detail: str
    issued_s: int

    def to_body(self) -> dict[int, object]:
        return {0: self.request_id, 1: self.station, 2: self.connector, 3: self.vehicle,
                4: self.reason, 5: self.detail, 6: self.issued_s}

    @classmethod
    def from_body(cls, body: dict[int, object]) -> Refusal:
        reason = field(body, 4, str)
        detail = field(body, 5, str)
        assert isinstance(reason, str) and isinstance(detail, str)
        if reason not in REFUSALS or len(detail) > 200:
            raise MalformedEnvelope("unknown refusal reason", reason="malformed-message")
        return cls(_bytes(body, 0, ID_BYTES), _text(body, 1, "station"), _req_int(body, 2),
                   _text(body, 3, "vehicle"), reason, detail, _req_int(body, 6))


@dataclass(frozen=True, slots=True)
class Command:
    """A fleet operator tells a vehicle to start or stop a session."""

    TYPE: ClassVar[MsgType] = MsgType.COMMAND
    command_id: bytes
    vehicle: str
    action: str
    station: str | None
    connector: int | None
    max_wh: int | None
    max_price_per_kwh: int | None
    issued_s: int

    def to_body(self) -> dict[int, object]:
        return {0: self.command_id, 1: self.vehicle, 2: self.action, 3: self.station,
                4: self.connector, 5: self.max_wh, 6: self.max_price_per_kwh, 7: self.issued_s}

    @classmethod
    def from_body(cls, body: dict[int, object]) -> Command:
        action = field(body, 2, str)
        if action not in ACTIONS:
            raise MalformedEnvelope("unknown command action", reason="malformed-message")
        station = None if body.get(3) is None else _text(body, 3, "station")
        if action == "start" and (station is None or body.get(4) is None):
            raise MalformedEnvelope("a start command names station and connector",
                                    reason="malformed-message")
        return cls(_bytes(body, 0, ID_BYTES), _text(body, 1, "vehicle"), str(action), station,
                   _int(body, 4, optional=True), _int(body, 5, optional=True),
                   _int(body, 6, optional=True), _req_int(body, 7))


Message = Offer | Request | Accept | Refusal | Command
_CLASSES: dict[MsgType, type[Message]] = {
    MsgType.OFFER: Offer, MsgType.REQUEST: Request, MsgType.ACCEPT: Accept,
    MsgType.REFUSAL: Refusal, MsgType.COMMAND: Command}
M = TypeVar("M", Offer, Request, Accept, Refusal, Command)


@dataclass(frozen=True, slots=True)
class Signed:
    """A decoded message whose signature is not checked yet (see :func:`verify`)."""

    message: Message
    kid: bytes
    body_bytes: bytes
    sig: bytes


def _to_be_signed(msg_type: int, body_bytes: bytes) -> bytes:
    # dCBOR([domain, type, body]) spliced from the body's own bytes (array head 0x83, then
    # each item's deterministic encoding, RFC 8949 s4.2): the body is encoded once.
    return b"\x83" + dcbor.dumps(SESSION_DOMAIN) + dcbor.dumps(int(msg_type)) + body_bytes


def encode(message: Message, signer: Signer) -> bytes:
    body_bytes = dcbor.dumps(message.to_body())
    sig = signer.sign(_to_be_signed(message.TYPE, body_bytes))
    return (b"\x84" + dcbor.dumps(int(message.TYPE)) + dcbor.dumps(signer.kid) + body_bytes
            + dcbor.dumps(sig))


def decode(data: bytes) -> Signed:
    """Strictly decode one message (not yet authenticated). Raises DecodeError /
    MalformedEnvelope with a reason code."""
    if not isinstance(data, bytes | bytearray):
        raise MalformedEnvelope("message is not bytes", reason="malformed-message")
    item = dcbor.loads(bytes(data), max_bytes=MAX_MESSAGE_BYTES, max_depth=5, max_items=128)
    if not (isinstance(item, list) and len(item) == 4):
        raise MalformedEnvelope("a session message is a 4-element array",
                                reason="malformed-message")
    msg_type, kid, body, sig = item
    try:
        kind = MsgType(msg_type)
    except (ValueError, TypeError):
        raise MalformedEnvelope(f"unknown message type {msg_type!r}",
                                reason="unknown-message-type") from None
    if not (isinstance(kid, bytes) and len(kid) == 8 and isinstance(body, dict)
            and all(isinstance(k, int) for k in body) and isinstance(sig, bytes)
            and len(sig) == 64):
        raise MalformedEnvelope("session message fields have the wrong types or sizes",
                                reason="malformed-message")
    message = _CLASSES[kind].from_body(body)
    return Signed(message, kid, dcbor.dumps(body), sig)


def verify(signed: Signed, public: bytes) -> None:
    """Check that ``public`` signed the message; raise UnknownKey / BadSignature."""
    if signed.kid != key_id(public):
        raise UnknownKey("signed by another key than expected", kid=signed.kid,
                         reason="unknown-key")
    verify_ed25519(public, _to_be_signed(signed.message.TYPE, signed.body_bytes), signed.sig)


def open_as(data: bytes, kind: type[M], public: bytes | None = None) -> M:
    """Decode a message of ``kind`` and check its signature: by ``public``, or for offers
    and requests by the identity key they carry (self-signed; the caller then decides
    whether it trusts that key)."""
    signed = decode(data)
    if not isinstance(signed.message, kind):
        raise MalformedEnvelope(f"expected {kind.TYPE.name}, got {signed.message.TYPE.name}",
                                reason="unexpected-message")
    if public is None:
        if not isinstance(signed.message, Offer | Request):
            raise MalformedEnvelope(f"{kind.TYPE.name} needs a known signer key",
                                    reason="unknown-key")
        public = signed.message.identity
    verify(signed, public)
    return signed.message


def channel_salt(vehicle_half: bytes, station_half: bytes) -> bytes:
    return hashlib.sha256(SALT_DOMAIN + vehicle_half + station_half).digest()
