"""Channel messages on the wire, and the station's signed tariff. Sans-I/O.

Wire form (deterministic CBOR, RFC 8949 s4.2, decoded strictly by agent.dcbor)::

    [msg_type: uint, channel_id: bstr(32), kid: bstr(8), body: {uint: any}, sig: bstr(64)]

``sig`` is the sender's Ed25519 identity signature (RFC 8032) over the domain-separated
to-be-signed bytes::

    dCBOR([b"evedge/v1/channel", msg_type, chain_id, contract, channel_id, body])

so a signature binds the message type, the chain, the contract and the channel: it cannot
be replayed as another type or on another channel (DESIGN s5 "every signature is
domain-separated"). OPEN goes before the vehicle knows the channel id; the vehicle checks it
with the id derived from the OPEN body (state.derive_channel_id).

The tariff is signed separately by the station's identity key over
``dCBOR([b"evedge/v1/tariff", kid, tariff])`` so it can be published before any channel
exists; its id (``sha256(dCBOR(tariff))[:16]``) is repeated in every METER, which is how a
tariff changed mid-session is noticed.

Bodies (integer keys; ``None`` is CBOR null):

    OPEN        0 chain_id, 1 contract, 2 salt, 3 ev identity, 4 cs identity, 5 ev address,
                6 cs address, 7 deposit_ev, 8 deposit_cs, 9 dispute_window_s, 10 tariff,
                11 tariff signature, 12 credit_window_wh, 13 pay_step_wh
    FUNDED      0 funding reference (bytes, may be empty)
    METER       0 counter, 1 import_wh, 2 export_wh, 3 ts_s, 4 charge_milli, 5 credit_milli,
                6 tariff id, 7 final
    PAY         0 state (ChannelState item), 1 vehicle secp256k1 signature, 2 meter counter
    ACK         0 nonce, 1 station secp256k1 signature
    REJECT      0 reason code (text), 1 rejected nonce or null, 2 last co-signed nonce
    REESTABLISH 0 last co-signed nonce, 1 state item or null, 2 sig_ev or null, 3 sig_cs or null
    CLOSE       0 final state item or null (null: "please close"), 1 sig_ev or null,
                2 meter counter or null
    CLOSED      0 nonce, 1 station secp256k1 signature

Every decoding failure raises one of our RemoteProtocolError subclasses with a reason code.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass
from typing import Literal, Protocol, TypeVar, overload

import cbor2
import nacl.exceptions
import nacl.signing

from agent import dcbor
from agent.errors import BadSignature, MalformedEnvelope, UnknownKey

CHANNEL_DOMAIN = b"evedge/v1/channel"
TARIFF_DOMAIN = b"evedge/v1/tariff"
MAX_MESSAGE_BYTES = 4096
MAX_ITEMS = 256
KID_BYTES = 8


class MsgType(enum.IntEnum):
    OPEN = 1
    FUNDED = 2
    METER = 3
    PAY = 4
    ACK = 5
    REJECT = 6
    REESTABLISH = 7
    CLOSE = 8
    CLOSED = 9


def key_id(public: bytes) -> bytes:
    """8-byte key id of an Ed25519 public key (same rule as agent.keys.key_id)."""
    return hashlib.sha256(public).digest()[:KID_BYTES]


@dataclass(frozen=True, slots=True)
class Tariff:
    """Prices in the token's smallest unit per kWh (integers).

    ``tou`` is an optional time-of-use table: ``((start_minute_utc, price_per_kwh), ...)``
    sorted by minute of the day; the entry whose start is the latest at or before the
    reading's time applies, wrapping around midnight. Empty: ``price_per_kwh`` all day.
    ``export_price_per_kwh`` is what the station pays the vehicle for energy fed back (V2G).
    """

    price_per_kwh: int
    export_price_per_kwh: int = 0
    tou: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        for name in ("price_per_kwh", "export_price_per_kwh"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 64:
                raise ValueError(f"tariff {name} must be an integer in [0, 2**64)")
        minutes = [m for m, _ in self.tou]
        if minutes != sorted(set(minutes)) or any(not 0 <= m < 1440 for m in minutes):
            raise ValueError("tariff tou minutes must be unique, sorted, in [0, 1440)")
        for _, price in self.tou:
            if isinstance(price, bool) or not isinstance(price, int) or not 0 <= price < 1 << 64:
                raise ValueError("tariff tou prices must be integers in [0, 2**64)")

    def price_at(self, ts_s: int) -> int:
        """Import price per kWh in force at unix time ``ts_s``."""
        if not self.tou:
            return self.price_per_kwh
        minute = (ts_s // 60) % 1440
        price = self.tou[-1][1]  # before the first start of the day: last entry wraps
        for start, value in self.tou:
            if start <= minute:
                price = value
        return price

    def price_range(self, ts_from: int, ts_to: int) -> tuple[int, int]:
        """(min, max) import price in force at any time in [ts_from, ts_to]: the price at
        the start and at every time-of-use boundary crossed up to the end."""
        if not self.tou or ts_to - ts_from >= 86_400:
            prices = [p for _, p in self.tou] or [self.price_per_kwh]
            return min(prices), max(prices)
        starts = {m for m, _ in self.tou}
        prices = [self.price_at(ts_from)]
        for minute in range(ts_from // 60 + 1, ts_to // 60 + 1):
            if minute % 1440 in starts:
                prices.append(self.price_at(minute * 60))
        return min(prices), max(prices)

    def to_cbor_item(self) -> dict[int, object]:
        return {0: self.price_per_kwh, 1: self.export_price_per_kwh,
                2: [[m, p] for m, p in self.tou]}

    @classmethod
    def from_cbor_item(cls, item: object) -> Tariff:
        try:
            if not isinstance(item, dict) or set(item) != {0, 1, 2}:
                raise ValueError("tariff map needs keys 0, 1, 2")
            tou = tuple((int(m), int(p)) for m, p in item[2])
            return cls(item[0], item[1], tou)
        except (ValueError, TypeError) as exc:
            raise MalformedEnvelope(f"bad tariff: {exc}", reason="malformed-tariff") from None

    def tariff_id(self) -> bytes:
        return hashlib.sha256(dcbor.dumps(self.to_cbor_item())).digest()[:16]

    def signing_bytes(self, station_kid: bytes) -> bytes:
        return dcbor.dumps([TARIFF_DOMAIN, station_kid, self.to_cbor_item()])


class TariffSigner(Protocol):  # agent.keys.IdentityKey
    @property
    def kid(self) -> bytes: ...

    def sign(self, message: bytes) -> bytes: ...


def sign_tariff(tariff: Tariff, identity: TariffSigner) -> bytes:
    """The station's Ed25519 signature over its tariff."""
    return identity.sign(tariff.signing_bytes(identity.kid))


