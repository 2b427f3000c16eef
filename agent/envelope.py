"""Signed, hash-chained envelopes: sealing, opening, batching. Sans-I/O.

Wire format (DESIGN s3). An envelope is a COSE_Sign1 (RFC 9052 s4.2, CBOR tag 18)::

    18([ protected: bstr .cbor {1: -8 (alg EdDSA), 4: kid (8 bytes)},
         unprotected: {},
         payload: bstr .cbor {1: device id (tstr), 2: boot id (bstr 16), 3: seq (uint),
                              4: prev (bstr 32), 5: kind (tstr), 6: body},
         signature: bstr 64 (Ed25519 over Sig_structure, RFC 9052 s4.4) ])

    Sig_structure = ["Signature1", protected, external_aad = h'', payload]

Every CBOR item is deterministic (RFC 8949 s4.2, agent.dcbor). ``kind`` and ``body``:

- ``telemetry``: an array of readings, each [name, value, unit, ts_ns, status, source(,flags)]
- ``event``: an array of event maps (agent.readings.Event)
- ``drop``: {"first", "last", "count", "bytes", "last_hash", "reason"}: envelopes first..last
  were deleted unsent (spool full); ``last_hash`` is the hash of envelope ``last`` so the
  verifier can link the envelope after the gap.

``seq`` counts envelopes per device from 0 and never repeats (the spool persists it with
the chain head); ``prev`` is SHA-256 of the previous envelope's bytes (32 zero bytes for
seq 0). So any gap, reorder, edit, deletion or replay is visible to a verifier.

Opening checks, in order, each with its own error and ``reason`` code: size (OversizeInput),
CBOR well-formed and deterministic (MalformedCBOR, NonDeterministicCBOR, DuplicateMapKey),
tag 18 (WrongTag), the COSE_Sign1 structure (``cose-structure``), an EMPTY unprotected header
(``unprotected-header``), a protected header of exactly alg and kid (``protected-header``),
alg EdDSA (WrongAlgorithm), the key (UnknownKey / RevokedKey from the lookup), the signature
(BadSignature), then the payload schema (``payload-schema``, ``telemetry-body`` ...).

Why the unprotected header must be empty: ``prev`` is the hash of the whole envelope, and
unprotected bytes are not signed, so anyone on the path could change an envelope's hash
(and break or fake a chain link) without touching its signature. Refusing them means a
verdict depends on signed bytes only. The full spec, with CDDL and known-answer vectors, is
docs/envelope.md.

A chain head (:func:`seal_head`) is a COSE_Sign1 of its own kind, told apart by its content
type (protected header 3): the device's last seq and that envelope's hash, so a verifier
sees a truncated tail ("device says seq 4949, last seen 4944").
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from agent import dcbor
from agent.errors import (
    MalformedEnvelope,
    OversizeInput,
    WrongAlgorithm,
    WrongTag,
)
from agent.keys import verify_ed25519
from agent.readings import Event, Reading

COSE_SIGN1_TAG = 18
ALG_EDDSA = -8
HDR_ALG, HDR_CONTENT_TYPE, HDR_KID = 1, 3, 4
HEAD_CONTENT_TYPE = "application/evedge-head+cbor"
COMMIT_CONTENT_TYPE = "application/evedge-commit+cbor"
KIND_TELEMETRY, KIND_EVENT, KIND_DROP = "telemetry", "event", "drop"
KINDS = (KIND_TELEMETRY, KIND_EVENT, KIND_DROP)
GENESIS = bytes(32)
MAX_ENVELOPE_BYTES = 256 * 1024
BOOT_ID_LEN = 16
KID_LEN = 8

P_DEVICE, P_BOOT, P_SEQ, P_PREV, P_KIND, P_BODY = 1, 2, 3, 4, 5, 6
_PAYLOAD_KEYS = {P_DEVICE, P_BOOT, P_SEQ, P_PREV, P_KIND, P_BODY}
_DROP_KEYS = {"first", "last", "count", "bytes", "last_hash", "reason"}


class Signer(Protocol):
    kid: bytes

    def sign(self, message: bytes) -> bytes: ...


def _head(major: int, value: int) -> bytes:
    """A CBOR head (major type, argument) in its shortest form (RFC 8949 s3.1, s4.2.1).
    Hand-made for the two heads sealing needs per envelope: cbor2.dumps costs ~2.5 us a
    call whatever the value, a tenth of an Ed25519 signature."""
    top = major << 5
    if value < 24:
        return bytes([top | value])
    for info, size in ((24, 1), (25, 2), (26, 4), (27, 8)):
        if value < 1 << (8 * size):
            return bytes([top | info]) + value.to_bytes(size, "big")
    raise ValueError("CBOR argument above 2**64")


def _bstr_head(length: int) -> bytes:
    return _head(2, length)


@dataclass(frozen=True, slots=True)
class SealedEnvelope:
    seq: int
    kind: str
    data: bytes
    hash: bytes
    prev: bytes


@dataclass(frozen=True, slots=True)
class DropNotice:
    first: int
    last: int
    count: int
    nbytes: int
    last_hash: bytes
    reason: str


class Sealer:
    """Seals batches into the device's chain. Holds (next_seq, head) in memory; the caller
    (the spool) persists both with each envelope in one transaction."""

    def __init__(self, identity: Signer, device_id: str, boot_id: bytes, next_seq: int = 0,
                 prev_hash: bytes = GENESIS) -> None:
        if len(boot_id) != BOOT_ID_LEN:
            raise ValueError(f"boot id must be {BOOT_ID_LEN} bytes")
        if len(prev_hash) != 32 or next_seq < 0:
            raise ValueError("prev hash must be 32 bytes and next_seq >= 0")
        self.identity, self.device_id, self.boot_id = identity, device_id, boot_id
        self.next_seq, self.head = next_seq, prev_hash
        protected = dcbor.dumps({HDR_ALG: ALG_EDDSA, HDR_KID: identity.kid})
        self._cose_prefix = b"\xd2\x84" + _bstr_head(len(protected)) + protected + b"\xa0"
        # Sig_structure is an array of 4 whose first three items never change: build them
        # once and append the payload (byte-identical to dcbor.dumps of the whole array).
        self._sig_prefix = (b"\x84" + dcbor.dumps("Signature1") + _bstr_head(len(protected))
                            + protected + b"\x40")
        # map of 6: device (key 1), boot (key 2), then the key of seq (3)
        self._payload_prefix = (b"\xa6\x01" + dcbor.dumps(device_id) + b"\x02"
                                + dcbor.dumps(boot_id) + b"\x03")
        self._kinds = {kind: dcbor.dumps(kind) for kind in KINDS}

    def seal_readings(self, readings: Sequence[Reading]) -> SealedEnvelope:
        return self._seal(KIND_TELEMETRY, [r.to_cbor_item() for r in readings])

    def seal_events(self, events: Sequence[Event]) -> SealedEnvelope:
        return self._seal(KIND_EVENT, [e.to_cbor_item() for e in events])

    def seal_drop(self, first_seq: int, last_seq: int, last_hash: bytes, count: int,
                  nbytes: int, reason: str) -> SealedEnvelope:
        if not 0 <= first_seq <= last_seq < self.next_seq or len(last_hash) != 32:
            raise ValueError("a drop names a range of already sealed envelopes")
        body = {"first": first_seq, "last": last_seq, "count": count, "bytes": nbytes,
                "last_hash": last_hash, "reason": reason}
        return self._seal(KIND_DROP, body)

    def _seal(self, kind: str, body: object) -> SealedEnvelope:
        seq, prev = self.next_seq, self.head
        # The payload map's keys are 1..6 in this fixed (sorted) order and the first two
        # values never change, so its bytes are spliced from parts instead of encoding a
        # dict each time: byte-identical to dcbor.dumps of the map (a test checks), a
        # quarter of the per-envelope overhead at batch size 1.
        payload = b"".join((self._payload_prefix, _head(0, seq), b"\x04\x58\x20", prev,
                            b"\x05", self._kinds[kind], b"\x06", dcbor.dumps(body)))
        payload_item = _bstr_head(len(payload)) + payload
        signature = self.identity.sign(self._sig_prefix + payload_item)
        data = self._cose_prefix + payload_item + b"\x58\x40" + signature
        digest = hashlib.sha256(data).digest()
        self.next_seq, self.head = seq + 1, digest
        return SealedEnvelope(seq, kind, data, digest, prev)


@dataclass(frozen=True, slots=True)
class OpenedEnvelope:
    kid: bytes
    device: str
    boot: bytes
    seq: int
    prev: bytes
    kind: str
    readings: tuple[Reading, ...]
    events: tuple[Event, ...]
    drop: DropNotice | None
    hash: bytes


KeyLookup = Callable[[bytes], bytes]
"""kid -> Ed25519 public key; raises UnknownKey or RevokedKey."""


def open_envelope(data: bytes, lookup: KeyLookup,
                  max_bytes: int = MAX_ENVELOPE_BYTES) -> OpenedEnvelope:
    """Check and decode one envelope. Raises only agent.errors (see module doc)."""
    kid, payload = _open_sign1(data, lookup, max_bytes, content_type=None)
    return _decode_payload(payload, kid, hashlib.sha256(data).digest())


def _open_sign1(data: bytes, lookup: KeyLookup, max_bytes: int,
                content_type: str | None) -> tuple[bytes, bytes]:
    """Check a COSE_Sign1 of ours up to its signature; return (kid, payload bytes).
    ``content_type`` None: an envelope (protected header {1, 4}); else a chain head
    (protected header {1, 3, 4} with that content type)."""
    if len(data) > max_bytes:
        raise OversizeInput(f"input is {len(data)} bytes, limit {max_bytes}")
    if content_type is None:
        split = _split_envelope(data)
        if split is not None:  # the one deterministic encoding of an envelope of ours
            kid, protected_bytes, payload, signature = split
            verify_ed25519(lookup(kid), _sig_structure(protected_bytes, payload), signature)
            return kid, payload
    outer = dcbor.loads(data, max_bytes=max_bytes)
    if not isinstance(outer, dcbor.Tag) or outer.tag != COSE_SIGN1_TAG:
        raise WrongTag("not a COSE_Sign1 (tag 18)")
    parts = outer.value
    if not isinstance(parts, list) or len(parts) != 4:
        raise MalformedEnvelope("COSE_Sign1 is an array of 4", reason="cose-structure")
    protected_bytes, unprotected, payload, signature = parts
    if not isinstance(protected_bytes, bytes) or not isinstance(unprotected, dict) \
            or not isinstance(payload, bytes) or not isinstance(signature, bytes):
        raise MalformedEnvelope("COSE_Sign1 items have the wrong types",
                                reason="cose-structure")
    if len(signature) != 64:
        raise MalformedEnvelope(f"the signature is {len(signature)} bytes, an Ed25519 one is 64",
                                reason="cose-structure")
    if unprotected:
        raise MalformedEnvelope("the unprotected header must be empty (its bytes are not "
                                "signed but change the envelope's hash)",
                                reason="unprotected-header")
    protected = dcbor.loads(protected_bytes, max_bytes=256)
    if not isinstance(protected, dict):
        raise MalformedEnvelope("protected header is not a map", reason="protected-header")
    if protected.get(HDR_ALG) != ALG_EDDSA:
        raise WrongAlgorithm(f"alg {protected.get(HDR_ALG)!r} is not EdDSA (-8)")
    expected = {HDR_ALG, HDR_KID} if content_type is None else \
        {HDR_ALG, HDR_CONTENT_TYPE, HDR_KID}
    if set(protected) != expected or protected.get(HDR_CONTENT_TYPE) != content_type:
        raise MalformedEnvelope(f"protected header has the keys {sorted(protected, key=str)}, "
                                f"expected {sorted(expected)}", reason="protected-header")
    kid = protected[HDR_KID]
    if not isinstance(kid, bytes) or len(kid) != KID_LEN:
        raise MalformedEnvelope(f"kid must be {KID_LEN} bytes", reason="protected-header")
    public = lookup(kid)
    verify_ed25519(public, _sig_structure(protected_bytes, payload), signature)
    return kid, payload


_SIG1_CONTEXT = b"\x84" + b"\x6aSignature1"   # array of 4, then tstr "Signature1"
_PROTECTED_ENVELOPE = b"\xa2\x01\x27\x04\x48"  # {1: -8, 4: h'<8 bytes>'}


def _sig_structure(protected: bytes, payload: bytes) -> bytes:
    """dcbor.dumps(["Signature1", protected, b"", payload]) (RFC 9052 s4.4), spliced."""
    return b"".join((_SIG1_CONTEXT, _bstr_head(len(protected)), protected, b"\x40",
                     _bstr_head(len(payload)), payload))


def _split_envelope(data: bytes) -> tuple[bytes, bytes, bytes, bytes] | None:
    """(kid, protected, payload, signature) when ``data`` is exactly the deterministic
    encoding of ``18([h'a2 01 27 04 48 <kid>', {}, payload, sig64])``: what every sealer
    of ours writes, checked byte by byte (the inverse of Sealer._seal). None for anything
    else, which the generic strict path then decodes and names the fault of. Cheaper than
    decoding: a fleet ingest opens thousands of envelopes a second."""
    if data[:3] != b"\xd2\x84\x4d" or data[3:8] != _PROTECTED_ENVELOPE or data[16:17] != b"\xa0":
        return None
    head, pos = data[17:18], 18
    if not head or head[0] >> 5 != 2:
        return None
    info = head[0] & 0x1F
    if info < 24:
        length = info
    elif info <= 26:
        size = 1 << (info - 24)
        length = int.from_bytes(data[pos:pos + size], "big")
        if len(data) < pos + size or length < (24 if size == 1 else 1 << (4 * size)):
            return None  # truncated, or a head longer than needed: the strict path says so
        pos += size
    else:
        return None
    end = pos + length
    if len(data) != end + 66 or data[end:end + 2] != b"\x58\x40":
        return None
    return data[8:16], data[3:16], data[pos:end], data[end + 2:]


def _decode_payload(payload: bytes, kid: bytes, digest: bytes) -> OpenedEnvelope:
    body_map = dcbor.loads(payload, max_bytes=MAX_ENVELOPE_BYTES)
    if not isinstance(body_map, dict) or set(body_map) != _PAYLOAD_KEYS:
        raise MalformedEnvelope("payload must have exactly the keys 1..6",
                                reason="payload-schema")
    device, boot, seq = body_map[P_DEVICE], body_map[P_BOOT], body_map[P_SEQ]
    prev, kind, body = body_map[P_PREV], body_map[P_KIND], body_map[P_BODY]
    # type(seq) is int: CBOR true decodes to Python True, an int to isinstance
    if not isinstance(device, str) or not isinstance(boot, bytes) or len(boot) != BOOT_ID_LEN \
            or type(seq) is not int or seq < 0 or not isinstance(prev, bytes) \
            or len(prev) != 32 or kind not in KINDS:
        raise MalformedEnvelope("payload header fields have wrong types or sizes",
                                reason="payload-schema")
    readings: tuple[Reading, ...] = ()
    events: tuple[Event, ...] = ()
    drop = None
    try:
        if kind == KIND_TELEMETRY:
            if not isinstance(body, list):
                raise ValueError("telemetry body is an array")
            readings = tuple(Reading.from_cbor_item(item) for item in body)
        elif kind == KIND_EVENT:
            if not isinstance(body, list):
                raise ValueError("event body is an array")
            events = tuple(Event.from_cbor_item(item) for item in body)
        else:
            drop = _decode_drop(body)
            if drop.last >= seq:
                raise ValueError(f"declares {drop.first}..{drop.last} dropped, not all before "
                                 f"its own seq {seq}")
    except (ValueError, TypeError) as exc:
        raise MalformedEnvelope(f"{kind} body: {exc}", reason=f"{kind}-body") from None
    return OpenedEnvelope(kid, device, boot, seq, prev, kind, readings, events, drop, digest)


def _decode_drop(body: object) -> DropNotice:
    if not isinstance(body, dict) or set(body) != _DROP_KEYS:
        raise ValueError("drop body has the wrong keys")
    ints = [body[k] for k in ("first", "last", "count", "bytes")]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in ints):
        raise ValueError("drop counters must be non-negative integers")
    if not isinstance(body["last_hash"], bytes) or len(body["last_hash"]) != 32 \
            or not isinstance(body["reason"], str) or body["first"] > body["last"]:
        raise ValueError("drop range or hash malformed")
    first, last, count, nbytes = ints
    if count != last - first + 1:  # a declared range is a run of consecutive seqs
        raise ValueError(f"count {count} is not the {last - first + 1} envelopes of "
                         f"{first}..{last}")
    return DropNotice(first, last, count, nbytes, body["last_hash"], body["reason"])


# --------------------------------------------------------------------------- chain head

H_DEVICE, H_SEQ, H_HASH, H_TS = 1, 3, 4, 7
_HEAD_KEYS = {H_DEVICE, H_SEQ, H_HASH, H_TS}
MAX_HEAD_BYTES = 1024


@dataclass(frozen=True, slots=True)
class ChainHead:
    """What a device says about its own chain: ``seq`` is the last envelope it sealed and
    committed, ``hash`` that envelope's hash, ``ts_ns`` when it said so."""

    kid: bytes
    device: str
    seq: int
    hash: bytes
    ts_ns: int
    data: bytes


