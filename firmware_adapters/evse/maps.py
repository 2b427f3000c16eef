"""Charger register maps and their codec (sans-I/O).

Scope: turn a charge controller's published Modbus register description (a TOML file under
``maps/``, or a path) into a frozen :class:`ChargerMap`; plan the reads of one status poll;
decode the replies into a :class:`~firmware_adapters.evse.base.ChargerStatus`; and encode
the writes that enable/disable delivery and set the current limit.

Rules:

- No I/O, no clocks, no asyncio: registers in, values out; requests out as data
  (:class:`Read`, :class:`Write`). The driver (``modbus.py``) moves them.
- Every register the map names is the vendor's, with the document cited in the map file.
  Modbus sends each register big-endian (Modbus Application Protocol V1.1b3 s4.2); how a
  32-bit value is split over two registers is the vendor's choice (``word_order``).
- The control pilot state is reported three ways by real controllers, all data here:
  ``char`` (one ASCII letter in the low byte of a register: Phoenix Contact EV-ETH),
  ``string`` (NUL-terminated ASCII, two characters per register: Alfen "B1", "C2"), and
  ``enum`` (a code: Bender/ebee 1..5). ``[state.values]`` maps what the device says to the
  IEC 61851-1 state; anything else is a DecodeError, never a guess.
- Enabling is either a coil (``enable.method = "coil"``) or, where the controller has no
  such switch, a current limit of 0 A (``"current"``: Alfen, Bender). With ``"current"``
  the map's ``current_limit.read_address`` is what the EVSE offers now, so ``enabled`` is
  true whenever it offers current at all (also after a fall-back to its safe current).
- Hostile replies raise :class:`DecodeError` (wrong register count, a value out of
  0..65535, an unknown state, NaN where the map does not allow it) and nothing else.
"""

from __future__ import annotations

import math
import struct
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from fractions import Fraction
from importlib import resources
from pathlib import Path

from agent.errors import ConfigError, DecodeError
from agent.options import Table
from firmware_adapters.evse.base import ChargerStatus, CpState
from firmware_adapters.modbus.registers import DataType, Order

# Modbus Application Protocol V1.1b3 s6.1-s6.4: at most 2000 coils / 125 registers per read.
MAX_REGISTERS_PER_READ = 125
READ_COILS, READ_HOLDING, READ_INPUT = 1, 3, 4
WRITE_COIL, WRITE_REGISTER, WRITE_REGISTERS = 5, 6, 16
READ_FUNCTIONS = (READ_COILS, READ_HOLDING, READ_INPUT)


class StateEncoding(StrEnum):
    CHAR = "char"
    STRING = "string"
    ENUM = "enum"


@dataclass(frozen=True, slots=True)
class Read:
    """One read request: ``count`` coils/registers from ``address`` with ``function``."""

    function: int
    address: int
    count: int


@dataclass(frozen=True, slots=True)
class Write:
    """One write request. ``values`` are register words (FC 6/16) or coil states (FC 5)."""

    function: int
    address: int
    values: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class NumberField:
    """A number in registers: raw x ``scale`` in the field's unit (A or W)."""

    function: int
    address: int
    dtype: DataType
    scale: Fraction = Fraction(1)
    word_order: Order = Order.BIG
    unavailable: frozenset[int] = frozenset()   # raw codes meaning "not available"
    nan_unavailable: bool = False               # a NaN float means "not available"

    @property
    def count(self) -> int:
        return self.dtype.words

    def raw(self, words: Sequence[int]) -> int | float:
        _check_words(words, self.count)
        ordered = words if self.word_order is Order.BIG else list(reversed(words))
        data = b"".join(w.to_bytes(2, "big") for w in ordered)
        (raw,) = struct.unpack(">" + self.dtype.struct_code, data)
        return raw  # type: ignore[no-any-return]  # struct.unpack is untyped

    def decode(self, words: Sequence[int]) -> Fraction | None:
        """The value (A or W), None where the device says "not available"."""
        raw = self.raw(words)
        if isinstance(raw, float):
            if not math.isfinite(raw):
                if self.nan_unavailable and math.isnan(raw):
                    return None
                raise DecodeError(f"register {self.address}: not a number ({raw!r})",
                                  reason="not-a-number")
        elif raw in self.unavailable:
            return None
        return Fraction(raw) * self.scale

    def encode(self, value: Fraction) -> tuple[int, ...]:
        """Registers holding ``value`` (in the field's unit), rounded down to the
        register's resolution (a charger must never offer more than it was told)."""
        exact = value / self.scale
        raw: int | float = float(exact) if self.dtype.is_float else math.floor(exact)
        try:
            data = struct.pack(">" + self.dtype.struct_code, raw)
        except struct.error as exc:
            raise ValueError(f"register {self.address}: {value} does not fit "
                             f"{self.dtype.value}") from exc
        words = [int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2)]
        return tuple(words if self.word_order is Order.BIG else reversed(words))


