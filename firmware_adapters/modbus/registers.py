"""Meter register maps and register decoding (sans-I/O).

Scope: turn a meter model's published register map (a TOML file under ``maps/``, or a table
in config) into frozen :class:`RegisterSpec` values, plan the fewest contiguous block reads
that cover them, and decode the 16-bit registers a block read returns into integer readings
(Wh, W, mV, mA, mHz, thousandths) named by OBIS code.

Rules:

- No I/O, no clocks, no asyncio: registers in, integers out. The driver moves the bytes.
- Modbus sends each register big-endian (Modbus Application Protocol v1.1b3 s4.2); how a
  32/64-bit value is split over registers is the vendor's choice. ``word_order = "big"``
  means the most significant register comes first (Eastron, ABB); ``"little"`` means the
  least significant comes first (Carlo Gavazzi "LSW first"). ``byte_order = "little"``
  swaps the two bytes inside each register (some gateways do).
- ``scale`` is exact (a decimal string or integer, held as a Fraction): value in the target
  unit = raw x scale, rounded half-to-even to an integer. Floats are widened exactly
  (``Fraction(float)``) before scaling, so no binary rounding error creeps in.
- Every name must be a METER_SIGNALS entry and the unit is taken from there, so a typo in
  a map fails when the map is loaded, not in the field.
- Hostile input raises :class:`DecodeError` (wrong register count, a register out of
  0..65535, a NaN or infinite float) and nothing else.
- "Not available" is data, not an error: a register holding one of its map's documented
  sentinels (ABB's all-ones, SunSpec's 0x8000 "not implemented"), a NaN/infinite float, or
  a value whose scale-factor register holds a sentinel, decodes to a reason in
  :attr:`Snapshot.unavailable` and no value (:func:`decode_snapshot`).
- Scale-factor registers (SunSpec ``*_SF``, Iskra's energy exponents): ``scale_from``
  names an int16 register holding a power of ten; value = raw x scale x 10^sf. The planner
  reads those registers in the same blocks as the values.
- Iskra's T5/T6 formats (WM3M4 user manual, "data types"): 32 bits, the top byte a signed
  decimal exponent, the low 24 bits an unsigned (T5) or signed (T6) mantissa.
"""

from __future__ import annotations

import math
import struct
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from fractions import Fraction
from typing import Literal

from agent.errors import DecodeError
from agent.readings import METER_SIGNALS

# Modbus Application Protocol v1.1b3 s6.3/s6.4: at most 125 registers per read (FC 3/4).
MAX_REGISTERS_PER_READ = 125
NOT_A_NUMBER, SENTINEL, SCALE_UNAVAILABLE = "not-a-number", "sentinel", "scale-unavailable"
MIN_EXPONENT, MAX_EXPONENT = -10, 10  # decimal exponents a meter plausibly uses
FUNCTION_HOLDING = 3
FUNCTION_INPUT = 4
FLOAT32_MAX = struct.unpack(">f", b"\x7f\x7f\xff\xff")[0]


class DataType(StrEnum):
    UINT16 = "uint16"
    INT16 = "int16"
    UINT32 = "uint32"
    INT32 = "int32"
    UINT64 = "uint64"
    INT64 = "int64"
    FLOAT32 = "float32"
    FLOAT64 = "float64"
    T5 = "t5"  # Iskra: int8 decimal exponent, 24-bit unsigned mantissa
    T6 = "t6"  # Iskra: int8 decimal exponent, 24-bit signed mantissa

    @property
    def words(self) -> int:
        return _LAYOUT[self][0]

    @property
    def struct_code(self) -> str:
        return _LAYOUT[self][1]

    @property
    def is_float(self) -> bool:
        return self in (DataType.FLOAT32, DataType.FLOAT64)

    @property
    def is_exponent(self) -> bool:
        return self in (DataType.T5, DataType.T6)


_LAYOUT: dict[DataType, tuple[int, str]] = {
    DataType.UINT16: (1, "H"), DataType.INT16: (1, "h"),
    DataType.UINT32: (2, "I"), DataType.INT32: (2, "i"),
    DataType.UINT64: (4, "Q"), DataType.INT64: (4, "q"),
    DataType.FLOAT32: (2, "f"), DataType.FLOAT64: (4, "d"),
    DataType.T5: (2, "I"), DataType.T6: (2, "I"),
}