def seal_head(identity: Signer, device_id: str, seq: int, digest: bytes, ts_ns: int,
              content_type: str = HEAD_CONTENT_TYPE) -> bytes:
    """A signed chain head: COSE_Sign1 with protected {1: -8, 3: content type, 4: kid} and
    payload {1: device, 3: seq, 4: hash, 7: ts_ns} (docs/envelope.md). The same structure
    with COMMIT_CONTENT_TYPE, signed by a fleet ingest key, is a commit mark: "everything
    of ``device`` up to ``seq`` (ending in ``hash``) is committed to the fleet database"."""
    if seq < 0 or len(digest) != 32 or ts_ns < 0:
        raise ValueError("a chain head names a sealed seq and its 32-byte hash")
    protected = dcbor.dumps({HDR_ALG: ALG_EDDSA, HDR_CONTENT_TYPE: content_type,
                             HDR_KID: identity.kid})
    payload = dcbor.dumps({H_DEVICE: device_id, H_SEQ: seq, H_HASH: digest, H_TS: ts_ns})
    signature = identity.sign(dcbor.dumps(["Signature1", protected, b"", payload]))
    return dcbor.dumps(dcbor.Tag(COSE_SIGN1_TAG, [protected, {}, payload, signature]))


def seal_signed(identity: Signer, content_type: str, payload: dict[int, object]) -> bytes:
    """A COSE_Sign1 of another kind of ours: protected {1: -8, 3: content type, 4: kid}
    (the chain head's structure), any payload map (a batched commit mark's root)."""
    protected = dcbor.dumps({HDR_ALG: ALG_EDDSA, HDR_CONTENT_TYPE: content_type,
                             HDR_KID: identity.kid})
    body = dcbor.dumps(payload)
    signature = identity.sign(dcbor.dumps(["Signature1", protected, b"", body]))
    return dcbor.dumps(dcbor.Tag(COSE_SIGN1_TAG, [protected, {}, body, signature]))


