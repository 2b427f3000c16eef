"""OBD-II services 01/02/03/04/07/09/0A as data: the PID table, request building and decoding.

Scope (sans-I/O: no sockets, no serial, no clocks). The input is one complete diagnostic
message (the ISO-TP payload of one ECU's answer, SAE J1979 / ISO 15765-4); the output is a
frozen value. Rules:

* The service 01 table is data (``PIDS``): each PID has its data length and a linear SAE J1979
  formula ``value = raw * mul / div + offset`` over its big-endian data bytes, plus the VSS name
  and UCUM unit it becomes. Every name is checked against ``agent.readings.VEHICLE_SIGNALS`` at
  import time, so a typo fails the test run, not a car.
* A service 01 request carries up to 6 PIDs (J1979 s6.1.2, CAN only); the answer repeats each
  PID followed by its data. The data length comes from the table, so an answer naming a PID we
  did not ask for, or one cut short, is a :class:`DecodeError` rather than a guess.
* Supported-PID bitmaps (PIDs 0x00, 0x20, ... 0xE0): bit 7 of byte A is PID base+1; the last
  bit says whether the next bitmap PID is supported.
* A few PIDs carry several values (0x01 monitor status, 0x9A hybrid/EV battery): their
  entry names a ``composite`` decoder returning (VSS name, unit, value) triples, one per
  signal the ECU says it supports; they still have a fixed data length.
* Service 02 (freeze frame) answers ``42 <pid> <frame> <data>`` for each (PID, frame) pair
  asked (up to 3 pairs on CAN, J1979 s6.2); PID 02 in a freeze frame is the DTC that stored it.
* Service 09 PID 02 is the VIN: 17 ISO 3779 characters. Nothing is stripped from the VIN
  except NUL padding some ECUs put in front (python-OBD strips 0/1/2 too: it turns
  ``WP0ZZZ99ZTS390000`` into ``WP0ZZZ99ZTS39``; we do not).
* Service 09 PID 04 (calibration IDs): a count byte, then 16 ASCII bytes each, NUL-padded;
  PID 0A (ECU name): a count byte, then 20 ASCII bytes (J1979 s6.9, table G11).
* Services 03/07/0A (stored/pending/permanent DTCs, ISO 15765-4 form with a count byte)
  decode to ``P0143``-style SAE J2012 codes.
* Service 04 (clear DTCs and freeze frames) is built only with ``allow_clear=True``.
* A negative response (0x7F, service, NRC; ISO 14229-1 annex A) decodes to
  :class:`NegativeResponse`; it is an answer, not an exception.

Errors: every malformed input raises :class:`agent.errors.DecodeError` with a kebab-case
``reason``; asking for something the protocol forbids raises ``LocalProtocolError``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from agent.errors import DecodeError, LocalProtocolError
from agent.readings import VEHICLE_SIGNALS

SERVICE_CURRENT_DATA = 0x01
SERVICE_FREEZE_FRAME = 0x02
SERVICE_STORED_DTCS = 0x03
SERVICE_CLEAR_DTCS = 0x04
SERVICE_PENDING_DTCS = 0x07
SERVICE_VEHICLE_INFO = 0x09
SERVICE_PERMANENT_DTCS = 0x0A
VIN_PID = 0x02
CALID_PID = 0x04
ECU_NAME_PID = 0x0A
FREEZE_DTC_PID = 0x02
MAX_FREEZE_PAIRS = 3  # J1979 s6.2: up to three PID/frame pairs in one CAN request
NEGATIVE_RESPONSE = 0x7F
POSITIVE_OFFSET = 0x40
MAX_PIDS_PER_REQUEST = 6  # SAE J1979 s6.1.2: at most six PIDs in one CAN request
BITMAP_PIDS = tuple(range(0x00, 0x100, 0x20))
VIN_LENGTH = 17
VIN_ALPHABET = frozenset("ABCDEFGHJKLMNPRSTUVWXYZ0123456789")  # ISO 3779: no I, O, Q


Signal = tuple[str, str, int | float | str]  # (VSS name, unit, value)


@dataclass(frozen=True, slots=True)
class PidSpec:
    """One service 01 PID: ``value = int.from_bytes(data[:length]) * mul / div + offset``,
    or, for a PID with several values, what its ``composite`` decoder returns."""

    pid: int
    key: str  # short upper-case name used in config (``SPEED``), as python-OBD names them
    name: str  # VSS signal name
    unit: str
    length: int
    mul: int = 1
    div: int = 1
    offset: int = 0
    signed: bool = False
    composite: Callable[[bytes], tuple[Signal, ...]] | None = None

    def decode(self, data: bytes) -> int | float:
        if len(data) != self.length:
            raise DecodeError(f"PID {self.pid:02X}: {len(data)} data bytes, expected "
                              f"{self.length}", reason="wrong-length")
        raw = int.from_bytes(data, "big", signed=self.signed)
        if self.div == 1:
            return raw * self.mul + self.offset
        return round(raw * self.mul / self.div + self.offset, 6)


    def signals(self, data: bytes) -> tuple[Signal, ...]:
        """Every value this PID carries, as (VSS name, unit, value)."""
        if len(data) != self.length:
            raise DecodeError(f"PID {self.pid:02X}: {len(data)} data bytes, expected "
                              f"{self.length}", reason="wrong-length")
        if self.composite is not None:
            return self.composite(data)
        return ((self.name, self.unit, self.decode(data)),)


def _p(pid: int, key: str, name: str, unit: str, length: int, mul: int = 1, div: int = 1,
       offset: int = 0, signed: bool = False) -> PidSpec:
    return PidSpec(pid, key, name, unit, length, mul, div, offset, signed)


# SAE J1979-DA PID 01, bytes B..D: (supported bit, not-complete bit) per monitor. Byte B
# holds the continuous monitors; bytes C (supported) and D (not complete) the others, whose
# meaning depends on B bit 3 (0 spark ignition, 1 compression ignition).
CONTINUOUS_MONITORS = (("misfire", 0), ("fuel-system", 1), ("components", 2))
SPARK_MONITORS = ("catalyst", "heated-catalyst", "evap-system", "secondary-air", "",
                  "oxygen-sensor", "oxygen-sensor-heater", "egr-vvt")
COMPRESSION_MONITORS = ("nmhc-catalyst", "nox-scr", "", "boost-pressure", "",
                        "exhaust-gas-sensor", "pm-filter", "egr-vvt")
_S = "Vehicle.OBD.Status."


def decode_monitor_status(data: bytes) -> tuple[Signal, ...]:
    """PID 01: MIL (A7), DTC count (A0-6), ignition type (B3) and the monitors that are
    supported but not complete since the DTCs were cleared (B0-2/B4-6, C/D)."""
    a, b, c, d = data
    compression = bool(b & 0x08)
    not_ready = [name for name, bit in CONTINUOUS_MONITORS
                 if b & (1 << bit) and b & (1 << (bit + 4))]
    names = COMPRESSION_MONITORS if compression else SPARK_MONITORS
    not_ready += [name for bit, name in enumerate(names) if name and c & d & (1 << bit)]
    return ((_S + "IsMILOn", "", a >> 7), (_S + "DTCCount", "1", a & 0x7F),
            (_S + "IgnitionType", "", "compression" if compression else "spark"),
            (_S + "MonitorsNotReady", "", ",".join(not_ready)))


def decode_hybrid_battery(data: bytes) -> tuple[Signal, ...]:
    """PID 9A (SAE J1979-DA, Hybrid/EV Vehicle System Data, 6 bytes): A = support bits
    (bit 0 the charging state in B, bit 1 the battery voltage, bit 2 the current), B =
    Hybrid/EV charging state, C-D = battery system voltage at 1/64 V (0.015625 V/bit),
    E-F = battery system current at 0.1 A/bit, signed, positive while the battery
    discharges. Layout and sign as decoded from a production hybrid (Honda e:HEV, support
    mask 0x07, 238-264 V, -105..+116 A with discharge positive: papataku/honda_ehev_analyzer
    docs/PHASE29_SESSION12_STANDARD_HEV.md) and as AWS IoT FleetWise Edge's J1979 table
    places the fields (C-D x 0.015625, E-F x 0.1). VSS counts current into the battery as
    positive, so the current is negated. A value the ECU flags unsupported is not
    emitted."""
    out: list[Signal] = []
    if data[0] & 0x02:
        out.append(("Vehicle.Powertrain.TractionBattery.CurrentVoltage", "V",
                    round(int.from_bytes(data[2:4], "big") / 64, 6)))
    if data[0] & 0x04:
        out.append(("Vehicle.Powertrain.TractionBattery.CurrentCurrent", "A",
                    round(-int.from_bytes(data[4:6], "big", signed=True) / 10, 6)))
    return tuple(out)


_O = "Vehicle.OBD."
# SAE J1979-DA, service 01. Formulas as in J1979 (A, B, C, D are the data bytes).
PIDS: dict[int, PidSpec] = {s.pid: s for s in (
    PidSpec(0x01, "STATUS", _S + "DTCCount", "1", 4, composite=decode_monitor_status),
    _p(0x04, "ENGINE_LOAD", _O + "EngineLoad", "%", 1, 100, 255),
    _p(0x05, "COOLANT_TEMP", _O + "CoolantTemperature", "Cel", 1, offset=-40),
    _p(0x06, "SHORT_FUEL_TRIM_1", _O + "ShortTermFuelTrim1", "%", 1, 100, 128, -100),
    _p(0x07, "LONG_FUEL_TRIM_1", _O + "LongTermFuelTrim1", "%", 1, 100, 128, -100),
    _p(0x08, "SHORT_FUEL_TRIM_2", _O + "ShortTermFuelTrim2", "%", 1, 100, 128, -100),
    _p(0x09, "LONG_FUEL_TRIM_2", _O + "LongTermFuelTrim2", "%", 1, 100, 128, -100),
    _p(0x0A, "FUEL_PRESSURE", _O + "FuelPressure", "kPa", 1, 3),
    _p(0x0B, "INTAKE_PRESSURE", _O + "MAP", "kPa", 1),
    _p(0x0C, "RPM", _O + "EngineSpeed", "/min", 2, 1, 4),
    _p(0x0D, "SPEED", "Vehicle.Speed", "km/h", 1),
    _p(0x0E, "TIMING_ADVANCE", _O + "TimingAdvance", "deg", 1, 1, 2, -64),
    _p(0x0F, "INTAKE_TEMP", _O + "IntakeTemp", "Cel", 1, offset=-40),
    _p(0x10, "MAF", _O + "MAF", "g/s", 2, 1, 100),
    _p(0x11, "THROTTLE_POS", _O + "ThrottlePosition", "%", 1, 100, 255),
    _p(0x1C, "OBD_COMPLIANCE", _O + "OBDStandards", "1", 1),  # J1979-DA table A7 code
    _p(0x1F, "RUN_TIME", _O + "RunTime", "s", 2),
    _p(0x21, "DISTANCE_W_MIL", _O + "DistanceWithMIL", "km", 2),
    _p(0x22, "FUEL_RAIL_PRESSURE_VAC", _O + "FuelRailPressureVac", "kPa", 2, 79, 1000),
    _p(0x23, "FUEL_RAIL_PRESSURE_DIRECT", _O + "FuelRailPressureDirect", "kPa", 2, 10),
    _p(0x2C, "COMMANDED_EGR", _O + "CommandedEGR", "%", 1, 100, 255),
    _p(0x2D, "EGR_ERROR", _O + "EGRError", "%", 1, 100, 128, -100),
    _p(0x2E, "EVAPORATIVE_PURGE", _O + "CommandedEVAP", "%", 1, 100, 255),
    _p(0x2F, "FUEL_LEVEL", "Vehicle.Powertrain.FuelSystem.Level", "%", 1, 100, 255),
    _p(0x30, "WARMUPS_SINCE_DTC_CLEAR", _O + "WarmupsSinceDTCClear", "1", 1),
    _p(0x31, "DISTANCE_SINCE_DTC_CLEAR", _O + "DistanceSinceDTCClear", "km", 2),
    _p(0x32, "EVAP_VAPOR_PRESSURE", _O + "EVAPVaporPressure", "Pa", 2, 1, 4, signed=True),
    _p(0x33, "BAROMETRIC_PRESSURE", _O + "BarometricPressure", "kPa", 1),
    _p(0x3C, "CATALYST_TEMP_B1S1", _O + "Catalyst.Bank1.Temperature1", "Cel", 2, 1, 10, -40),
    _p(0x3D, "CATALYST_TEMP_B2S1", _O + "Catalyst.Bank2.Temperature1", "Cel", 2, 1, 10, -40),
    _p(0x3E, "CATALYST_TEMP_B1S2", _O + "Catalyst.Bank1.Temperature2", "Cel", 2, 1, 10, -40),
    _p(0x3F, "CATALYST_TEMP_B2S2", _O + "Catalyst.Bank2.Temperature2", "Cel", 2, 1, 10, -40),
    _p(0x42, "CONTROL_MODULE_VOLTAGE", _O + "ControlModuleVoltage", "V", 2, 1, 1000),
    _p(0x43, "ABSOLUTE_LOAD", _O + "AbsoluteLoad", "%", 2, 100, 255),
    _p(0x44, "COMMANDED_EQUIV_RATIO", _O + "CommandedEquivalenceRatio", "1", 2, 2, 65536),
    _p(0x45, "RELATIVE_THROTTLE_POS", _O + "RelativeThrottlePosition", "%", 1, 100, 255),
    _p(0x46, "AMBIANT_AIR_TEMP", "Vehicle.Exterior.AirTemperature", "Cel", 1, offset=-40),
    _p(0x47, "THROTTLE_POS_B", _O + "ThrottlePositionB", "%", 1, 100, 255),
    _p(0x48, "THROTTLE_POS_C", _O + "ThrottlePositionC", "%", 1, 100, 255),
    _p(0x49, "ACCELERATOR_POS_D", _O + "AcceleratorPositionD", "%", 1, 100, 255),
    _p(0x4A, "ACCELERATOR_POS_E", _O + "AcceleratorPositionE", "%", 1, 100, 255),
    _p(0x4B, "ACCELERATOR_POS_F", _O + "AcceleratorPositionF", "%", 1, 100, 255),
    _p(0x4C, "THROTTLE_ACTUATOR", _O + "ThrottleActuator", "%", 1, 100, 255),
    _p(0x4D, "RUN_TIME_MIL", _O + "RunTimeMIL", "min", 2),
    _p(0x4E, "TIME_SINCE_DTC_CLEARED", _O + "TimeSinceDTCCleared", "min", 2),
    _p(0x51, "FUEL_TYPE", _O + "FuelType", "1", 1),  # J1979-DA table A8 code (8 = electric)
    _p(0x52, "ETHANOL_PERCENT", _O + "EthanolPercent", "%", 1, 100, 255),
    _p(0x59, "FUEL_RAIL_PRESSURE_ABS", _O + "FuelRailPressureAbsolute", "kPa", 2, 10),
    _p(0x5A, "RELATIVE_ACCEL_POS", _O + "RelativeAcceleratorPosition", "%", 1, 100, 255),
    # J1979-DA names 0x5B "Hybrid/EV Battery Pack Remaining Charge": the traction battery's
    # state of charge, so it maps to the VSS SoC signal rather than an OBD-only name.
    _p(0x5B, "HYBRID_BATTERY_REMAINING",
       "Vehicle.Powertrain.TractionBattery.StateOfCharge.Current", "%", 1, 100, 255),
    _p(0x5C, "OIL_TEMP", _O + "OilTemperature", "Cel", 1, offset=-40),
    _p(0x5D, "FUEL_INJECT_TIMING", _O + "FuelInjectionTiming", "deg", 2, 1, 128, -210),
    _p(0x5E, "FUEL_RATE", _O + "FuelRate", "L/h", 2, 1, 20),
    _p(0x61, "DRIVER_DEMAND_TORQUE", _O + "DriverDemandEngineTorque", "%", 1, offset=-125),
    _p(0x62, "ACTUAL_TORQUE", _O + "ActualEngineTorque", "%", 1, offset=-125),
    _p(0x63, "REFERENCE_TORQUE", _O + "EngineReferenceTorque", "N.m", 2),
    PidSpec(0x9A, "HYBRID_BATTERY", "Vehicle.Powertrain.TractionBattery.CurrentVoltage", "V",
            6, composite=decode_hybrid_battery),
    # 0xA6 odometer: 4 bytes, 0.1 km per bit (J1979-DA 2017).
    _p(0xA6, "ODOMETER", "Vehicle.TraveledDistance", "km", 4, 1, 10),
)}
PIDS_BY_KEY: dict[str, PidSpec] = {s.key: s for s in PIDS.values()}

COMPOSITE_SIGNALS: tuple[tuple[str, str], ...] = (
    (_S + "IsMILOn", ""), (_S + "DTCCount", "1"), (_S + "IgnitionType", ""),
    (_S + "MonitorsNotReady", ""), ("Vehicle.Powertrain.TractionBattery.CurrentVoltage", "V"),
    ("Vehicle.Powertrain.TractionBattery.CurrentCurrent", "A"))
for _name, _unit in [(s.name, s.unit) for s in PIDS.values()]:
    _known = VEHICLE_SIGNALS.get(_name)
    if _known is None or _known.unit != _unit:  # the table names only known signals
        raise RuntimeError(f"{_name} [{_unit}] is not in agent.readings.VEHICLE_SIGNALS "
                           "with that unit")
for _name, _unit in COMPOSITE_SIGNALS:
    _known = VEHICLE_SIGNALS.get(_name)
    if _known is None or _known.unit != _unit:
        raise RuntimeError(f"{_name} [{_unit}] is not in agent.readings.VEHICLE_SIGNALS")

# ISO 14229-1 annex A.1: negative response codes an OBD ECU may send.
NRC_NAMES: dict[int, str] = {
    0x10: "general-reject",
    0x11: "service-not-supported",
    0x12: "sub-function-not-supported",
    0x13: "incorrect-message-length",
    0x14: "response-too-long",
    0x21: "busy-repeat-request",
    0x22: "conditions-not-correct",
    0x24: "request-sequence-error",
    0x31: "request-out-of-range",
    0x33: "security-access-denied",
    0x78: "response-pending",
}


# ----------------------------------------------------------------------------- answers
@dataclass(frozen=True, slots=True)
class PidValues:
    """A service 01 answer: ``values`` is ((pid, value), ...) in answer order for the one-value
    PIDs; ``signals`` is ((pid, (signal, ...)), ...) for the composite ones (0x01, 0x9A)."""

    values: tuple[tuple[int, int | float], ...]
    signals: tuple[tuple[int, tuple[Signal, ...]], ...] = ()


@dataclass(frozen=True, slots=True)
class FreezeFrame:
    """A service 02 answer: the DTC that stored frame ``frame`` (PID 02) and PID values."""

    frame: int
    dtc: str | None
    values: tuple[tuple[int, int | float], ...]


@dataclass(frozen=True, slots=True)
class VehicleInfo:
    """Service 09 PID 04 (calibration IDs) or 0A (ECU name): text items."""

    pid: int
    items: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class SupportedPids:
    """A service 01 answer made of bitmap PIDs: the PIDs announced as supported."""

    pids: frozenset[int]


@dataclass(frozen=True, slots=True)
class Vin:
    vin: str


@dataclass(frozen=True, slots=True)
class Dtcs:
    service: int
    codes: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class NegativeResponse:
    service: int
    nrc: int

    @property
    def reason(self) -> str:
        return NRC_NAMES.get(self.nrc, f"nrc-{self.nrc:02x}")


Answer = PidValues | SupportedPids | Vin | Dtcs | NegativeResponse | FreezeFrame | VehicleInfo


# ----------------------------------------------------------------------------- requests
def pid_request(pids: Sequence[int]) -> bytes:
    """A service 01 request for 1..6 PIDs (all from the table, or bitmap PIDs)."""
    if not 0 < len(pids) <= MAX_PIDS_PER_REQUEST:
        raise LocalProtocolError(f"a service 01 request carries 1..{MAX_PIDS_PER_REQUEST} "
                                 f"PIDs, not {len(pids)}", reason="too-many-pids")
    for pid in pids:
        if pid not in PIDS and pid not in BITMAP_PIDS:
            raise LocalProtocolError(f"PID {pid:#04x} is not in the table", reason="unknown-pid")
    if len(set(pids)) != len(pids):
        raise LocalProtocolError("a PID appears twice in one request", reason="duplicate-pid")
    return bytes((SERVICE_CURRENT_DATA, *pids))


def vin_request() -> bytes:
    return bytes((SERVICE_VEHICLE_INFO, VIN_PID))


def dtc_request(pending: bool = False, permanent: bool = False) -> bytes:
    if permanent:
        return bytes((SERVICE_PERMANENT_DTCS,))
    return bytes((SERVICE_PENDING_DTCS if pending else SERVICE_STORED_DTCS,))


def info_request(pid: int) -> bytes:
    """Service 09: VIN (02), calibration IDs (04), ECU name (0A)."""
    if pid not in (VIN_PID, CALID_PID, ECU_NAME_PID):
        raise LocalProtocolError(f"service 09 PID {pid:#04x} is not read", reason="unknown-pid")
    return bytes((SERVICE_VEHICLE_INFO, pid))


def freeze_frame_request(pids: Sequence[int], frame: int = 0) -> bytes:
    """Service 02 for frame ``frame``: up to 3 (PID, frame) pairs, PID 02 (the DTC) allowed."""
    if not 0 < len(pids) <= MAX_FREEZE_PAIRS or len(set(pids)) != len(pids):
        raise LocalProtocolError(f"a service 02 request carries 1..{MAX_FREEZE_PAIRS} "
                                 "distinct PIDs", reason="too-many-pids")
    for pid in pids:
        spec = PIDS.get(pid)
        if pid != FREEZE_DTC_PID and (spec is None or spec.composite is not None):
            raise LocalProtocolError(f"PID {pid:#04x} is not a freeze-frame PID",
                                     reason="unknown-pid")
    if not 0 <= frame <= 0xFF:
        raise LocalProtocolError("freeze frame number is one byte", reason="bad-frame")
    return bytes((SERVICE_FREEZE_FRAME, *(b for pid in pids for b in (pid, frame))))


def clear_dtcs_request(*, allow_clear: bool) -> bytes:
    """Service 04 erases the DTCs and freeze frames of every ECU: only on explicit consent."""
    if not allow_clear:
        raise LocalProtocolError("clearing DTCs (service 04) is disabled in config",
                                 reason="clear-dtcs-disabled")
    return bytes((SERVICE_CLEAR_DTCS,))


# ----------------------------------------------------------------------------- decoding
def decode_answer(payload: bytes, requested: Iterable[int] | None = None) -> Answer:
    """Decode one ECU's complete answer. ``requested``: the PIDs asked for (service 01)."""
    if not payload:
        raise DecodeError("empty answer", reason="empty")
    sid = payload[0]
    if sid == NEGATIVE_RESPONSE:
        if len(payload) != 3:
            raise DecodeError("a negative response is 3 bytes", reason="wrong-length")
        return NegativeResponse(payload[1], payload[2])
    if sid == SERVICE_CURRENT_DATA + POSITIVE_OFFSET:
        return _decode_service01(payload[1:], None if requested is None else set(requested))
    if sid in (SERVICE_STORED_DTCS + POSITIVE_OFFSET, SERVICE_PENDING_DTCS + POSITIVE_OFFSET,
               SERVICE_PERMANENT_DTCS + POSITIVE_OFFSET):
        return Dtcs(sid - POSITIVE_OFFSET, decode_dtcs(payload[1:]))
    if sid == SERVICE_VEHICLE_INFO + POSITIVE_OFFSET:
        if len(payload) >= 2 and payload[1] == VIN_PID:
            return Vin(decode_vin(payload[2:]))
        if len(payload) >= 2 and payload[1] in (CALID_PID, ECU_NAME_PID):
            return VehicleInfo(payload[1], decode_info_items(payload[1], payload[2:]))
        raise DecodeError("service 09 answer is not PID 02, 04 or 0A", reason="unexpected-pid")
    if sid == SERVICE_FREEZE_FRAME + POSITIVE_OFFSET:
        return decode_freeze_frame(payload[1:], None if requested is None else set(requested))
    raise DecodeError(f"unexpected service byte {sid:#04x}", reason="unexpected-service")


