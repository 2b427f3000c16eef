"""Readings and the one table of signal names and units.

A reading is one measured value at one instant from one source. Names follow COVESA VSS for
vehicle signals (``Vehicle.Speed``) and carry the OBIS code for meter quantities
(``1-0:1.8.0``). Units are UCUM-style codes (``km/h``, ``Cel``, ``%``, ``Wh``, ``W``, ``mV``,
``mA``, ``km``, ``/min``). Money and energy are integers; floats only where the source is
truly continuous (a temperature), never NaN or infinite.

Time status follows OCMF: ``S`` synced clock, ``U`` unsynced (a Pi without RTC before NTP),
``R`` relative (monotonic since boot).

``SIGNALS`` maps every name an adapter may emit to its unit. Adapters look names up here so
that a typo in a PID table or register map fails at import/test time, not in the field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

from agent.errors import ConfigError

Value = int | float | str | bytes

MAX_NAME_LEN = 128
MAX_UNIT_LEN = 16
MAX_SOURCE_LEN = 64
MAX_METER_LEN = 64
# Long enough for a signed OCMF record (S.A.F.E. OCMF: payload + signature, ~1 kB).
MAX_TEXT_VALUE_LEN = 4096
MAX_FLAGS, MAX_FLAG_LEN = 8, 32
# CBOR major types 0/1 carry integers in [-2**64, 2**64 - 1] (RFC 8949 s3.1); beyond that
# cbor2 writes a bignum tag, which the envelope verifier refuses. The Reading type refuses
# such values itself, so the sealer can never seal a reading the verifier would reject.
CBOR_INT_MIN, CBOR_INT_MAX = -(1 << 64), (1 << 64) - 1


class TimeStatus(StrEnum):
    SYNCED = "S"
    UNSYNCED = "U"
    RELATIVE = "R"


_TIME_STATUS: dict[str, TimeStatus] = {status.value: status for status in TimeStatus}


@dataclass(frozen=True, slots=True)
class Reading:
    """One value. ``flags`` marks readings an adapter found implausible (e.g. ``"implausible"``).

    ``meter`` names the device behind the source that measured the value, when a source
    has several (a Modbus line with meters at unit ids 1 and 2): ``"<unit id>"`` or
    ``"<unit id>/<serial>"`` when the meter reports a serial number. Empty when the
    source is the device (an OBD adapter) or does not know.

    Every value the constructor accepts can be sealed and verified (module rule above):
    ints within CBOR's 64-bit range, finite floats, text that encodes as UTF-8, bounded
    lengths. A check fails with ValueError, here where the reading is built, never later
    in the sealer or at the verifier.
    """

    name: str
    value: Value
    unit: str
    ts_ns: int
    time_status: TimeStatus = TimeStatus.SYNCED
    source: str = ""
    flags: tuple[str, ...] = ()
    meter: str = ""

    def __post_init__(self) -> None:
        # Every check has a fast form for the common case (exact built-in types, ASCII
        # text, which always encodes as UTF-8) and falls back to the full check, which
        # decides and words the error: readings are built per value on the agent and per
        # reading at the fleet's ingest, and the full checks were most of their cost.
        name, value = self.name, self.value
        if type(name) is not str or not 1 <= len(name) <= MAX_NAME_LEN or not name.isascii():
            _check_text(name, "name", 1, MAX_NAME_LEN, name)
        if type(value) is int:
            if not CBOR_INT_MIN <= value <= CBOR_INT_MAX:
                raise ValueError(f"{name}: integer value outside CBOR's 64-bit range")
        elif type(value) is float:
            if not math.isfinite(value):
                raise ValueError(f"{name}: value must be finite, got {value!r}")
        elif type(value) is bytes and len(value) <= MAX_TEXT_VALUE_LEN:
            pass
        elif not (type(value) is str and len(value) <= MAX_TEXT_VALUE_LEN
                  and value.isascii()):
            _check_value(name, value)
        unit = self.unit
        if type(unit) is not str or len(unit) > MAX_UNIT_LEN or not unit.isascii():
            _check_text(unit, "unit", 0, MAX_UNIT_LEN, name)
        ts_ns = self.ts_ns
        if type(ts_ns) is not int or not 0 <= ts_ns <= CBOR_INT_MAX:
            if isinstance(ts_ns, bool) or not isinstance(ts_ns, int) \
                    or not 0 <= ts_ns <= CBOR_INT_MAX:
                raise ValueError(f"{name}: ts_ns must be a non-negative 64-bit int")
        if not isinstance(self.time_status, TimeStatus):
            object.__setattr__(self, "time_status", TimeStatus(self.time_status))
        source, meter = self.source, self.meter
        if type(source) is not str or len(source) > MAX_SOURCE_LEN or not source.isascii():
            _check_text(source, "source", 0, MAX_SOURCE_LEN, name)
        if meter != "":
            _check_text(meter, "meter", 0, MAX_METER_LEN, name)
        flags = self.flags
        if flags != ():
            if not isinstance(flags, tuple) or len(flags) > MAX_FLAGS:
                raise ValueError(f"{name}: flags must be a tuple of at most {MAX_FLAGS}")
            for flag in flags:
                _check_text(flag, "flag", 1, MAX_FLAG_LEN, name)

    def to_cbor_item(self) -> list[object]:
        """The envelope's array form: [name, value, unit, ts_ns, status, source(, flags
        (, meter))]. Optional items are appended only when set, so a reading without them
        encodes exactly as before (flags is an empty array when only meter is set)."""
        item: list[object] = [
            self.name, self.value, self.unit, self.ts_ns, self.time_status.value, self.source
        ]
        if self.flags or self.meter:
            item.append(list(self.flags))
        if self.meter:
            item.append(self.meter)
        return item

    @classmethod
    def from_cbor_item(cls, item: object) -> Reading:
        """Inverse of :meth:`to_cbor_item`; raises ValueError on a wrong shape or value. One
        encoding per reading: flags is non-empty when it is the last item, meter is
        non-empty when present."""
        if not isinstance(item, list) or len(item) not in (6, 7, 8):
            raise ValueError("a reading is an array of 6, 7 or 8 items")
        name, value, unit, ts_ns, status, source = item[:6]
        flags = item[6] if len(item) >= 7 else []
        meter = item[7] if len(item) == 8 else ""
        if not isinstance(flags, list) or not flags and len(item) == 7:
            raise ValueError("reading flags must be a non-empty array when last")
        if not isinstance(meter, str) or len(item) == 8 and not meter:
            raise ValueError("reading meter must be a non-empty string when present")
        # The fields' types and bounds are the constructor's checks (__post_init__), made
        # once; only what the array form adds is checked here.
        time_status = _TIME_STATUS.get(status) if isinstance(status, str) else None
        if time_status is None:
            raise ValueError(f"unknown time status {status!r}")
        return cls(name, value, unit, ts_ns, time_status, source, tuple(flags), meter)


def _check_value(name: str, value: object) -> None:
    """The full check of a value that is not an exact int, float or short bytes or ASCII
    text (the fast forms in Reading.__post_init__)."""
    if isinstance(value, bool) or not isinstance(value, int | float | str | bytes):
        raise ValueError(f"{name}: value must be int, float, str or bytes")
    if isinstance(value, int) and not CBOR_INT_MIN <= value <= CBOR_INT_MAX:
        raise ValueError(f"{name}: integer value outside CBOR's 64-bit range")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{name}: value must be finite, got {value!r}")
    if isinstance(value, str):
        _check_text(value, "value", 0, MAX_TEXT_VALUE_LEN, name)
    if isinstance(value, bytes) and len(value) > MAX_TEXT_VALUE_LEN:
        raise ValueError(f"{name}: value longer than {MAX_TEXT_VALUE_LEN}")


def _check_text(text: object, what: str, low: int, high: int, name: object) -> None:
    """A string of ``low..high`` characters that encodes as UTF-8 (no lone surrogates:
    CBOR text is UTF-8, RFC 8949 s3.1, and cbor2 raises on them while sealing)."""
    if not isinstance(text, str) or not low <= len(text) <= high:
        raise ValueError(f"{name!r}: {what} must be a string of {low}..{high} chars")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{name!r}: {what} is not valid Unicode text") from None


@dataclass(frozen=True, slots=True)
class SignalSpec:
    name: str
    unit: str
    description: str


def _table(*rows: tuple[str, str, str]) -> dict[str, SignalSpec]:
    return {name: SignalSpec(name, unit, text) for name, unit, text in rows}


# Vehicle signals: COVESA VSS 4.x names (Vehicle.OBD.* where VSS has only the OBD branch).
VEHICLE_SIGNALS: dict[str, SignalSpec] = _table(
    ("Vehicle.Speed", "km/h", "vehicle speed"),
    ("Vehicle.TraveledDistance", "km", "odometer"),
    ("Vehicle.Powertrain.TractionBattery.StateOfCharge.Current", "%", "state of charge"),
    ("Vehicle.Powertrain.TractionBattery.CurrentVoltage", "V", "traction battery voltage"),
    ("Vehicle.Powertrain.TractionBattery.CurrentCurrent", "A", "traction battery current"),
    ("Vehicle.Powertrain.TractionBattery.Charging.IsCharging", "", "charging flag"),
    ("Vehicle.Powertrain.TractionBattery.AccumulatedChargedEnergy", "Wh",
     "energy charged into the traction battery over its life (battery side)"),
    ("Vehicle.Powertrain.TractionBattery.AccumulatedConsumedEnergy", "Wh",
     "energy taken from the traction battery over its life (battery side)"),
    ("Vehicle.Powertrain.TractionBattery.Charging.PowerLoss", "W",
     "on-board charger losses"),
    ("Vehicle.Powertrain.FuelSystem.Level", "%", "fuel tank level"),
    ("Vehicle.Exterior.AirTemperature", "Cel", "ambient air temperature"),
    ("Vehicle.OBD.EngineSpeed", "/min", "engine speed"),
    ("Vehicle.OBD.CoolantTemperature", "Cel", "engine coolant temperature"),
    ("Vehicle.OBD.EngineLoad", "%", "calculated engine load"),
    ("Vehicle.OBD.ThrottlePosition", "%", "throttle position"),
    ("Vehicle.OBD.DistanceSinceDTCClear", "km", "distance since codes cleared"),
    ("Vehicle.OBD.HybridBatteryRemaining", "%", "hybrid battery pack remaining life"),
    ("Vehicle.OBD.ControlModuleVoltage", "V", "control module voltage"),
    ("Vehicle.OBD.RunTime", "s", "run time since engine start"),
    ("Vehicle.OBD.IntakeTemp", "Cel", "intake air temperature"),
    ("Vehicle.OBD.MAF", "g/s", "mass air flow rate"),
    ("Vehicle.VehicleIdentification.VIN", "", "vehicle identification number"),
    ("Vehicle.OBD.DTCList", "", "stored diagnostic trouble codes"),
    ("Vehicle.Event.Odometer", "", "odometer integrity event"),
    # SAE J1979 service 01 PIDs without a VSS branch of their own (firmware_adapters.obd.pids)
    ("Vehicle.OBD.ShortTermFuelTrim1", "%", "short term fuel trim bank 1"),
    ("Vehicle.OBD.LongTermFuelTrim1", "%", "long term fuel trim bank 1"),
    ("Vehicle.OBD.ShortTermFuelTrim2", "%", "short term fuel trim bank 2"),
    ("Vehicle.OBD.LongTermFuelTrim2", "%", "long term fuel trim bank 2"),
    ("Vehicle.OBD.FuelPressure", "kPa", "fuel pressure"),
    ("Vehicle.OBD.MAP", "kPa", "intake manifold absolute pressure"),
    ("Vehicle.OBD.TimingAdvance", "deg", "timing advance"),
    ("Vehicle.OBD.DistanceWithMIL", "km", "distance travelled with MIL on"),
    ("Vehicle.OBD.FuelRailPressureVac", "kPa", "fuel rail pressure relative to vacuum"),
    ("Vehicle.OBD.FuelRailPressureDirect", "kPa", "fuel rail gauge pressure"),
    ("Vehicle.OBD.CommandedEGR", "%", "commanded EGR"),
    ("Vehicle.OBD.EGRError", "%", "EGR error"),
    ("Vehicle.OBD.CommandedEVAP", "%", "commanded evaporative purge"),
    ("Vehicle.OBD.WarmupsSinceDTCClear", "1", "warm-ups since codes cleared"),
    ("Vehicle.OBD.EVAPVaporPressure", "Pa", "evap system vapour pressure"),
    ("Vehicle.OBD.BarometricPressure", "kPa", "barometric pressure"),
    ("Vehicle.OBD.Catalyst.Bank1.Temperature1", "Cel", "catalyst temperature B1S1"),
    ("Vehicle.OBD.Catalyst.Bank2.Temperature1", "Cel", "catalyst temperature B2S1"),
    ("Vehicle.OBD.Catalyst.Bank1.Temperature2", "Cel", "catalyst temperature B1S2"),
    ("Vehicle.OBD.Catalyst.Bank2.Temperature2", "Cel", "catalyst temperature B2S2"),
    ("Vehicle.OBD.AbsoluteLoad", "%", "absolute load value"),
    ("Vehicle.OBD.CommandedEquivalenceRatio", "1", "commanded air-fuel equivalence ratio"),
    ("Vehicle.OBD.RelativeThrottlePosition", "%", "relative throttle position"),
    ("Vehicle.OBD.ThrottlePositionB", "%", "absolute throttle position B"),
    ("Vehicle.OBD.ThrottlePositionC", "%", "absolute throttle position C"),
    ("Vehicle.OBD.AcceleratorPositionD", "%", "accelerator pedal position D"),
    ("Vehicle.OBD.AcceleratorPositionE", "%", "accelerator pedal position E"),
    ("Vehicle.OBD.AcceleratorPositionF", "%", "accelerator pedal position F"),
    ("Vehicle.OBD.ThrottleActuator", "%", "commanded throttle actuator"),
    ("Vehicle.OBD.RunTimeMIL", "min", "time run with MIL on"),
    ("Vehicle.OBD.TimeSinceDTCCleared", "min", "time since codes cleared"),
    ("Vehicle.OBD.EthanolPercent", "%", "ethanol fuel percentage"),
    ("Vehicle.OBD.FuelRailPressureAbsolute", "kPa", "fuel rail absolute pressure"),
    ("Vehicle.OBD.RelativeAcceleratorPosition", "%", "relative accelerator pedal position"),
    ("Vehicle.OBD.OilTemperature", "Cel", "engine oil temperature"),
    ("Vehicle.OBD.FuelInjectionTiming", "deg", "fuel injection timing"),
    ("Vehicle.OBD.FuelRate", "L/h", "engine fuel rate"),
    ("Vehicle.OBD.DriverDemandEngineTorque", "%", "driver's demand engine torque"),
    ("Vehicle.OBD.ActualEngineTorque", "%", "actual engine torque"),
    ("Vehicle.OBD.EngineReferenceTorque", "N.m", "engine reference torque"),
    ("Vehicle.OBD.DTCPendingList", "", "pending diagnostic trouble codes"),
    # SAE J1979 PIDs 01/1C/51 and services 09/0A (firmware_adapters.obd.pids)
    ("Vehicle.OBD.Status.IsMILOn", "", "malfunction indicator lamp on (1) or off (0)"),
    ("Vehicle.OBD.Status.DTCCount", "1", "number of stored emission DTCs"),
    ("Vehicle.OBD.Status.IgnitionType", "", "spark or compression ignition monitors"),
    ("Vehicle.OBD.Status.MonitorsNotReady", "", "supported readiness monitors not complete"),
    ("Vehicle.OBD.OBDStandards", "1", "OBD standard the vehicle conforms to (J1979 code)"),
    ("Vehicle.OBD.FuelType", "1", "fuel type (J1979 code; 8 = electric)"),
    ("Vehicle.OBD.CalibrationIDs", "", "calibration identifications (service 09 PID 04)"),
    ("Vehicle.OBD.ECUName", "", "ECU name (service 09 PID 0A)"),
    ("Vehicle.OBD.DTCPermanentList", "", "permanent diagnostic trouble codes (service 0A)"),
    # Traction battery (UDS profiles, J1939): VSS 4.x names; energy as integer Wh
    ("Vehicle.Powertrain.TractionBattery.StateOfCharge.Displayed", "%", "SoC shown to the driver"),
    ("Vehicle.Powertrain.TractionBattery.StateOfHealth", "%", "battery state of health"),
    ("Vehicle.Powertrain.TractionBattery.CellVoltage.Max", "V", "highest cell voltage"),
    ("Vehicle.Powertrain.TractionBattery.CellVoltage.Min", "V", "lowest cell voltage"),
    ("Vehicle.Powertrain.TractionBattery.Temperature.Max", "Cel", "highest battery temperature"),
    ("Vehicle.Powertrain.TractionBattery.Temperature.Min", "Cel", "lowest battery temperature"),
    ("Vehicle.Powertrain.TractionBattery.Temperature.Average", "Cel",
     "average battery temperature"),
    ("Vehicle.Powertrain.TractionBattery.AccumulatedChargedEnergy", "Wh",
     "energy charged into the battery over its life (charger energy counter)"),
    ("Vehicle.Powertrain.TractionBattery.AccumulatedConsumedEnergy", "Wh",
     "energy taken from the battery over its life"),
    ("Vehicle.Powertrain.TractionBattery.Charging.IsChargingCableConnected", "",
     "charging cable plugged in (1) or not (0)"),
)

# Meter quantities: OBIS codes (IEC 62056-61). Energy in Wh, power in W, voltage in mV,
# current in mA: integers scaled at the register decoder, never floats.
METER_SIGNALS: dict[str, SignalSpec] = _table(
    ("1-0:1.8.0", "Wh", "active energy import, total"),
    ("1-0:2.8.0", "Wh", "active energy export, total"),
    ("1-0:3.8.0", "varh", "reactive energy import, total"),
    ("1-0:4.8.0", "varh", "reactive energy export, total"),
    ("1-0:16.7.0", "W", "active power, total (import minus export)"),
    ("1-0:1.7.0", "W", "active power import, total"),
    ("1-0:21.7.0", "W", "active power L1"),
    ("1-0:41.7.0", "W", "active power L2"),
    ("1-0:61.7.0", "W", "active power L3"),
    ("1-0:32.7.0", "mV", "voltage L1"),
    ("1-0:52.7.0", "mV", "voltage L2"),
    ("1-0:72.7.0", "mV", "voltage L3"),
    ("1-0:31.7.0", "mA", "current L1"),
    ("1-0:51.7.0", "mA", "current L2"),
    ("1-0:71.7.0", "mA", "current L3"),
    ("1-0:14.7.0", "mHz", "supply frequency"),
    ("1-0:13.7.0", "1/1000", "power factor, total (thousandths)"),
    ("Meter.Event.Plausibility", "", "meter plausibility event"),
    # Eichrecht meters: the meter's own signed record (S.A.F.E. OCMF "OCMF|payload|sig",
    # sealed unchanged) and its public key (hex DER SubjectPublicKeyInfo, OCMF s5).
    ("Meter.OCMF", "", "meter-signed OCMF record"),
    ("Meter.PublicKey", "", "meter signing public key (hex DER)"),
)

SIGNALS: dict[str, SignalSpec] = {**VEHICLE_SIGNALS, **METER_SIGNALS}


def signal(name: str) -> SignalSpec:
    """The spec of a known signal name; ConfigError naming the signal if unknown."""
    try:
        return SIGNALS[name]
    except KeyError:
        raise ConfigError(key=name, expected="a signal name from agent.readings.SIGNALS",
                          found=name) from None


@dataclass(frozen=True, slots=True)
class Event:
    """Something a source or the agent noticed that a verifier must see: a decreasing
    odometer, an implausible meter step, a dropped range. Signed like readings, in an
    envelope of kind ``event``. ``code`` is kebab-case (``odometer-decreased``); ``details``
    holds small structured values (ints and short strings), never secrets."""

    code: str
    message: str
    ts_ns: int
    source: str = ""
    details: tuple[tuple[str, int | str], ...] = ()

    def __post_init__(self) -> None:
        _check_text(self.code, "code", 1, 64, "event")
        _check_text(self.message, "message", 0, 512, self.code)
        _check_text(self.source, "source", 0, MAX_SOURCE_LEN, self.code)
        if isinstance(self.ts_ns, bool) or not isinstance(self.ts_ns, int) \
                or not 0 <= self.ts_ns <= CBOR_INT_MAX:
            raise ValueError("event ts_ns must be a non-negative 64-bit int")
        for key, value in self.details:
            if isinstance(value, bool) or not isinstance(value, int | str):
                raise ValueError("event details are (str, int | str) pairs")
            _check_text(key, "detail key", 1, 64, self.code)
            if isinstance(value, str):
                _check_text(value, "detail", 0, MAX_TEXT_VALUE_LEN, self.code)
            elif not CBOR_INT_MIN <= value <= CBOR_INT_MAX:
                raise ValueError(f"{self.code}: detail {key} outside CBOR's 64-bit range")
        if len({key for key, _ in self.details}) != len(self.details):
            raise ValueError(f"{self.code}: a detail key appears twice")

    def to_cbor_item(self) -> dict[str, object]:
        # Text keys only: one major type per map keeps cbor2's canonical order equal to
        # RFC 8949 s4.2.1 bytewise order (see agent.dcbor).
        item: dict[str, object] = {"code": self.code, "msg": self.message, "ts": self.ts_ns,
                                   "src": self.source}
        if self.details:
            item["det"] = dict(self.details)
        return item

    @classmethod
    def from_cbor_item(cls, item: object) -> Event:
        if not isinstance(item, dict) or not {"code", "msg", "ts", "src"} <= item.keys():
            raise ValueError("an event is a map with code, msg, ts, src")
        details = item.get("det", {})
        if not isinstance(details, dict) or set(item) - {"code", "msg", "ts", "src", "det"}:
            raise ValueError("unexpected event fields")
        if "det" in item and not details:   # the sealer leaves it out: one encoding only
            raise ValueError("det is absent when there are no details, never empty")
        return cls(item["code"], item["msg"], item["ts"], item["src"],
                   tuple(sorted(details.items())))
