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
"""

from __future__ import annotations

import math
import struct
import sys
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from fractions import Fraction
from importlib import resources
from pathlib import Path

from agent.errors import ConfigError, DecodeError
from agent.readings import METER_SIGNALS

# Modbus Application Protocol v1.1b3 s6.3/s6.4: at most 125 registers per read (FC 3/4).
MAX_REGISTERS_PER_READ = 125
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

    @property
    def words(self) -> int:
        return _LAYOUT[self][0]

    @property
    def struct_code(self) -> str:
        return _LAYOUT[self][1]

    @property
    def is_float(self) -> bool:
        return self in (DataType.FLOAT32, DataType.FLOAT64)


_LAYOUT: dict[DataType, tuple[int, str]] = {
    DataType.UINT16: (1, "H"), DataType.INT16: (1, "h"),
    DataType.UINT32: (2, "I"), DataType.INT32: (2, "i"),
    DataType.UINT64: (4, "Q"), DataType.INT64: (4, "q"),
    DataType.FLOAT32: (2, "f"), DataType.FLOAT64: (4, "d"),
}


class Order(StrEnum):
    BIG = "big"
    LITTLE = "little"


Raw = int | float


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

    def __post_init__(self) -> None:
        if self.name not in METER_SIGNALS:
            raise ValueError(f"{self.name!r} is not a METER_SIGNALS name")
        if self.function not in (FUNCTION_HOLDING, FUNCTION_INPUT):
            raise ValueError(f"{self.name}: function must be 3 or 4, got {self.function}")
        if not 0 <= self.address <= 0xFFFF - self.dtype.words + 1:
            raise ValueError(f"{self.name}: address {self.address} out of 0..65535")
        if not isinstance(self.scale, Fraction) or self.scale <= 0:
            raise ValueError(f"{self.name}: scale must be a positive Fraction")

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


@dataclass(frozen=True, slots=True)
class MeterMap:
    """A meter model's register map. ``rated_power_w`` bounds the plausibility check;
    ``max_read`` and ``max_gap`` shape block planning (some meters cap a read below the
    protocol's 125 registers, some reject reads that span unmapped registers)."""

    model: str
    document: str
    registers: tuple[RegisterSpec, ...]
    rated_power_w: int
    max_read: int = MAX_REGISTERS_PER_READ
    max_gap: int = 16

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
        return Fraction(0) if spec.dtype.is_float else spec.scale


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
    (raw,) = struct.unpack(">" + spec.dtype.struct_code, bytes(data))
    if isinstance(raw, float) and not math.isfinite(raw):
        raise DecodeError(f"{spec.name}: not a number ({raw!r})", reason="not-a-number")
    return raw


def scale_raw(spec: RegisterSpec, raw: Raw) -> int:
    """raw x scale, exactly, rounded half-to-even to an integer in the spec's unit."""
    return round(Fraction(raw) * spec.scale)


def decode(spec: RegisterSpec, words: Sequence[int]) -> int:
    return scale_raw(spec, registers_to_raw(spec, words))


def raw_to_registers(spec: RegisterSpec, raw: Raw) -> list[int]:
    """Inverse of :func:`registers_to_raw` (used by the meter simulator and the tests)."""
    try:
        data = struct.pack(">" + spec.dtype.struct_code, raw)
    except struct.error as exc:
        raise ValueError(f"{spec.name}: {raw!r} does not fit {spec.dtype.value}") from exc
    order = "big" if spec.byte_order is Order.BIG else "little"
    words = [int.from_bytes(data[i:i + 2], order) for i in range(0, len(data), 2)]
    return words if spec.word_order is Order.BIG else list(reversed(words))


def raw_for_value(spec: RegisterSpec, value: int) -> Raw:
    """The raw number a meter would hold for ``value`` (in the spec's unit), quantised to
    the register's resolution and clamped to its type's range."""
    exact = Fraction(value) / spec.scale
    if spec.dtype.is_float:
        code = spec.dtype.struct_code
        largest = FLOAT32_MAX if spec.dtype is DataType.FLOAT32 else sys.float_info.max
        wide = min(max(float(exact), -largest), largest)
        return struct.unpack(">" + code, struct.pack(">" + code, wide))[0]
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

    def decode(self, words: Sequence[int]) -> dict[str, int]:
        """Every quantity of the block; DecodeError if the reply has the wrong length."""
        if len(words) != self.count:
            raise DecodeError(f"block {self.function}/{self.address}: expected {self.count} "
                              f"registers, got {len(words)}", reason="short-read")
        return {spec.name: decode(spec, words[spec.address - self.address:
                                              spec.end - self.address])
                for spec in self.specs}


def plan_blocks(meter_map: MeterMap) -> tuple[Block, ...]:
    """Fewest contiguous reads covering every register of the map.

    Registers are grouped per function code and sorted; the next register joins the
    current block when the gap is at most ``max_gap`` registers and the block stays within
    ``max_read``. Reading a few unused registers (2 bytes each on the wire) is cheaper than
    a new transaction (8 request bytes, a 5-byte reply header and two 3.5-character silent
    intervals on RTU).
    """
    blocks: list[Block] = []
    for function in (FUNCTION_HOLDING, FUNCTION_INPUT):
        specs = sorted((s for s in meter_map.registers if s.function == function),
                       key=lambda s: s.address)
        current: list[RegisterSpec] = []
        for spec in specs:
            if current:
                start, end = current[0].address, max(s.end for s in current)
                if spec.address < end:
                    raise ValueError(f"{meter_map.model}: {spec.name} overlaps another register")
                if spec.address - end <= meter_map.max_gap and \
                        spec.end - start <= meter_map.max_read:
                    current.append(spec)
                    continue
                blocks.append(_block(function, current))
            current = [spec]
        if current:
            blocks.append(_block(function, current))
    return tuple(blocks)


def _block(function: int, specs: list[RegisterSpec]) -> Block:
    start = specs[0].address
    return Block(function, start, max(s.end for s in specs) - start, tuple(specs))


# --------------------------------------------------------------------------- loading


def map_from_table(data: Mapping[str, object], where: str) -> MeterMap:
    """Build a map from its TOML form (a map file, or an inline ``map`` table in config);
    every problem is a ConfigError naming ``where`` and the key."""
    reader = _Reader(data, where, "")
    default_function = reader.int("function", FUNCTION_INPUT)
    word_order = reader.choice("word_order", "big", ("big", "little"))
    byte_order = reader.choice("byte_order", "big", ("big", "little"))
    specs = []
    rows = data.get("register", [])
    if not isinstance(rows, list) or not rows:
        raise ConfigError(file=where, key="register", expected="an array of tables",
                          found=rows)
    for index, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise ConfigError(file=where, key=f"register[{index}]", expected="a table",
                              found=row)
        item = _Reader(row, where, f"register[{index}]")
        try:
            specs.append(RegisterSpec(
                name=item.choice("name", None, tuple(METER_SIGNALS)),
                function=item.int("function", default_function),
                address=item.int("address", None),
                dtype=DataType(item.choice("type", None, tuple(t.value for t in DataType))),
                scale=item.fraction("scale", "1"),
                word_order=Order(item.choice("word_order", word_order, ("big", "little"))),
                byte_order=Order(item.choice("byte_order", byte_order, ("big", "little"))),
            ))
        except ValueError as exc:
            raise ConfigError(file=where, key=f"register[{index}]",
                              expected="a valid register", found=str(exc)) from None
    try:
        return MeterMap(model=reader.str("model", None), document=reader.str("document", ""),
                        registers=tuple(specs),
                        rated_power_w=reader.int("rated_power_w", None),
                        max_read=reader.int("max_read", MAX_REGISTERS_PER_READ),
                        max_gap=reader.int("max_gap", 16))
    except ValueError as exc:
        raise ConfigError(file=where, key="(map)", expected="a consistent register map",
                          found=str(exc)) from None


def builtin_maps() -> tuple[str, ...]:
    """Names of the maps shipped in ``firmware_adapters/modbus/maps`` (file stems)."""
    folder = resources.files(__package__).joinpath("maps")
    return tuple(sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".toml")))