INFO_ITEM_LENGTH = {CALID_PID: 16, ECU_NAME_PID: 20}


def decode_info_items(pid: int, data: bytes) -> tuple[str, ...]:
    """Service 09 PID 04 / 0A data: a count byte, then fixed-size NUL-padded ASCII items."""
    size = INFO_ITEM_LENGTH[pid]
    if not data or data[0] == 0 or len(data) != 1 + data[0] * size:
        raise DecodeError(f"service 09 PID {pid:02X}: {len(data)} bytes for "
                          f"{data[0] if data else 0} items of {size}", reason="wrong-length")
    items = []
    for i in range(1, len(data), size):
        raw = data[i:i + size].rstrip(b"\x00")
        if not raw or not all(0x20 <= c < 0x7F for c in raw):
            raise DecodeError(f"service 09 PID {pid:02X}: item is not printable ASCII",
                              reason="invalid-text")
        items.append(raw.decode("ascii"))
    return tuple(items)


def decode_freeze_frame(body: bytes, requested: set[int] | None) -> FreezeFrame:
    """Service 02 answer body: (PID, frame, data) repeated; every pair names one frame."""
    values: list[tuple[int, int | float]] = []
    frames: set[int] = set()
    dtc: str | None = None
    i = 0
    while i < len(body):
        if i + 2 > len(body):
            raise DecodeError("freeze frame cut short", offset=i + 1, reason="truncated")
        pid, frame = body[i], body[i + 1]
        frames.add(frame)
        if requested is not None and pid not in requested:
            raise DecodeError(f"freeze frame names PID {pid:02X}, not requested",
                              offset=i + 1, reason="unexpected-pid")
        if pid == FREEZE_DTC_PID:
            raw = body[i + 2:i + 4]
            if len(raw) != 2:
                raise DecodeError("freeze frame DTC cut short", reason="truncated")
            codes = decode_dtcs(b"\x01" + raw)
            dtc = codes[0] if codes else None
            i += 4
            continue
        spec = PIDS.get(pid)
        if spec is None or spec.composite is not None:
            raise DecodeError(f"PID {pid:02X} is not a freeze-frame PID", offset=i + 1,
                              reason="unknown-pid")
        data = body[i + 2:i + 2 + spec.length]
        values.append((pid, spec.decode(data)))  # DecodeError(wrong-length) if cut short
        i += 2 + spec.length
    if len(frames) != 1:
        raise DecodeError("freeze frame answer without exactly one frame number",
                          reason="mixed-answer")
    return FreezeFrame(frames.pop(), dtc, tuple(values))