class Order(StrEnum):
    BIG = "big"
    LITTLE = "little"


Raw = int | float | Fraction


@dataclass(frozen=True, slots=True)
class RegisterSpec:
    """One quantity of a meter: where it lives and how to turn its registers into an int."""

    name: str
    function: int
    address: int
    dtype: DataType
    scale: Fraction = Fraction(1)
    word_order: Order = Order.BIG
    byte_order: Order = Order.BIG
    scale_from: int | None = None
    sentinels: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        if self.name not in METER_SIGNALS:
            raise ValueError(f"{self.name!r} is not a METER_SIGNALS name")
        if self.function not in (FUNCTION_HOLDING, FUNCTION_INPUT):
            raise ValueError(f"{self.name}: function must be 3 or 4, got {self.function}")
        if not 0 <= self.address <= 0xFFFF - self.dtype.words + 1:
            raise ValueError(f"{self.name}: address {self.address} out of 0..65535")
        if not isinstance(self.scale, Fraction) or self.scale <= 0:
            raise ValueError(f"{self.name}: scale must be a positive Fraction")
        if self.scale_from is not None and not 0 <= self.scale_from <= 0xFFFF:
            raise ValueError(f"{self.name}: scale_from {self.scale_from} out of 0..65535")
        if any(not 0 <= s < 1 << (16 * self.dtype.words) for s in self.sentinels):
            raise ValueError(f"{self.name}: a sentinel does not fit {self.dtype.value}")

    @property
    def count(self) -> int:
        return self.dtype.words

    @property
    def unit(self) -> str:
        return METER_SIGNALS[self.name].unit

    @property
    def end(self) -> int:
        """One past the last register."""
        return self.address + self.count


class IdentityKind(StrEnum):
    UINT16 = "uint16"
    UINT32 = "uint32"
    ASCII = "ascii"  # two characters per register, high byte first
    CHAR = "char"    # one character per register, in the low byte (Carlo Gavazzi 5000h)


@dataclass(frozen=True, slots=True)
class IdentityField:
    """Where a meter states who it is (serial number, model): read once per connection,
    never per poll. ``match``: what makes ``map = "auto"`` pick this map: prefixes of the
    model text (ascii, char), or the exact decimal model codes (uint16, uint32)."""

    function: int
    address: int
    kind: IdentityKind
    count: int
    match: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.function not in (FUNCTION_HOLDING, FUNCTION_INPUT) \
                or not 1 <= self.count <= 32 or not 0 <= self.address <= 0xFFFF - self.count:
            raise ValueError("identity register: function 3|4, count 1..32, address in range")

    def decode(self, words: Sequence[int]) -> str:
        """The text a meter's identity registers hold; only [A-Za-z0-9._-] survive, so a
        garbled register can never inject anything into a reading's meter field."""
        if len(words) != self.count or any(not 0 <= w <= 0xFFFF for w in words):
            raise DecodeError("identity registers malformed", reason="short-read")
        if self.kind is IdentityKind.UINT16:
            return str(words[0])
        if self.kind is IdentityKind.UINT32:
            return str((words[0] << 16) | words[1])
        if self.kind is IdentityKind.CHAR:
            text = "".join(chr(w & 0xFF) for w in words)
        else:
            text = b"".join(w.to_bytes(2, "big") for w in words).decode("latin-1")
        return "".join(c for c in text if c.isascii() and (c.isalnum() or c in "._-"))[:32]

    def matches(self, text: str) -> bool:
        """Whether a decoded identity names this map's model: a code equals one of
        ``match``; a text starts with one (a code 341 must not match 3410)."""
        if self.kind in (IdentityKind.UINT16, IdentityKind.UINT32):
            return text in self.match
        return any(text.startswith(prefix) for prefix in self.match)


