"""Deterministic CBOR (RFC 8949 section 4.2.1): encoding and a strict decoder. Sans-I/O.

Encoding uses cbor2's ``canonical=True`` (C extension, fast). cbor2 sorts map keys
length-first (RFC 7049 s3.9), RFC 8949 s4.2.1 sorts them bytewise; the two orders agree
whenever all keys of a map share one major type, which is the rule for every map this
project builds (small unsigned ints in protocol structures, text in event details).
``dumps`` enforces that rule and the value set ``loads`` accepts (no bignums, no types
cbor2 would tag), so it never produces bytes its own decoder refuses: ValueError otherwise
(a bug in the caller, not hostile input).

Decoding is written by hand because no library does it well: cbor2 accepts long heads,
indefinite lengths, unsorted maps and duplicate keys (the last silently wins), and any of
those lets one signed payload have two encodings or two meanings. ``loads`` accepts exactly
one encoding per value and raises a distinct error for each way to deviate:

- MalformedCBOR: truncated, reserved additional info (28-30), break outside indefinite,
  trailing bytes, invalid UTF-8, a simple value other than false/true/null;
- NonDeterministicCBOR: a head longer than needed, an indefinite length, map keys not in
  bytewise order, a float that a shorter float represents exactly, a non-canonical NaN;
- DuplicateMapKey: a map key repeated;
- OversizeInput: input, nesting depth or item count beyond the caller's limits.

Supported: unsigned/negative ints, byte and text strings, arrays, maps, tags (returned as
:class:`Tag`), false/true/null, half/single/double floats. Nothing else is needed here.

Fast path (``loads``): the pure-Python decoder costs ~1.5 us per item, most of a fleet
ingest's time per envelope. So ``loads`` first decodes with cbor2's C decoder and accepts
the result only when (1) it holds nothing but this module's value set within the caller's
depth and item limits, and (2) ``dumps`` of it gives back exactly the input bytes. That is
exact, not a heuristic: ``dumps`` only produces bytes that :func:`strict_loads` accepts and
decodes to the same value (``test_dumps_never_produces_what_loads_refuses``), so input equal
to ``dumps(v)`` is input the strict decoder would have returned ``v`` for. Anything else,
including every error, goes to :func:`strict_loads`, which stays the authority and says why
(``test_fast_path_equals_strict`` checks valid, mutated and non-canonical inputs).
The fast path is tried only up to FAST_MAX_BYTES: cbor2 decodes semantic tags (rationals,
bigfloats, decimal fractions of bignums) with big-number arithmetic that is quadratic in
their size (measured: two 80 kB bignums in a rational tag take 0.6 s), while the strict
decoder is linear. At 16 KiB that worst case (~25 ms) is no worse than the strict
decoder's own on 16 KiB of one-byte items (~25 ms), so hostile input gains nothing by it.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import cbor2

from agent.errors import (
    DuplicateMapKey,
    MalformedCBOR,
    NonDeterministicCBOR,
    OversizeInput,
)

DEFAULT_MAX_BYTES = 1 << 20
DEFAULT_MAX_DEPTH = 16
DEFAULT_MAX_ITEMS = 100_000


@dataclass(frozen=True, slots=True)
class Tag:
    tag: int
    value: object


INT_MIN, INT_MAX = -(1 << 64), (1 << 64) - 1  # major types 0/1; beyond: a bignum tag
_SCALARS = (str, bytes, bool, float, type(None))


def dumps(value: object) -> bytes:
    """Deterministic encoding of a value ``loads`` gives back unchanged. Maps must use keys
    of one major type (see module doc); ValueError for anything outside the value set."""
    if _check(value, 0):
        return cbor2.dumps(_encodable(value), canonical=True, default=_write_half)
    return cbor2.dumps(value, canonical=True)


def _long_half(value: float) -> bool:
    """cbor2's canonical encoder writes the float16 values of magnitude 2**15..65504 as
    float32 (measured on cbor2 5.9: all 2,048 of them), which RFC 8949 s4.2.1 forbids and
    the strict decoder refuses; dumps writes those itself."""
    return 32768.0 <= abs(value) <= 65504.0 and _fits_half(value)


class _Half:
    __slots__ = ("value",)

    def __init__(self, value: float) -> None:
        self.value = value


def _write_half(encoder: cbor2.CBOREncoder, value: object) -> None:
    """cbor2's ``default`` hook (public API: CBOREncoder.write) for what _encodable made."""
    if not isinstance(value, _Half):
        raise ValueError(f"{type(value).__name__} is not a CBOR value of this project")
    encoder.write(b"\xf9" + struct.pack(">e", value.value))