def _decode_service01(body: bytes, requested: set[int] | None) -> PidValues | SupportedPids:
    values: list[tuple[int, int | float]] = []
    composite: list[tuple[int, tuple[Signal, ...]]] = []
    supported: set[int] = set()
    bitmaps = 0
    i = 0
    while i < len(body):
        pid = body[i]
        if requested is not None and pid not in requested:
            raise DecodeError(f"answer names PID {pid:02X}, not requested", offset=i + 1,
                              reason="unexpected-pid")
        if pid in BITMAP_PIDS:
            supported |= decode_bitmap(pid, body[i + 1:i + 5])
            bitmaps += 1
            i += 5
            continue
        spec = PIDS.get(pid)
        if spec is None:
            raise DecodeError(f"PID {pid:02X} is not in the table", offset=i + 1,
                              reason="unknown-pid")
        data = body[i + 1:i + 1 + spec.length]
        if len(data) != spec.length:
            raise DecodeError(f"PID {pid:02X} cut short", offset=i + 1, reason="truncated")
        if spec.composite is not None:
            composite.append((pid, spec.signals(data)))
        else:
            values.append((pid, spec.decode(data)))
        i += 1 + spec.length
    if not values and not composite and not bitmaps:
        raise DecodeError("service 01 answer without PIDs", reason="empty")
    if bitmaps and (values or composite):
        raise DecodeError("bitmap and data PIDs mixed in one answer", reason="mixed-answer")
    if bitmaps:
        return SupportedPids(frozenset(supported))
    return PidValues(tuple(values), tuple(composite))