def check_tariff(tariff: Tariff, signature: bytes, station_public: bytes) -> None:
    verify_ed25519(station_public, tariff.signing_bytes(key_id(station_public)), signature,
                   reason="bad-tariff-signature")


_VERIFY_KEYS: dict[bytes, nacl.signing.VerifyKey] = {}


def verify_ed25519(public: bytes, message: bytes, signature: bytes, *,
                   reason: str = "bad-signature") -> None:
    """Return if valid, raise BadSignature(reason) otherwise. libsodium rejects a
    non-canonical S (S >= L), so Ed25519 signatures are not malleable (RFC 8032 s5.1.7)."""
    key = _VERIFY_KEYS.get(public)
    if key is None:
        try:
            key = nacl.signing.VerifyKey(public)
        except (nacl.exceptions.ValueError, TypeError) as exc:
            raise BadSignature("not an Ed25519 public key", reason="bad-public-key") from exc
        if len(_VERIFY_KEYS) > 64:
            _VERIFY_KEYS.clear()
        _VERIFY_KEYS[public] = key
    try:
        key.verify(message, signature)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, TypeError) as exc:
        raise BadSignature("Ed25519 signature does not verify", kid=key_id(public),
                           reason=reason) from exc


@dataclass(frozen=True, slots=True)
class Domain:
    """What every transport signature of one channel binds."""

    chain_id: int
    contract: bytes
    channel_id: bytes