def open_signed(data: bytes, lookup: KeyLookup, content_type: str,
                max_bytes: int = MAX_HEAD_BYTES) -> tuple[bytes, object]:
    """Check a :func:`seal_signed` structure; (kid, decoded payload). Raises agent.errors."""
    kid, payload = _open_sign1(data, lookup, max_bytes, content_type=content_type)
    return kid, dcbor.loads(payload, max_bytes=max_bytes)


def open_head(data: bytes, lookup: KeyLookup,
              content_type: str = HEAD_CONTENT_TYPE) -> ChainHead:
    """Check and decode a chain head (or a commit mark); raises only agent.errors."""
    kid, payload = _open_sign1(data, lookup, MAX_HEAD_BYTES, content_type=content_type)
    body = dcbor.loads(payload, max_bytes=MAX_HEAD_BYTES)
    if not isinstance(body, dict) or set(body) != _HEAD_KEYS:
        raise MalformedEnvelope("chain head payload must have the keys 1, 3, 4, 7",
                                reason="head-schema")
    device, seq, digest, ts_ns = body[H_DEVICE], body[H_SEQ], body[H_HASH], body[H_TS]
    if not isinstance(device, str) or not isinstance(seq, int) or seq < 0 \
            or not isinstance(digest, bytes) or len(digest) != 32 \
            or not isinstance(ts_ns, int) or ts_ns < 0:
        raise MalformedEnvelope("chain head fields have wrong types or sizes",
                                reason="head-schema")
    return ChainHead(kid, device, seq, digest, ts_ns, data)