def decode_bitmap(base: int, data: bytes) -> set[int]:
    """PIDs announced by bitmap PID ``base``: bit 7 of the first byte is ``base + 1``."""
    if base not in BITMAP_PIDS:
        raise DecodeError(f"{base:#04x} is not a bitmap PID", reason="unexpected-pid")
    if len(data) != 4:
        raise DecodeError("a supported-PID bitmap is 4 bytes", reason="truncated")
    bits = int.from_bytes(data, "big")
    return {base + n for n in range(1, 33) if bits & (1 << (32 - n))}


def next_bitmap_pid(supported: set[int] | frozenset[int], asked: set[int]) -> int | None:
    """Discovery: the next bitmap PID to ask for, or None when discovery is complete."""
    if 0x00 not in asked:
        return 0x00
    for pid in BITMAP_PIDS[1:]:
        if pid in supported and pid not in asked:
            return pid
    return None


def decode_vin(data: bytes) -> str:
    """Service 09 PID 02 data: [count byte] + 17 characters, maybe NUL-padded in front."""
    if len(data) == VIN_LENGTH + 1:
        data = data[1:]  # ISO 15765-4: the number-of-data-items byte (always 1)
    stripped = data.lstrip(b"\x00")
    if len(stripped) != VIN_LENGTH or len(data) > VIN_LENGTH + 3:
        raise DecodeError(f"VIN of {len(stripped)} characters, expected 17",
                          reason="wrong-length")
    try:
        vin = stripped.decode("ascii")
    except UnicodeDecodeError:
        raise DecodeError("VIN is not ASCII", reason="invalid-vin") from None
    if not set(vin) <= VIN_ALPHABET:
        raise DecodeError("VIN has characters outside ISO 3779", reason="invalid-vin")
    return vin