@dataclass(frozen=True, slots=True)
class StateField:
    function: int
    address: int
    encoding: StateEncoding
    count: int
    values: Mapping[str, CpState]

    def decode(self, words: Sequence[int]) -> CpState:
        _check_words(words, self.count)
        if self.encoding is StateEncoding.ENUM:
            text = str(words[0])
        elif self.encoding is StateEncoding.CHAR:
            text = _ascii(bytes((words[0] & 0xFF,)), self.address)
        else:
            text = _ascii(b"".join(w.to_bytes(2, "big") for w in words), self.address)
        try:
            return self.values[text]
        except KeyError:
            raise DecodeError(f"register {self.address}: unknown pilot state {text!r}",
                              reason="unknown-state") from None

    def encode(self, text: str) -> tuple[int, ...]:
        """Registers a device holds when it reports ``text`` (for the simulator)."""
        if self.encoding is StateEncoding.ENUM:
            return (int(text),)
        if self.encoding is StateEncoding.CHAR:
            return (ord(text),)
        data = text.encode("ascii").ljust(2 * self.count, b"\0")
        return tuple(int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2))


@dataclass(frozen=True, slots=True)
class FaultField:
    """A code register: ``ok`` codes mean no fault, ``texts`` name the known codes."""

    number: NumberField
    ok: frozenset[int]
    texts: Mapping[int, str]

    def decode(self, words: Sequence[int]) -> str | None:
        raw = self.number.raw(words)
        code = int(raw)
        if code in self.ok:
            return None
        return self.texts.get(code, f"code {code}")