def _encodable(value: object) -> object:
    """A copy cbor2 can encode canonically: Tag -> CBORTag, the floats of _long_half ->
    _Half. Only called when _check found one of them."""
    if isinstance(value, float):
        return _Half(value) if _long_half(value) else value
    if isinstance(value, list | tuple):
        return [_encodable(item) for item in value]
    if isinstance(value, dict):
        return {key: _encodable(item) for key, item in value.items()}
    if isinstance(value, Tag):
        return cbor2.CBORTag(value.tag, _encodable(value.value))
    return value


def _major(key: object) -> int:
    if isinstance(key, bool) or not isinstance(key, int | str | bytes):
        raise ValueError(f"map key {key!r}: only ints, text and bytes are map keys here")
    if isinstance(key, int):
        return 0 if key >= 0 else 1
    return 3 if isinstance(key, str) else 2


def _check(value: object, depth: int) -> bool:
    """The rules of the module docstring, walked once (~1 us per ten scalars). True when
    the value needs :func:`_encodable` first (a tag, or a float of :func:`_long_half`)."""
    if depth > DEFAULT_MAX_DEPTH:
        raise ValueError(f"nesting deeper than {DEFAULT_MAX_DEPTH}")
    if isinstance(value, float):
        return _long_half(value)
    if isinstance(value, _SCALARS):
        return False
    special = False
    if isinstance(value, int):
        if not INT_MIN <= value <= INT_MAX:
            raise ValueError(f"integer {value} needs a bignum tag (RFC 8949 s3.4.3)")
    elif isinstance(value, list | tuple):
        for item in value:
            kind = type(item)  # exact types inline (a reading is mostly str and int)
            if kind is str or kind is bytes:
                continue
            if kind is int:
                if not INT_MIN <= item <= INT_MAX:
                    raise ValueError(f"integer {item} needs a bignum tag (RFC 8949 s3.4.3)")
            elif kind is float:
                special = special or _long_half(item)
            elif not isinstance(item, _SCALARS):
                special = _check(item, depth + 1) or special
    elif isinstance(value, dict):
        if len({_major(k) for k in value}) > 1:
            raise ValueError(f"map keys of mixed major types: {sorted(map(repr, value))}")
        for key, item in value.items():
            _check(key, depth + 1)
            special = _check(item, depth + 1) or special
    elif isinstance(value, Tag):
        _check(value.value, depth + 1)
        special = True
    else:
        raise ValueError(f"{type(value).__name__} is not a CBOR value of this project")
    return special


def loads(data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES, max_depth: int = DEFAULT_MAX_DEPTH,
          max_items: int = DEFAULT_MAX_ITEMS) -> object:
    """Decode exactly one deterministic CBOR item filling all of ``data`` (the fast path of
    the module docstring, then :func:`strict_loads`)."""
    if isinstance(data, bytes) and len(data) <= min(max_bytes, FAST_MAX_BYTES):
        value = fast_loads(data, max_depth, max_items)
        if value is not MISS:
            return value
    return strict_loads(data, max_bytes=max_bytes, max_depth=max_depth, max_items=max_items)


def strict_loads(data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES,
                 max_depth: int = DEFAULT_MAX_DEPTH, max_items: int = DEFAULT_MAX_ITEMS) -> object:
    """The pure-Python strict decoder alone (the authority; ``loads`` is what callers use)."""
    value, end = loads_prefix(data, max_bytes=max_bytes, max_depth=max_depth, max_items=max_items)
    if end != len(data):
        raise MalformedCBOR(f"{len(data) - end} trailing bytes after the item", offset=end)
    return value


FAST_MAX_BYTES = 16 * 1024
MISS = object()
"""What :func:`fast_loads` returns when the strict decoder must decide."""


class _Miss(Exception):
    pass


def fast_loads(data: bytes, max_depth: int = DEFAULT_MAX_DEPTH,
               max_items: int = DEFAULT_MAX_ITEMS) -> object:
    """cbor2's C decoder, accepted only under the two conditions of the module docstring;
    :data:`MISS` otherwise (never an error: the strict decoder gives the reason)."""
    try:
        item = cbor2.loads(data)
    except Exception:  # noqa: BLE001 - any cbor2 failure: the strict decoder says why
        return MISS
    scan = _Scan(max_depth)
    try:
        scan.item(item, 0)
    except _Miss:
        return MISS
    if scan.items > max_items:
        return MISS
    try:
        if cbor2.dumps(item, canonical=True) != data:
            return MISS
    except Exception:  # noqa: BLE001 - cannot re-encode: not one of our values
        return MISS
    return _with_our_tags(item) if scan.tags else item