@dataclass(frozen=True, slots=True)
class Limits:
    """The meter's physical range (its datasheet): a value outside is flagged implausible,
    never published as truth. Units as in METER_SIGNALS."""

    max_voltage_mv: int = 300_000          # L-N; 230 V + 30 %
    max_current_ma: int = 0                # 0: derived from rated power (see MeterMap)
    max_energy_wh: int = 10**12            # 1 TWh: above that a counter is a glitch
    frequency_mhz: tuple[int, int] = (45_000, 65_000)


@dataclass(frozen=True, slots=True)
class MeterMap:
    """A meter model's register map. ``rated_power_w`` bounds the plausibility check;
    ``max_read`` (the meter's documented per-request limit) and ``max_gap`` shape block
    planning (some meters cap a read below the protocol's 125 registers, some reject reads
    that span unmapped registers); ``serial`` / ``model_id`` are its identity registers."""

    model: str
    document: str
    registers: tuple[RegisterSpec, ...]
    rated_power_w: int
    max_read: int = MAX_REGISTERS_PER_READ
    max_gap: int = 16
    serial: IdentityField | None = None
    model_id: IdentityField | None = None
    limits: Limits = Limits()
    extra_holding: tuple[tuple[int, int], ...] = ()  # (address, count) served besides

    def __post_init__(self) -> None:
        names = [spec.name for spec in self.registers]
        if not names:
            raise ValueError(f"{self.model}: a map needs at least one register")
        if len(set(names)) != len(names):
            raise ValueError(f"{self.model}: a name appears twice")
        if not 1 <= self.max_read <= MAX_REGISTERS_PER_READ:
            raise ValueError(f"{self.model}: max_read must be 1..125")
        if self.max_gap < 0 or self.rated_power_w <= 0:
            raise ValueError(f"{self.model}: max_gap >= 0 and rated_power_w > 0 required")
        if any(spec.count > self.max_read for spec in self.registers):
            raise ValueError(f"{self.model}: a register is wider than max_read")

    def spec(self, name: str) -> RegisterSpec:
        for spec in self.registers:
            if spec.name == name:
                return spec
        raise KeyError(name)

    def resolution(self, name: str) -> Fraction:
        """Smallest step of a quantity in its unit (0 for floats: relative precision)."""
        spec = self.spec(name)
        return Fraction(0) if spec.dtype.is_float or spec.scale_from is not None \
            else spec.scale

    @property
    def max_current_ma(self) -> int:
        """The datasheet's, or one phase carrying the whole rated power at 230 V + 20 %."""
        return self.limits.max_current_ma or self.rated_power_w * 1000 * 6 // (230 * 5)

    def scale_registers(self) -> tuple[tuple[int, int], ...]:
        """(function, address) of every scale-factor register the map's values use."""
        return tuple(sorted({(s.function, s.scale_from) for s in self.registers
                             if s.scale_from is not None}))


# --------------------------------------------------------------------------- decoding


def registers_to_raw(spec: RegisterSpec, words: Sequence[int]) -> Raw:
    """The raw number the registers hold, before scaling."""
    if len(words) != spec.count:
        raise DecodeError(f"{spec.name}: expected {spec.count} registers, got {len(words)}",
                          reason="register-count")
    data = bytearray()
    ordered = words if spec.word_order is Order.BIG else list(reversed(words))
    for word in ordered:
        if isinstance(word, bool) or not isinstance(word, int) or not 0 <= word <= 0xFFFF:
            raise DecodeError(f"{spec.name}: register value {word!r} out of 0..65535",
                              reason="register-range")
        data += word.to_bytes(2, "big" if spec.byte_order is Order.BIG else "little")
    (unpacked,) = struct.unpack(">" + spec.dtype.struct_code, bytes(data))
    raw: int | float = unpacked
    if isinstance(raw, float) and not math.isfinite(raw):
        raise DecodeError(f"{spec.name}: not a number ({raw!r})", reason=NOT_A_NUMBER)
    if spec.dtype.is_exponent and isinstance(raw, int):
        exponent = ((raw >> 24) ^ 0x80) - 0x80
        mantissa = raw & 0xFFFFFF
        if spec.dtype is DataType.T6 and mantissa & 0x800000:
            mantissa -= 1 << 24
        return Fraction(mantissa) * Fraction(10) ** exponent
    return raw