@dataclass(frozen=True, slots=True)
class Wire:
    """One decoded, not yet authenticated, message."""

    msg_type: MsgType
    channel_id: bytes
    kid: bytes
    body: dict[int, object]
    sig: bytes
    body_bytes: bytes = b""  # the body's deterministic CBOR, as it arrived


def to_be_signed(domain: Domain, msg_type: int, body: dict[int, object]) -> bytes:
    return dcbor.dumps([CHANNEL_DOMAIN, int(msg_type), domain.chain_id, domain.contract,
                        domain.channel_id, body])


# Deterministic CBOR encodes an array as its head followed by each item's own encoding, so
# both the to-be-signed bytes and the wire form are spliced from a cached prefix and the
# body's bytes, encoded once (sending) or sliced from the message (receiving): two CBOR
# encodings fewer per message. tests/agent/channel/test_messages.py checks the splice
# against the plain encodings above.
_SIG_TAIL = len(dcbor.dumps(bytes(64)))  # a 64-byte bstr: 2-byte head + 64


def _prefix(cache: dict[tuple[object, ...], bytes], head: bytes,
            items: tuple[object, ...]) -> bytes:
    """``head`` + the deterministic CBOR of each item, cached (a channel asks for the same
    few on every message; the bound keeps hostile channel ids from growing it)."""
    prefix = cache.get(items)
    if prefix is None:
        if len(cache) > 256:
            cache.clear()
        prefix = cache[items] = head + b"".join(dcbor.dumps(x) for x in items)
    return prefix


_TBS_PREFIXES: dict[tuple[object, ...], bytes] = {}
_WIRE_PREFIXES: dict[tuple[object, ...], bytes] = {}


def _tbs_prefix(domain: Domain, msg_type: int) -> bytes:
    return _prefix(_TBS_PREFIXES, b"\x86", (CHANNEL_DOMAIN, int(msg_type), domain.chain_id,
                                            domain.contract, domain.channel_id))


def _wire_prefix(msg_type: int, channel_id: bytes, kid: bytes) -> bytes:
    return _prefix(_WIRE_PREFIXES, b"\x85", (int(msg_type), channel_id, kid))


def encode(domain: Domain, msg_type: MsgType, body: dict[int, object], identity: object) -> bytes:
    """Sign and encode one message (``identity``: kid + sign(), an agent.keys.IdentityKey)."""
    body_bytes = dcbor.dumps(body)
    sig = identity.sign(_tbs_prefix(domain, msg_type) + body_bytes)  # type: ignore[attr-defined]
    return (_wire_prefix(msg_type, domain.channel_id, identity.kid)  # type: ignore[attr-defined]
            + body_bytes + dcbor.dumps(sig))


def _plain_items(item: object, depth: int = 0) -> int:
    """How many items ``item`` holds if it uses only what our messages use (unsigned map
    keys, ints within 64 bits, bytes, text, arrays, maps, bools, null) within the strict
    decoder's depth; -1 otherwise. Unsigned keys matter: with them cbor2's length-first
    canonical order is the same as RFC 8949's bytewise order."""
    if depth > 6:
        return -1
    if isinstance(item, list):
        counts = [_plain_items(x, depth + 1) for x in item]
        return -1 if -1 in counts else 1 + sum(counts)
    if isinstance(item, dict):
        total = 1
        for key, value in item.items():
            inner = _plain_items(value, depth + 1)
            if isinstance(key, bool) or not isinstance(key, int) or not 0 <= key < 1 << 64 \
                    or inner < 0:
                return -1
            total += 1 + inner
        return total
    if item is None or isinstance(item, bool | bytes | str):
        return 1
    if isinstance(item, int) and -(1 << 64) <= item < 1 << 64:
        return 1
    return -1


