"""SunSpec meters (models 201-204) and ``map = "auto"``: maps discovered from the meter.

SunSpec (SunSpec Alliance, "SunSpec Information Model Specification" and the "Meter
Models" 201 single phase, 202 split phase, 203 wye, 204 delta): holding registers from a
base address (40000, else 0 or 50000) start with the marker "SunS" (0x5375 0x6E53), then
a chain of models, each ``ID, L`` and ``L`` registers, ended by ID 0xFFFF. Model 1
(common) carries the serial number (``SN``, 16 registers of text at offset 50 of its
data). The meter models 201-204 share one layout: int16 values with int16 scale-factor
registers (``*_SF``: value x 10^SF), uint32 ("acc32") energy counters in Wh; "not
implemented" is 0x8000 (int16) and a scale factor of 0x8000 (sunssf).

``map = "auto"``: the SunSpec header first, then every built-in map that documents a
model register with ``match`` values: first the maps whose model register holds text
(Iskra "WM3M4", ABB "B23"/"B24", Schneider "iEM3"), then those with a numeric model code,
holding registers before input registers (Eastron FC02h, Finder 39000, Carlo Gavazzi
000Bh), each group in name order. Text names itself; a bare number at an address where another
make keeps a measurement can match by chance (an Eastron's input register 000Bh is half
of its phase 3 current float), so the codes kept apart from the measurements go first. A
code must equal a documented value, a text start with one. The first that answers and
matches is taken; each identity register is read at most once per detection.

The planning is pure (:func:`sunspec_map`); the discovery is a short coroutine over a
``read(function, address, count)`` callable that raises our AdapterErrors.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from fractions import Fraction

from agent.errors import AdapterError, ConfigError, DecodeError
from firmware_adapters.modbus.mapfile import builtin_maps, load_map
from firmware_adapters.modbus.registers import (
    FUNCTION_HOLDING,
    FUNCTION_INPUT,
    DataType,
    IdentityField,
    IdentityKind,
    MeterMap,
    RegisterSpec,
)

Read = Callable[[int, int, int], Awaitable[list[int]]]

BASES = (40000, 0, 50000)
MARKER = [0x5375, 0x6E53]  # "SunS"
METER_MODELS = {201: 1, 202: 2, 203: 3, 204: 3}  # model -> phases served
COMMON_MODEL, END_MODEL, MAX_MODELS = 1, 0xFFFF, 32
SERIAL_OFFSET, SERIAL_COUNT = 50, 16   # model 1: SN at data offset 50, 16 registers
INT16_NOT_IMPLEMENTED = 0x8000
DOCUMENT = "SunSpec Information Model Specification; Meter Models 201-204 (ac_meter)"

# (name, data offset, type, scale to our unit, offset of its scale-factor register,
#  phase it belongs to (0 = total)). Offsets from the first register after ID and L.
LAYOUT: tuple[tuple[str, int, DataType, str, int, int], ...] = (
    ("1-0:31.7.0", 1, DataType.INT16, "1000", 4, 1),      # AphA [A], A_SF
    ("1-0:51.7.0", 2, DataType.INT16, "1000", 4, 2),      # AphB
    ("1-0:71.7.0", 3, DataType.INT16, "1000", 4, 3),      # AphC
    ("1-0:32.7.0", 6, DataType.INT16, "1000", 13, 1),     # PhVphA [V], V_SF
    ("1-0:52.7.0", 7, DataType.INT16, "1000", 13, 2),     # PhVphB
    ("1-0:72.7.0", 8, DataType.INT16, "1000", 13, 3),     # PhVphC
    ("1-0:14.7.0", 14, DataType.INT16, "1000", 15, 0),    # Hz, Hz_SF
    ("1-0:16.7.0", 16, DataType.INT16, "1", 20, 0),       # W [W], W_SF
    ("1-0:21.7.0", 17, DataType.INT16, "1", 20, 1),       # WphA
    ("1-0:41.7.0", 18, DataType.INT16, "1", 20, 2),       # WphB
    ("1-0:61.7.0", 19, DataType.INT16, "1", 20, 3),       # WphC
    ("1-0:13.7.0", 31, DataType.INT16, "10", 35, 0),      # PF [%] -> thousandths, PF_SF
    ("1-0:2.8.0", 36, DataType.UINT32, "1", 52, 0),       # TotWhExp [Wh], TotWh_SF
    ("1-0:1.8.0", 44, DataType.UINT32, "1", 52, 0),       # TotWhImp
)


def sunspec_map(model_id: int, model_start: int, serial_address: int | None,
                rated_power_w: int = 44_850) -> MeterMap:
    """The map of meter model ``model_id`` whose ID register is at ``model_start``."""
    if model_id not in METER_MODELS:
        raise ValueError(f"SunSpec model {model_id} is not a meter model (201-204)")
    data = model_start + 2
    phases = METER_MODELS[model_id]
    specs = tuple(
        RegisterSpec(name, FUNCTION_HOLDING, data + offset, dtype, Fraction(scale),
                     scale_from=data + sf,
                     sentinels=frozenset({INT16_NOT_IMPLEMENTED})
                     if dtype is DataType.INT16 else frozenset())
        for name, offset, dtype, scale, sf, phase in LAYOUT if phase <= phases)
    serial = None if serial_address is None else IdentityField(
        FUNCTION_HOLDING, serial_address, IdentityKind.ASCII, SERIAL_COUNT)
    return MeterMap(f"SunSpec meter (model {model_id})", DOCUMENT, specs, rated_power_w,
                    max_read=125, max_gap=16, serial=serial)


async def discover_sunspec(read: Read, rated_power_w: int = 44_850) -> MeterMap:
    """Walk the SunSpec model chain; ConfigError(reason) when no meter model is found,
    AdapterError when the meter does not answer."""
    base = await _find_base(read)
    address, serial_address = base + 2, None
    for _ in range(MAX_MODELS):
        model_id, length = await read(FUNCTION_HOLDING, address, 2)
        if model_id == END_MODEL:
            break
        if model_id == COMMON_MODEL and length >= SERIAL_OFFSET + SERIAL_COUNT:
            serial_address = address + 2 + SERIAL_OFFSET
        if model_id in METER_MODELS:
            return sunspec_map(model_id, address, serial_address, rated_power_w)
        address += 2 + length
    raise ConfigError(key="map", expected="a SunSpec meter model (201-204)",
                      found="none in the model chain")


async def _find_base(read: Read) -> int:
    for base in BASES:
        try:
            if await read(FUNCTION_HOLDING, base, 2) == MARKER:
                return base
        except AdapterError as exc:
            if exc.reason == "line-down":
                raise
    raise ConfigError(key="map", expected="a SunSpec device (\"SunS\" at 40000, 0 or 50000)",
                      found="no SunSpec marker")


async def detect(read: Read, rated_power_w: int = 44_850) -> tuple[str, MeterMap]:
    """``map = "auto"``: (name, map) of the first model that identifies itself."""
    try:
        return "sunspec", await discover_sunspec(read, rated_power_w)
    except ConfigError:
        pass
    candidates = []
    for name in builtin_maps():
        meter_map = load_map(name)
        field = meter_map.model_id
        if field is not None and field.match:
            candidates.append((field.kind is not IdentityKind.ASCII,
                               field.function == FUNCTION_INPUT, name, meter_map, field))
    seen: dict[tuple[int, int, int], list[int] | None] = {}
    for _, _, name, meter_map, field in sorted(candidates, key=lambda c: c[:3]):
        key = (field.function, field.address, field.count)
        if key not in seen:
            try:
                seen[key] = await read(*key)
            except AdapterError as exc:
                if exc.reason == "line-down":
                    raise
                seen[key] = None
        words = seen[key]
        if words is None:
            continue
        try:
            text = field.decode(words)
        except DecodeError:
            continue
        if field.matches(text):
            return name, meter_map
    raise ConfigError(key="map", expected="a meter that identifies itself (SunSpec, "
                      "or a model register of a built-in map)", found="no match")