@dataclass(frozen=True, slots=True)
class ChargerMap:
    name: str
    model: str
    document: str
    unit: int | None                 # fixed unit id; None: unit id = connector number
    max_connectors: int
    functions: frozenset[int]        # the function codes the device implements
    min_current_a: Fraction
    max_current_a: Fraction
    state: StateField
    current: NumberField             # the write register of the current limit
    current_read: NumberField        # what the EVSE offers now (often the same register)
    write_function: int              # 6 or 16 for the current limit
    enable_coil: int | None          # coil address (method "coil"); None: method "current"
    power: NumberField | None = None
    fault: FaultField | None = None
    setpoint_valid_s: float | None = None   # the device forgets the set-point after this
    max_read: int = MAX_REGISTERS_PER_READ
    max_gap: int = 16
    reads: tuple[Read, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        if not 0 < self.min_current_a <= self.max_current_a:
            raise ValueError(f"{self.name}: 0 < min_current_a <= max_current_a")
        if self.write_function not in (WRITE_REGISTER, WRITE_REGISTERS):
            raise ValueError(f"{self.name}: current_limit.write must be 6 or 16")
        if self.write_function == WRITE_REGISTER and self.current.count != 1:
            raise ValueError(f"{self.name}: FC 6 writes one register only")
        needed = {f.function for f in self.fields()} | {self.write_function}
        if self.enable_coil is not None:
            needed |= {READ_COILS, WRITE_COIL}
        if not needed <= self.functions:
            raise ValueError(f"{self.name}: uses function codes "
                             f"{sorted(needed - self.functions)} the device does not have")
        if any(f.count > self.max_read for f in self.fields()):
            raise ValueError(f"{self.name}: a field is wider than max_read")
        object.__setattr__(self, "reads", self._plan())

    def fields(self) -> tuple[NumberField | StateField, ...]:
        found: list[NumberField | StateField] = [self.state, self.current_read]
        if self.power is not None:
            found.append(self.power)
        if self.fault is not None:
            found.append(self.fault.number)
        return tuple(found)

    def unit_for(self, connector: int, configured: int | None) -> int:
        if configured is not None:
            return configured
        return connector if self.unit is None else self.unit

    # ------------------------------------------------------------------ reads

    def _plan(self) -> tuple[Read, ...]:
        """Fewest reads covering every field (as firmware_adapters/modbus plans meters)."""
        reads: list[Read] = []
        for function in (READ_HOLDING, READ_INPUT):
            spans = sorted({(f.address, f.address + f.count) for f in self.fields()
                            if f.function == function})
            start = end = -1
            for low, high in spans:
                if start >= 0 and low - end <= self.max_gap and high - start <= self.max_read:
                    end = max(end, high)
                    continue
                if start >= 0:
                    reads.append(Read(function, start, end - start))
                start, end = low, high
            if start >= 0:
                reads.append(Read(function, start, end - start))
        if self.enable_coil is not None:
            reads.append(Read(READ_COILS, self.enable_coil, 1))
        return tuple(reads)

    def decode(self, connector: int, replies: Mapping[Read, Sequence[int]]) -> ChargerStatus:
        """The status from the replies to :attr:`reads` (coils as 0/1)."""
        def words(f: NumberField | StateField) -> Sequence[int]:
            for read in self.reads:
                if read.function == f.function and \
                        read.address <= f.address < read.address + read.count:
                    reply = replies[read]
                    _check_words(reply, read.count)
                    offset = f.address - read.address
                    return reply[offset:offset + f.count]
            raise KeyError(f.address)  # the plan covers every field: a bug if reached

        limit = self.current_read.decode(words(self.current_read))
        if self.enable_coil is None:
            enabled = limit is not None and limit > 0
        else:
            coil = replies[Read(READ_COILS, self.enable_coil, 1)]
            _check_words(coil, 1)
            enabled = bool(coil[0])
        power = self.power.decode(words(self.power)) if self.power is not None else None
        fault = self.fault.decode(words(self.fault.number)) if self.fault is not None else None
        if limit is not None and not 0 <= limit <= 1000:
            raise DecodeError(f"register {self.current_read.address}: current limit "
                              f"{float(limit)} A out of range", reason="out-of-range")
        return ChargerStatus(connector, self.state.decode(words(self.state)), enabled,
                             None if limit is None else float(limit),
                             None if power is None else round(power), fault)

    # ------------------------------------------------------------------ writes

    def current_write(self, amps: float) -> Write:
        """The write that sets the current limit (0 A only with method "current")."""
        if not math.isfinite(amps) or amps < 0:
            raise ValueError(f"current limit must be >= 0 A, got {amps!r}")
        value = Fraction(amps)
        if value != 0 and not self.min_current_a <= value <= self.max_current_a:
            raise ValueError(f"{self.name}: current limit {amps} A outside "
                             f"{float(self.min_current_a)}..{float(self.max_current_a)} A "
                             "(IEC 61851-1: below 6 A no charging; disable instead)")
        if value == 0 and self.enable_coil is not None:
            raise ValueError(f"{self.name}: disable with the enable coil, not 0 A")
        return Write(self.write_function, self.current.address, self.current.encode(value))

    def enable_write(self, enabled: bool, amps: float) -> Write:
        """The write that enables/disables delivery; ``amps`` is the limit to offer when
        enabling a controller that has no enable switch."""
        if self.enable_coil is not None:
            return Write(WRITE_COIL, self.enable_coil, (int(enabled),))
        return self.current_write(amps if enabled else 0.0)


def _check_words(words: Sequence[int], count: int) -> None:
    if len(words) != count:
        raise DecodeError(f"expected {count} registers, got {len(words)}",
                          reason="short-read")
    for word in words:
        if isinstance(word, bool):
            continue  # a coil
        if not isinstance(word, int) or not 0 <= word <= 0xFFFF:
            raise DecodeError(f"register value {word!r} out of 0..65535",
                              reason="register-range")


def _ascii(data: bytes, address: int) -> str:
    text = data.split(b"\0", 1)[0]
    if not text or any(b < 0x20 or b > 0x7E for b in text):
        raise DecodeError(f"register {address}: not an ASCII state {data!r}",
                          reason="unknown-state")
    return text.decode("ascii")


# --------------------------------------------------------------------------- loading


def builtin_maps() -> tuple[str, ...]:
    folder = resources.files(__package__).joinpath("maps")
    return tuple(sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".toml")))


def load_map(name_or_path: str) -> ChargerMap:
    """A built-in map by name (``"phoenix-ev-eth"``) or a map file by path."""
    if name_or_path in builtin_maps():
        resource = resources.files(__package__).joinpath("maps", f"{name_or_path}.toml")
        text, where, name = (resource.read_text(encoding="utf-8"),
                             f"maps/{name_or_path}.toml", name_or_path)
    else:
        path = Path(name_or_path)
        if path.suffix != ".toml":
            raise ConfigError(key="map", expected=f"one of {', '.join(builtin_maps())} "
                              "or a .toml file", found=name_or_path)
        try:
            text, where, name = path.read_text(encoding="utf-8"), str(path), path.stem
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read charger map ({exc.strerror})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: not valid TOML: {exc}") from None
    return map_from_table(data, where, name)