_FAST_SCALARS: tuple[type, ...] = (str, bytes, bool, type(None))


class _Scan:
    """Walks what cbor2 decoded: counts items as strict_loads counts them, and raises _Miss
    for anything outside the value set or the depth limit. Types are compared exactly
    (cbor2's own types subclass int or tuple); ints beyond 64 bits miss (cbor2 made them
    from bignum tags, which strict_loads returns as tags); map keys must share one major
    type, so that cbor2's length-first canonical order is RFC 8949's bytewise order (the
    ``dumps`` rule); the floats of :func:`_long_half` miss (cbor2 writes them long).
    Scalars in containers are checked inline: this walk is a third of the fast path."""

    __slots__ = ("max_depth", "items", "tags")

    def __init__(self, max_depth: int) -> None:
        self.max_depth, self.items, self.tags = max_depth, 0, False

    def scalar(self, item: object) -> None:
        kind = type(item)
        if kind is int:
            if not INT_MIN <= item <= INT_MAX:  # type: ignore[operator]  # kind is int
                raise _Miss
        elif kind is float:
            if 32768.0 <= abs(item) <= 65504.0:  # type: ignore[arg-type]  # kind is float
                raise _Miss  # maybe a float16 cbor2 writes long: strict decides
        elif kind not in _FAST_SCALARS:
            raise _Miss  # a semantic type cbor2 made (datetime, Decimal, simple value, ...)

    def item(self, item: object, depth: int) -> None:
        if depth > self.max_depth:
            raise _Miss
        self.items += 1
        kind = type(item)
        if kind is list:
            for element in item:  # type: ignore[attr-defined]  # kind is list
                if type(element) in _CONTAINERS:
                    self.item(element, depth + 1)
                else:
                    if depth + 1 > self.max_depth:
                        raise _Miss
                    self.items += 1
                    self.scalar(element)
        elif kind is dict:
            self.map(item, depth)  # type: ignore[arg-type]  # kind is dict
        elif kind is cbor2.CBORTag:
            self.tags = True
            self.item(item.value, depth + 1)  # type: ignore[attr-defined]  # kind is CBORTag
        else:
            self.scalar(item)

    def map(self, item: dict[object, object], depth: int) -> None:
        if item and depth + 1 > self.max_depth:
            raise _Miss
        majors = set()
        for key, element in item.items():
            kind = type(key)
            if kind is int:
                if not INT_MIN <= key <= INT_MAX:  # type: ignore[operator]  # kind is int
                    raise _Miss
                majors.add(0 if key >= 0 else 1)  # type: ignore[operator]  # kind is int
            elif kind is str or kind is bytes:
                majors.add(3 if kind is str else 2)
            else:
                raise _Miss  # bool, float, null, array or map keys: the strict decoder decides
            self.items += 1
            self.item(element, depth + 1)
        if len(majors) > 1:
            raise _Miss


_CONTAINERS = (list, dict, cbor2.CBORTag)


def _with_our_tags(item: object) -> object:
    """cbor2.CBORTag -> :class:`Tag`, everywhere (what strict_loads returns)."""
    if isinstance(item, list):
        return [_with_our_tags(element) for element in item]
    if isinstance(item, dict):
        return {key: _with_our_tags(element) for key, element in item.items()}
    if isinstance(item, cbor2.CBORTag):
        return Tag(item.tag, _with_our_tags(item.value))
    return item


