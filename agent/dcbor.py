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
    _check(value, 0)
    if isinstance(value, Tag):
        value = cbor2.CBORTag(value.tag, value.value)
    return cbor2.dumps(value, canonical=True)


def _major(key: object) -> int:
    if isinstance(key, bool) or not isinstance(key, int | str | bytes):
        raise ValueError(f"map key {key!r}: only ints, text and bytes are map keys here")
    if isinstance(key, int):
        return 0 if key >= 0 else 1
    return 3 if isinstance(key, str) else 2


def _check(value: object, depth: int) -> None:
    """The rules of the module docstring, walked once (~1 us per ten scalars)."""
    if depth > DEFAULT_MAX_DEPTH:
        raise ValueError(f"nesting deeper than {DEFAULT_MAX_DEPTH}")
    if isinstance(value, _SCALARS):
        return
    if isinstance(value, int):
        if not INT_MIN <= value <= INT_MAX:
            raise ValueError(f"integer {value} needs a bignum tag (RFC 8949 s3.4.3)")
    elif isinstance(value, list | tuple):
        for item in value:
            if not isinstance(item, _SCALARS):
                _check(item, depth + 1)
    elif isinstance(value, dict):
        if len({_major(k) for k in value}) > 1:
            raise ValueError(f"map keys of mixed major types: {sorted(map(repr, value))}")
        for key, item in value.items():
            _check(key, depth + 1)
            _check(item, depth + 1)
    elif isinstance(value, Tag):
        _check(value.value, depth + 1)
    else:
        raise ValueError(f"{type(value).__name__} is not a CBOR value of this project")


def loads(data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES, max_depth: int = DEFAULT_MAX_DEPTH,
          max_items: int = DEFAULT_MAX_ITEMS) -> object:
    """Decode exactly one deterministic CBOR item filling all of ``data``."""
    value, end = loads_prefix(data, max_bytes=max_bytes, max_depth=max_depth, max_items=max_items)
    if end != len(data):
        raise MalformedCBOR(f"{len(data) - end} trailing bytes after the item", offset=end)
    return value


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
            raise MalformedCBOR(f"truncated: need {n} bytes at offset {self.pos}",
                                offset=self.pos)
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