def map_from_table(data: Mapping[str, object], where: str, name: str) -> ChargerMap:
    top = Table(data, where)
    order = Order(top.choice("word_order", "big", ("big", "little")))
    functions = _ints(top, "functions", top.list("functions"))
    if not functions:
        raise top.error("functions", "an array of Modbus function codes", functions)
    unit_raw = top.raw("unit")
    if unit_raw == "connector":
        unit: int | None = None
    elif isinstance(unit_raw, int) and not isinstance(unit_raw, bool) and 0 <= unit_raw <= 255:
        unit = unit_raw
    else:
        raise top.error("unit", 'a unit id 0..255 or "connector"', unit_raw)
    state = _state(top.table("state", required=True))
    limit = top.table("current_limit", required=True)
    current = _number(limit, order)
    read_address = limit.opt_int("read_address", min=0, max=0xFFFF)
    current_read = current if read_address is None else NumberField(
        limit.int("read_function", current.function, min=3, max=4), read_address,
        current.dtype, current.scale, current.word_order, current.unavailable,
        current.nan_unavailable)
    write = limit.choice("write", WRITE_REGISTERS, (WRITE_REGISTER, WRITE_REGISTERS))
    limit.reject_unknown()
    enable = top.table("enable", required=True)
    method = enable.str("method", choices=("coil", "current"))
    coil = enable.int("address", min=0, max=0xFFFF) if method == "coil" else None
    enable.reject_unknown()
    power = _optional_number(top, "power", order)
    fault = _fault(top, order)
    valid = top.raw("setpoint_valid_s", None)
    try:
        result = ChargerMap(
            name=name, model=top.nonempty_str("model"), document=top.nonempty_str("document"),
            unit=unit, max_connectors=top.int("max_connectors", 1, min=1, max=8),
            functions=frozenset(functions),
            min_current_a=Fraction(top.float("min_current_a", 6.0, min=6.0, max=80.0)),
            max_current_a=Fraction(top.float("max_current_a", min=6.0, max=1000.0)),
            state=state, current=current, current_read=current_read, write_function=write,
            enable_coil=coil, power=power, fault=fault,
            setpoint_valid_s=None if valid is None else top.float("setpoint_valid_s",
                                                                  min=1.0, max=86_400.0),
            max_read=top.int("max_read", MAX_REGISTERS_PER_READ, min=1,
                             max=MAX_REGISTERS_PER_READ),
            max_gap=top.int("max_gap", 16, min=0, max=MAX_REGISTERS_PER_READ))
    except ValueError as exc:
        raise ConfigError(file=where, key="(map)", expected="a consistent charger map",
                          found=str(exc)) from None
    top.reject_unknown()
    return result


def _state(t: Table) -> StateField:
    encoding = StateEncoding(t.choice("encoding", None, tuple(e.value for e in StateEncoding)))
    values = t.mapping("values")
    mapped: dict[str, CpState] = {}
    for text, state in values.items():
        if not isinstance(state, str) or state not in CpState.__members__:
            raise t.error(f"values.{text}", "one of A, B, C, D, E, F", state)
        mapped[text] = CpState[state]
    count = t.int("registers", 1, min=1, max=16)
    result = StateField(t.int("function", min=3, max=4), t.int("address", min=0, max=0xFFFF),
                        encoding, count, mapped)
    t.reject_unknown()
    return result


def _number(t: Table, order: Order) -> NumberField:
    dtype = DataType(t.choice("type", None, tuple(d.value for d in DataType)))
    scale = t.str("scale", "1")
    try:
        fraction = Fraction(scale)
    except (ValueError, ZeroDivisionError):
        raise t.error("scale", "a decimal string > 0", scale) from None
    if fraction <= 0:
        raise t.error("scale", "a decimal string > 0", scale)
    unavailable = _ints(t, "unavailable", t.list("unavailable", []))
    return NumberField(t.int("function", 3, min=3, max=4), t.int("address", min=0, max=0xFFFF),
                       dtype, fraction,
                       Order(t.choice("word_order", order.value, ("big", "little"))),
                       frozenset(unavailable),
                       t.bool("nan_unavailable", False))


def _optional_number(top: Table, name: str, order: Order) -> NumberField | None:
    if name not in top.data:
        top.mark_used(name)
        return None
    t = top.table(name)
    result = _number(t, order)
    t.reject_unknown()
    return result


def _fault(top: Table, order: Order) -> FaultField | None:
    if "fault" not in top.data:
        top.mark_used("fault")
        return None
    t = top.table("fault")
    number = _number(t, order)
    ok = _ints(t, "ok", t.list("ok", [0]))
    texts = t.mapping("texts") if "texts" in t.data else {}
    t.mark_used("texts")
    t.reject_unknown()
    if not all(k.isdigit() and isinstance(v, str) for k, v in texts.items()):
        raise t.error("texts", "{code = text} pairs", texts)
    return FaultField(number, frozenset(ok), {int(k): str(v) for k, v in texts.items()})


def _ints(t: Table, name: str, raw: list[object]) -> list[int]:
    found: list[int] = []
    for item in raw:
        if isinstance(item, bool) or not isinstance(item, int):
            raise t.error(name, "an array of integers", raw)
        found.append(item)
    return found