def load_map(name_or_path: str) -> MeterMap:
    """A built-in map by name (``"sdm630"``) or a map file by path."""
    if name_or_path in builtin_maps():
        resource = resources.files(__package__).joinpath("maps", f"{name_or_path}.toml")
        text, where = resource.read_text(encoding="utf-8"), f"maps/{name_or_path}.toml"
    else:
        path = Path(name_or_path)
        if path.suffix != ".toml":
            raise ConfigError(key="map", expected=f"one of {', '.join(builtin_maps())} "
                              "or a .toml file", found=name_or_path)
        try:
            text, where = path.read_text(encoding="utf-8"), str(path)
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read map file ({exc.strerror})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: not valid TOML: {exc}") from None
    return map_from_table(data, where)


class _Reader:
    """Typed access to one TOML table (firmware_adapters may not import agent.config)."""

    def __init__(self, data: Mapping[str, object], where: str, prefix: str) -> None:
        self.data, self.where, self.prefix = data, where, prefix

    def _get(self, key: str, default: object) -> object:
        if key in self.data:
            return self.data[key]
        if default is None:
            raise self._error(key, "a value (the key is required)", None)
        return default

    def _error(self, key: str, expected: str, found: object) -> ConfigError:
        full = f"{self.prefix}.{key}" if self.prefix else key
        return ConfigError(file=self.where, key=full, expected=expected, found=found)

    def int(self, key: str, default: int | None) -> int:
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._error(key, "an integer", value)
        return value

    def str(self, key: str, default: str | None) -> str:
        value = self._get(key, default)
        if not isinstance(value, str):
            raise self._error(key, "a string", value)
        return value

    def choice(self, key: str, default: str | None, choices: tuple[str, ...]) -> str:
        value = self._get(key, default)
        if value not in choices:
            shown = ", ".join(choices) if len(choices) <= 8 else "a METER_SIGNALS name"
            raise self._error(key, f"one of {shown}", value)
        return value  # type: ignore[return-value]

    def fraction(self, key: str, default: str) -> Fraction:
        value = self._get(key, default)
        try:
            if isinstance(value, bool) or not isinstance(value, int | str):
                raise ValueError
            result = Fraction(value)
        except (ValueError, ZeroDivisionError):
            raise self._error(key, "a decimal string or integer > 0", value) from None
        if result <= 0:
            raise self._error(key, "a decimal string or integer > 0", value)
        return result