def registers_as_unsigned(spec: RegisterSpec, words: Sequence[int]) -> int:
    """The registers as one unsigned number in the spec's word order (how sentinels are
    written in a map: ABB's 0xFFFFFFFF, SunSpec's 0x8000)."""
    ordered = words if spec.word_order is Order.BIG else list(reversed(words))
    value = 0
    for word in ordered:
        value = (value << 16) | word
    return value


def scale_raw(spec: RegisterSpec, raw: Raw, exponent: int = 0) -> int:
    """raw x scale (x 10^exponent), exactly, rounded half-to-even to an integer in the
    spec's unit."""
    if isinstance(raw, int) and spec.scale.denominator == 1 and exponent == 0:
        return raw * spec.scale.numerator  # the common case, without Fraction arithmetic
    value = Fraction(raw) * spec.scale
    return round(value * Fraction(10) ** exponent if exponent else value)


def decode(spec: RegisterSpec, words: Sequence[int], exponent: int = 0) -> int:
    """One quantity (``exponent``: its scale-factor register, when it has one)."""
    return scale_raw(spec, registers_to_raw(spec, words), exponent)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One meter read: the values, and why the others are not available."""

    values: dict[str, int]
    unavailable: dict[str, str]


def decode_snapshot(meter_map: MeterMap, words: Mapping[tuple[int, int], int]) -> Snapshot:
    """Decode every quantity of the map from the registers read ((function, address) ->
    word, as :meth:`Block.decode` returns them). DecodeError if a register is missing."""
    values: dict[str, int] = {}
    unavailable: dict[str, str] = {}
    for spec in meter_map.registers:
        regs = [_word(words, spec.function, spec.address + i) for i in range(spec.count)]
        if spec.sentinels and registers_as_unsigned(spec, regs) in spec.sentinels:
            unavailable[spec.name] = SENTINEL
            continue
        exponent = 0
        if spec.scale_from is not None:
            sf = _word(words, spec.function, spec.scale_from)
            exponent = (sf ^ 0x8000) - 0x8000  # int16
            if sf == 0x8000 or not MIN_EXPONENT <= exponent <= MAX_EXPONENT:
                unavailable[spec.name] = SCALE_UNAVAILABLE  # SunSpec: sunssf 0x8000
                continue
        try:
            values[spec.name] = decode(spec, regs, exponent)
        except DecodeError as exc:
            if exc.reason != NOT_A_NUMBER:
                raise
            unavailable[spec.name] = NOT_A_NUMBER
    return Snapshot(values, unavailable)


def _word(words: Mapping[tuple[int, int], int], function: int, address: int) -> int:
    try:
        return words[(function, address)]
    except KeyError:
        raise DecodeError(f"register {function}/{address} was not read",
                          reason="short-read") from None


def raw_to_registers(spec: RegisterSpec, raw: Raw) -> list[int]:
    """Inverse of :func:`registers_to_raw` (used by the meter simulator and the tests)."""
    if spec.dtype.is_exponent:
        raw = _exponent_pack(spec, Fraction(raw))
    try:
        data = struct.pack(">" + spec.dtype.struct_code, raw)
    except struct.error as exc:
        raise ValueError(f"{spec.name}: {raw!r} does not fit {spec.dtype.value}") from exc
    order: Literal["big", "little"] = "big" if spec.byte_order is Order.BIG else "little"
    words = [int.from_bytes(data[i:i + 2], order) for i in range(0, len(data), 2)]
    return words if spec.word_order is Order.BIG else list(reversed(words))


def _exponent_pack(spec: RegisterSpec, raw: Fraction) -> int:
    """T5/T6: the smallest exponent whose mantissa is exact and fits 24 bits."""
    low, high = (0, (1 << 24) - 1) if spec.dtype is DataType.T5 else (-(1 << 23), (1 << 23) - 1)
    for exponent in range(-6, 100):
        mantissa = raw / Fraction(10) ** exponent
        if mantissa.denominator == 1 and low <= mantissa <= high:
            return ((exponent & 0xFF) << 24) | (int(mantissa) & 0xFFFFFF)
    raise ValueError(f"{spec.name}: {raw} does not fit {spec.dtype.value}")


def raw_for_value(spec: RegisterSpec, value: int, exponent: int = 0) -> Raw:
    """The raw number a meter would hold for ``value`` (in the spec's unit), quantised to
    the register's resolution and clamped to its type's range."""
    exact = Fraction(value) / spec.scale / Fraction(10) ** exponent
    if spec.dtype.is_exponent:
        # 3 decimals kept, as the WM3M4 shows them; fewer when the mantissa would overflow
        for digits in (3, 2, 1, 0, -1, -2, -3):
            step = Fraction(10) ** digits
            quantised = Fraction(round(exact * step)) / step
            if abs(quantised * step) < 1 << 23:
                return max(quantised, Fraction(0)) if spec.dtype is DataType.T5 else quantised
        return Fraction(0)
    if spec.dtype.is_float:
        code = spec.dtype.struct_code
        largest = FLOAT32_MAX if spec.dtype is DataType.FLOAT32 else sys.float_info.max
        wide = min(max(float(exact), -largest), largest)
        narrowed: float = struct.unpack(">" + code, struct.pack(">" + code, wide))[0]
        return narrowed
    bits = spec.dtype.words * 16
    signed = spec.dtype.value.startswith("int")
    low, high = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    return min(max(round(exact), low), high)


# --------------------------------------------------------------------------- planning


@dataclass(frozen=True, slots=True)
class Block:
    """One read request: ``count`` registers from ``address`` with ``function``."""

    function: int
    address: int
    count: int
    specs: tuple[RegisterSpec, ...]

    def decode(self, words: Sequence[int]) -> dict[tuple[int, int], int]:
        """The reply as (function, address) -> register; DecodeError if it has the wrong
        length or a register out of 0..65535 (the input to :func:`decode_snapshot`)."""
        if len(words) != self.count:
            raise DecodeError(f"block {self.function}/{self.address}: expected {self.count} "
                              f"registers, got {len(words)}", reason="short-read")
        out = {}
        for offset, word in enumerate(words):
            if isinstance(word, bool) or not isinstance(word, int) or not 0 <= word <= 0xFFFF:
                raise DecodeError(f"register value {word!r} out of 0..65535",
                                  reason="register-range")
            out[(self.function, self.address + offset)] = word
        return out


def plan_blocks(meter_map: MeterMap) -> tuple[Block, ...]:
    """Fewest contiguous reads covering every register of the map (and the scale-factor
    registers its values use).

    Registers are grouped per function code and sorted; the next register joins the
    current block when the gap is at most ``max_gap`` registers and the block stays within
    ``max_read``. Reading a few unused registers (2 bytes each on the wire) is cheaper than
    a new transaction (8 request bytes, a 5-byte reply header and two 3.5-character silent
    intervals on RTU).
    """
    blocks: list[Block] = []
    scale = meter_map.scale_registers()
    for function in (FUNCTION_HOLDING, FUNCTION_INPUT):
        items = sorted([(s.address, s.end, s) for s in meter_map.registers
                        if s.function == function]
                       + [(a, a + 1, None) for f, a in scale if f == function
                          and not any(s.address <= a < s.end for s in meter_map.registers
                                      if s.function == f)],
                       key=lambda item: item[0])
        current: list[tuple[int, int, RegisterSpec | None]] = []
        for item in items:
            address, end, spec = item
            if current:
                start, last = current[0][0], max(i[1] for i in current)
                if address < last:
                    name = spec.name if spec else f"scale register {address}"
                    raise ValueError(f"{meter_map.model}: {name} overlaps another register")
                if address - last <= meter_map.max_gap and end - start <= meter_map.max_read:
                    current.append(item)
                    continue
                blocks.append(_block(function, current))
            current = [item]
        if current:
            blocks.append(_block(function, current))
    return tuple(blocks)


def _block(function: int, items: list[tuple[int, int, RegisterSpec | None]]) -> Block:
    start = items[0][0]
    return Block(function, start, max(i[1] for i in items) - start,
                 tuple(spec for _, _, spec in items if spec is not None))