def is_head(data: bytes) -> bool:
    """Cheap test whether ``data`` claims to be a chain head (its content type is in the
    first bytes); the caller still opens it with :func:`open_head`."""
    return HEAD_CONTENT_TYPE.encode() in data[:64]


class Batcher:
    """Collects readings into batches by count and by age. Time is an argument (aioquic
    style): ``add`` returns a full batch, ``deadline`` says when the oldest reading must
    leave, ``flush(now)`` returns the batch once that time has come (or at shutdown)."""

    def __init__(self, max_readings: int, max_age_ns: int) -> None:
        if max_readings < 1 or max_age_ns < 0:
            raise ValueError("max_readings >= 1 and max_age_ns >= 0")
        self.max_readings, self.max_age_ns = max_readings, max_age_ns
        self._pending: list[Reading] = []
        self._oldest_ns: int | None = None

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, reading: Reading, now_ns: int) -> list[Reading] | None:
        if self._oldest_ns is None:
            self._oldest_ns = now_ns
        self._pending.append(reading)
        if len(self._pending) >= self.max_readings or self.max_age_ns == 0:
            return self._take()
        return None

    def deadline(self) -> int | None:
        return None if self._oldest_ns is None else self._oldest_ns + self.max_age_ns

    def flush(self, now_ns: int, force: bool = False) -> list[Reading] | None:
        deadline = self.deadline()
        if deadline is None or (not force and now_ns < deadline):
            return None
        return self._take()

    def _take(self) -> list[Reading]:
        batch, self._pending, self._oldest_ns = self._pending, [], None
        return batch