def loads_prefix(data: bytes, offset: int = 0, *, max_bytes: int = DEFAULT_MAX_BYTES,
                 max_depth: int = DEFAULT_MAX_DEPTH,
                 max_items: int = DEFAULT_MAX_ITEMS) -> tuple[object, int]:
    """Decode one item starting at ``offset``; return it and the offset after it (for
    CBOR sequences, RFC 8742). Only the item's own bytes count against ``max_bytes``."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise MalformedCBOR("input is not bytes")
    view = bytes(data)
    decoder = _Decoder(view, offset, max_depth, max_items)
    value = decoder.item(0)
    if decoder.pos - offset > max_bytes:
        raise OversizeInput(f"item is {decoder.pos - offset} bytes, limit {max_bytes}",
                            offset=offset)
    return value, decoder.pos


class _Decoder:
    __slots__ = ("data", "pos", "max_depth", "items_left")

    def __init__(self, data: bytes, pos: int, max_depth: int, max_items: int) -> None:
        self.data, self.pos, self.max_depth, self.items_left = data, pos, max_depth, max_items

    def _take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise MalformedCBOR(f"truncated at offset {self.pos}: an item declares {n} "
                                f"bytes, {len(self.data) - self.pos} remain", offset=self.pos)
        chunk = self.data[self.pos:end]
        self.pos = end
        return chunk

    def _head(self) -> tuple[int, int, int]:
        """Return (major type, additional info, argument), checking shortest form."""
        start = self.pos
        initial = self._take(1)[0]
        major, info = initial >> 5, initial & 0x1F
        if info < 24:
            return major, info, info
        if info > 27:
            if info == 31:
                if major in (2, 3, 4, 5):
                    raise NonDeterministicCBOR("indefinite length", offset=start)
                raise MalformedCBOR("unexpected break or reserved head", offset=start)
            raise MalformedCBOR(f"reserved additional info {info}", offset=start)
        size = 1 << (info - 24)
        argument = int.from_bytes(self._take(size), "big")
        if major != 7 and argument < (24 if size == 1 else 1 << (4 * size)):
            raise NonDeterministicCBOR("integer or length not in its shortest form",
                                       offset=start)
        return major, info, argument

    def item(self, depth: int) -> object:
        if depth > self.max_depth:
            raise OversizeInput(f"nesting deeper than {self.max_depth}", offset=self.pos)
        self.items_left -= 1
        if self.items_left < 0:
            raise OversizeInput("too many items", offset=self.pos)
        start = self.pos
        major, info, arg = self._head()
        if major == 0:
            return arg
        if major == 1:
            return -1 - arg
        if major == 2:
            return self._take(arg)
        if major == 3:
            raw = self._take(arg)
            try:
                return raw.decode("utf-8")
            except UnicodeDecodeError:
                raise MalformedCBOR("invalid UTF-8 in text string", offset=start) from None
        if major == 4:
            if arg > self.items_left:
                raise OversizeInput("array longer than the item limit", offset=start)
            return [self.item(depth + 1) for _ in range(arg)]
        if major == 5:
            return self._map(arg, depth, start)
        if major == 6:
            return Tag(arg, self.item(depth + 1))
        return self._simple(info, arg, start)

    def _map(self, count: int, depth: int, start: int) -> dict[object, object]:
        if 2 * count > self.items_left:
            raise OversizeInput("map longer than the item limit", offset=start)
        result: dict[object, object] = {}
        previous_key: bytes | None = None
        for _ in range(count):
            key_start = self.pos
            key = self.item(depth + 1)
            key_bytes = self.data[key_start:self.pos]
            if previous_key is not None and key_bytes <= previous_key:
                if key_bytes == previous_key:
                    raise DuplicateMapKey(f"map key {key!r} repeated", offset=key_start)
                raise NonDeterministicCBOR("map keys not in bytewise order", offset=key_start)
            previous_key = key_bytes
            if isinstance(key, list | dict | Tag):
                raise MalformedCBOR("map key is not a scalar", offset=key_start)
            result[key] = self.item(depth + 1)
        return result

    def _simple(self, info: int, arg: int, start: int) -> object:
        if info < 24:
            simple = {20: False, 21: True, 22: None}
            if arg in simple:
                return simple[arg]
            raise MalformedCBOR(f"unsupported simple value {arg}", offset=start)
        if info == 24:
            raise MalformedCBOR(f"unsupported simple value {arg}", offset=start)
        if info == 25:
            value = struct.unpack(">e", arg.to_bytes(2, "big"))[0]
            if math.isnan(value) and arg != 0x7E00:
                raise NonDeterministicCBOR("non-canonical NaN", offset=start)
            return value
        if info == 26:
            value = struct.unpack(">f", arg.to_bytes(4, "big"))[0]
            if _fits_half(value):
                raise NonDeterministicCBOR("float32 that fits float16", offset=start)
            return value
        value = struct.unpack(">d", arg.to_bytes(8, "big"))[0]
        if _fits_single(value):
            raise NonDeterministicCBOR("float64 that fits float32", offset=start)
        return value


def _fits_half(value: float) -> bool:
    if math.isnan(value):
        return True
    try:
        return bool(struct.unpack(">e", struct.pack(">e", value))[0] == value)
    except OverflowError:
        return False


def _fits_single(value: float) -> bool:
    if math.isnan(value):
        return True
    try:
        return bool(struct.unpack(">f", struct.pack(">f", value))[0] == value)
    except OverflowError:
        return False