DTC_LETTERS = "PCBU"


def decode_dtcs(body: bytes) -> tuple[str, ...]:
    """Services 03/07 on CAN (ISO 15765-4): [count] + 2 bytes per DTC (SAE J2012 form)."""
    if not body:
        raise DecodeError("DTC answer without count byte", reason="truncated")
    count, pairs = body[0], body[1:]
    if len(pairs) != 2 * count:
        raise DecodeError(f"DTC count {count} but {len(pairs)} bytes", reason="wrong-length")
    codes = []
    for i in range(0, len(pairs), 2):
        a, b = pairs[i], pairs[i + 1]
        if a == 0 and b == 0:
            continue  # padding, not a code
        codes.append(f"{DTC_LETTERS[a >> 6]}{(a >> 4) & 0x3}{a & 0xF:X}{b:02X}")
    return tuple(codes)


def pid_spec(ref: str | int) -> PidSpec:
    """A table entry by key (``SPEED``), hex string (``0D``/``0x0D``) or number."""
    if isinstance(ref, int):
        spec = PIDS.get(ref)
    else:
        text = ref.strip().upper()
        spec = PIDS_BY_KEY.get(text)
        if spec is None:
            try:
                spec = PIDS.get(int(text, 16))
            except ValueError:
                spec = None
    if spec is None:
        raise LocalProtocolError(f"unknown PID {ref!r}", reason="unknown-pid")
    return spec


def markdown_table() -> str:
    """The service 01 table as Markdown (docs/vehicle.md embeds it; a test keeps it equal)."""
    rows = ["| PID | key | VSS name | unit | bytes | value |", "|---|---|---|---|---|---|"]
    for s in sorted(PIDS.values(), key=lambda s: s.pid):
        if s.composite is not None:
            doc = (s.composite.__doc__ or "").split(":")[0].strip()
            rows.append(f"| {s.pid:02X} | {s.key} | several ({doc}) | | {s.length} | "
                        f"`{s.composite.__name__}` |")
            continue
        raw = "signed raw" if s.signed else "raw"
        formula = raw if s.mul == 1 else f"{raw} * {s.mul}"
        formula = formula if s.div == 1 else f"{formula} / {s.div}"
        formula = formula if not s.offset else f"{formula} {'+' if s.offset > 0 else '-'} " \
                                                f"{abs(s.offset)}"
        rows.append(f"| {s.pid:02X} | {s.key} | {s.name} | {s.unit} | {s.length} | {formula} |")
    return "\n".join(rows) + "\n"