def loads_strict(data: bytes) -> object:
    """agent.dcbor.loads, with a fast path: cbor2's C decoder, accepted only when the
    canonical re-encoding is byte-identical (deterministic encodings are unique, RFC 8949
    s4.2) and the item holds nothing but our plain types. Anything else, including every
    error, goes through the strict decoder, which stays the authority. The pure-Python
    decoder costs ~0.2 ms per message, a third of a channel round trip."""
    if len(data) <= MAX_MESSAGE_BYTES:
        try:
            item = cbor2.loads(data)
            if 0 <= _plain_items(item) <= MAX_ITEMS and \
                    cbor2.dumps(item, canonical=True) == data:
                return item
        except Exception:  # noqa: BLE001 - any cbor2 failure: let the strict decoder say why
            pass
    return dcbor.loads(data, max_bytes=MAX_MESSAGE_BYTES, max_depth=6, max_items=MAX_ITEMS)


def decode(data: bytes) -> Wire:
    """Strictly decode the outer structure. Raises DecodeError / MalformedEnvelope."""
    if not isinstance(data, bytes | bytearray):
        raise MalformedEnvelope("message is not bytes", reason="malformed-message")
    item = loads_strict(bytes(data))
    if not (isinstance(item, list) and len(item) == 5):
        raise MalformedEnvelope("a channel message is a 5-element array",
                                reason="malformed-message")
    msg_type, channel_id, kid, body, sig = item
    try:
        kind = MsgType(msg_type)
    except (ValueError, TypeError):
        raise MalformedEnvelope(f"unknown message type {msg_type!r}",
                                reason="unknown-message-type") from None
    if not (isinstance(channel_id, bytes) and len(channel_id) == 32
            and isinstance(kid, bytes) and len(kid) == KID_BYTES
            and isinstance(body, dict) and all(isinstance(k, int) for k in body)
            and isinstance(sig, bytes) and len(sig) == 64):
        raise MalformedEnvelope("channel message fields have the wrong types or sizes",
                                reason="malformed-message")
    start = len(_wire_prefix(kind, channel_id, kid))
    return Wire(kind, channel_id, kid, body, sig, bytes(data[start:len(data) - _SIG_TAIL]))


def authenticate(wire: Wire, domain: Domain, peer_public: bytes) -> None:
    """Check the sender key and the transport signature.

    Raises UnknownKey (reason ``unknown-key``) for another sender, and BadSignature with
    reason ``signature-for-other-type`` when the signature is valid for the same body under
    another message type (a type-confusion attempt), ``bad-signature`` otherwise. The extra
    verifications happen only on the failure path.
    """
    if wire.kid != key_id(peer_public):
        raise UnknownKey("message signed by a key that is not the channel peer's",
                         kid=wire.kid, reason="unknown-key")
    body = wire.body_bytes or dcbor.dumps(wire.body)
    try:
        verify_ed25519(peer_public, _tbs_prefix(domain, wire.msg_type) + body, wire.sig)
    except BadSignature:
        for other in MsgType:
            if other is wire.msg_type:
                continue
            try:
                verify_ed25519(peer_public, _tbs_prefix(domain, other) + body, wire.sig)
            except BadSignature:
                continue
            raise BadSignature(f"signature is over a {other.name}, not a {wire.msg_type.name}",
                               kid=wire.kid, reason="signature-for-other-type") from None
        raise


# ----------------------------------------------------------------------------- body access


T = TypeVar("T")


@overload
def field(body: dict[int, object], key: int, kind: type[T], *, size: int | None = None,
          optional: Literal[False] = False) -> T: ...


@overload
def field(body: dict[int, object], key: int, kind: type[T], *, size: int | None = None,
          optional: Literal[True]) -> T | None: ...


@overload
def field(body: dict[int, object], key: int, kind: type[T], *, size: int | None = None,
          optional: bool) -> T | None: ...


def field(body: dict[int, object], key: int, kind: type[T], *, size: int | None = None,
          optional: bool = False) -> T | None:
    """One typed body field (an int is never a bool, never negative; ``size`` for bytes);
    MalformedEnvelope(reason="malformed-message") otherwise."""
    if key not in body:
        raise MalformedEnvelope(f"body field {key} missing", reason="malformed-message")
    value = body[key]
    if value is None and optional:
        return None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)) \
            or (isinstance(value, int) and value < 0) \
            or (size is not None and isinstance(value, bytes | str) and len(value) != size):
        raise MalformedEnvelope(f"body field {key} has the wrong type or size",
                                reason="malformed-message")
    return value
