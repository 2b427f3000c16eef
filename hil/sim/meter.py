"""A kWh meter simulator: a pymodbus server serving any register map from a charging profile.

Use it in-process (the demo, the payment channel, tests)::

    sim = MeterSimulator({1: "sdm630"}, ChargingProfile.constant(11_000))
    port = await sim.start_tcp()            # 127.0.0.1, a free port
    sim.set_power(-3_000)                   # V2G: feeding the grid from now on
    sim.energy_wh(1)                        # (import Wh, export Wh) as the meter counts it

With ``clock=ManualClock()`` time moves only on ``sim.advance(seconds)``.
    await sim.stop()

or as a process: ``python -m hil.sim.meter --map sdm630 --tcp 127.0.0.1:5020`` or
``--serial /dev/pts/7 --baudrate 9600``.

The meter's state is a pure model (:class:`MeterModel`): signed active power from the
profile (import minus export, W), energy counters integrated exactly (Fractions of Wh),
voltages, currents, frequency and power factor derived from it. Registers are rendered from
the map on every read (pymodbus ``SimDevice.action``), quantised exactly as the real meter
would hold them; :meth:`MeterSimulator.served_values` says which integers a correct decoder
must get back. Time comes from a clock callable, so tests freeze or advance it.

Faults for the bad-input tests are injected per unit: a silent meter, an exception reply,
a CRC error, a short frame, a reply from the wrong unit id (:class:`Fault`); and per
quantity, raw register contents (``sim.set_raw(unit, name, words)``: a "not available"
sentinel, a float glitch such as 1e30).

Like the real meter, the simulator enforces its map's documented limits: a read of more
than ``max_read`` registers gets exception 03 (ILLEGAL DATA VALUE, Modbus Application
Protocol v1.1b3 s6.3/s6.4: "quantity of registers" out of range), a read outside the
mapped spans or with the wrong function code gets exception 02 (ILLEGAL DATA ADDRESS).
Identity registers (serial number, model) and scale-factor registers are served from the
map; a map with ``extra_holding`` (the WM3M4C's OCMF interface) gets a signing meter
(:mod:`hil.sim.signed_meter`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import enum
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from functools import partial

from pymodbus.constants import ExcCodes
from pymodbus.framer import FramerType
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.simulator import DataType as SimType
from pymodbus.simulator import SimData, SimDevice

from firmware_adapters.modbus.mapfile import load_map
from firmware_adapters.modbus.registers import (
    FUNCTION_HOLDING,
    FUNCTION_INPUT,
    IdentityField,
    IdentityKind,
    MeterMap,
    RegisterSpec,
    raw_for_value,
    raw_to_registers,
    scale_raw,
)
from firmware_adapters.modbus.rtu import with_crc

Clock = Callable[[], float]


class ManualClock:
    """A clock that moves only when told (seconds, float)."""

    def __init__(self, start: float = 0.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("time does not go backwards")
        self.now += seconds


@dataclass(frozen=True, slots=True)
class ChargingProfile:
    """Piecewise-constant signed active power: ``steps`` are (seconds from start, W);
    positive = the car draws (import), negative = it feeds back (V2G export)."""

    steps: tuple[tuple[float, int], ...]

    def __post_init__(self) -> None:
        if not self.steps or self.steps[0][0] != 0:
            raise ValueError("a profile starts with a step at t = 0")
        times = [t for t, _ in self.steps]
        if times != sorted(times) or len(set(times)) != len(times):
            raise ValueError("profile steps must be in increasing time order")

    @classmethod
    def constant(cls, power_w: int) -> ChargingProfile:
        return cls(((0.0, power_w),))

    @classmethod
    def from_pairs(cls, pairs: Sequence[Sequence[float]]) -> ChargingProfile:
        return cls(tuple((float(t), int(p)) for t, p in pairs))

    def power_at(self, t: float) -> int:
        power = self.steps[0][1]
        for start, step_power in self.steps:
            if start > t:
                break
            power = step_power
        return power

    def energy_between(self, t0: float, t1: float) -> tuple[Fraction, Fraction]:
        """(import Wh, export Wh) delivered in [t0, t1], exactly."""
        imported = exported = Fraction(0)
        bounds = [t for t, _ in self.steps if t0 < t < t1]
        edges = [t0, *bounds, t1]
        for start, end in zip(edges, edges[1:], strict=False):
            power = self.power_at(start)
            joules = Fraction(power) * (Fraction(end) - Fraction(start))
            if power > 0:
                imported += joules / 3600
            else:
                exported -= joules / 3600
        return imported, exported


class MeterModel:
    """One simulated meter: the physics, no I/O."""

    def __init__(self, meter_map: MeterMap, profile: ChargingProfile, clock: Clock, *,
                 import_wh: int = 12_345_600, export_wh: int = 1_234_500,
                 voltages_mv: tuple[int, int, int] = (230_100, 229_800, 231_200),
                 frequency_mhz: int = 49_980, power_factor: int = 990,
                 serial: str = "20240917") -> None:
        self.map = meter_map
        self.serial = serial
        self.overrides: dict[str, list[int]] = {}
        self.clock = clock
        self._profile = profile
        self._origin = clock()
        self._at = self._origin
        self._import = Fraction(import_wh)
        self._export = Fraction(export_wh)
        self.voltages_mv = voltages_mv
        self.frequency_mhz = frequency_mhz
        self.power_factor = power_factor
        names = {spec.name for spec in meter_map.registers}
        self.phases = 3 if names & {"1-0:52.7.0", "1-0:41.7.0", "1-0:51.7.0"} else 1

    def _advance(self) -> None:
        now = self.clock()
        if now > self._at:
            imported, exported = self._profile.energy_between(self._at - self._origin,
                                                              now - self._origin)
            self._import += imported
            self._export += exported
            self._at = now

    @property
    def power_w(self) -> int:
        return self._profile.power_at(self.clock() - self._origin)

    def set_profile(self, profile: ChargingProfile) -> None:
        """Replace the profile from now on (its t = 0 is now)."""
        self._advance()
        self._profile, self._origin = profile, self._at

    def set_power(self, power_w: int) -> None:
        self.set_profile(ChargingProfile.constant(power_w))

    def energy_wh(self) -> tuple[int, int]:
        """Exact counters (import, export), floor to whole Wh."""
        self._advance()
        return int(self._import), int(self._export)

    def set_energy_wh(self, import_wh: int, export_wh: int) -> None:
        """Force the counters (e.g. a meter swap or a glitch for a plausibility test)."""
        self._advance()
        self._import, self._export = Fraction(import_wh), Fraction(export_wh)

    def values(self) -> dict[str, int]:
        """The ideal quantities now, in METER_SIGNALS units."""
        self._advance()
        power = self.power_w
        per_phase = [power // self.phases] * self.phases
        per_phase[0] += power - sum(per_phase)
        values = {"1-0:1.8.0": int(self._import), "1-0:2.8.0": int(self._export),
                  "1-0:3.8.0": int(self._import) // 10, "1-0:4.8.0": int(self._export) // 10,
                  "1-0:16.7.0": power, "1-0:1.7.0": max(power, 0),
                  "1-0:14.7.0": self.frequency_mhz,
                  "1-0:13.7.0": self.power_factor if power >= 0 else -self.power_factor}
        for index, (v_name, i_name, p_name) in enumerate(_PHASES[:self.phases]):
            voltage = self.voltages_mv[index]
            values[v_name] = voltage
            values[p_name] = per_phase[index]
            values[i_name] = abs(per_phase[index]) * 1_000_000 // voltage
        return values

    def exponent(self, spec: RegisterSpec) -> int:
        """The power of ten this meter keeps in ``spec``'s scale-factor register: chosen so
        that the value fits its type (SunSpec int16 watts) and differs from 0, so a decoder
        that ignores the scale factor reads a wrong value."""
        if spec.scale_from is None:
            return 0
        return {"W": 1, "Wh": 1, "mV": -1, "mA": -2, "mHz": -2, "1/1000": -1}.get(spec.unit, 0)

    def raw(self) -> dict[str, int | float | Fraction]:
        values = self.values()
        return {spec.name: raw_for_value(spec, values.get(spec.name, 0), self.exponent(spec))
                for spec in self.map.registers}

    def served_values(self) -> dict[str, int]:
        """What a correct decoder must read right now: the quantised register contents,
        scaled back exactly."""
        raw = self.raw()
        return {spec.name: scale_raw(spec, raw[spec.name], self.exponent(spec))
                for spec in self.map.registers if spec.name not in self.overrides}

    def render(self, function: int, start: int, registers: list[int]) -> None:
        """Write every register of ``function`` into ``registers`` (index 0 = ``start``)."""
        raw = self.raw()
        for spec in self.map.registers:
            if spec.function != function:
                continue
            offset = spec.address - start
            words = self.overrides.get(spec.name) or raw_to_registers(spec, raw[spec.name])
            registers[offset:offset + spec.count] = words
            if spec.scale_from is not None:
                registers[spec.scale_from - start] = self.exponent(spec) & 0xFFFF
        for field, text in ((self.map.serial, self.serial), (self.map.model_id, self.model_text)):
            if field is not None and field.function == function:
                offset = field.address - start
                registers[offset:offset + field.count] = identity_words(field, text)

    @property
    def model_text(self) -> str:
        field = self.map.model_id
        return (field.match[0] if field and field.match else self.map.model)[:32]


def identity_words(field: IdentityField, text: str) -> list[int]:
    """The registers a meter shows its serial or model in (ASCII two per register, high
    byte first, NUL padded; one letter per register; or a decimal number)."""
    if field.kind is IdentityKind.ASCII:
        data = text.encode("ascii", "replace")[:2 * field.count].ljust(2 * field.count, b"\0")
        return [int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2)]
    if field.kind is IdentityKind.CHAR:  # one letter per register (Carlo Gavazzi 5000h)
        return list(text.encode("ascii", "replace")[:field.count].ljust(field.count, b"\0"))
    number = int(text) if text.isdigit() else 0
    if field.kind is IdentityKind.UINT16:
        return [number & 0xFFFF]
    return [(number >> 16) & 0xFFFF, number & 0xFFFF]


_PHASES = (("1-0:32.7.0", "1-0:31.7.0", "1-0:21.7.0"),
           ("1-0:52.7.0", "1-0:51.7.0", "1-0:41.7.0"),
           ("1-0:72.7.0", "1-0:71.7.0", "1-0:61.7.0"))


class Fault(enum.Enum):
    SILENT = "silent"            # the meter does not answer at all
    EXCEPTION = "exception"      # exception reply 04 (server device failure)
    CRC = "crc"                  # the reply's CRC is wrong (RTU)
    SHORT = "short"              # the reply is cut in half (RTU)
    WRONG_UNIT = "wrong-unit"    # a well-formed reply from another unit id (RTU)


class MeterSimulator:
    """Several meters (unit ids) behind one server, over TCP or one serial line."""

    def __init__(self, meters: Mapping[int, str | MeterMap],
                 profile: ChargingProfile | None = None, clock: Clock = time.monotonic,
                 **model_options: object) -> None:
        self.clock = clock
        profile = profile or ChargingProfile.constant(0)
        self.meters: dict[int, MeterModel] = {}
        for unit, meter_map in meters.items():
            if not 1 <= unit <= 247:
                raise ValueError(f"unit id {unit} out of 1..247")
            resolved = load_map(meter_map) if isinstance(meter_map, str) else meter_map
            self.meters[unit] = MeterModel(resolved, profile, clock, **model_options)  # type: ignore[arg-type]
        self._faults: dict[int, tuple[Fault, int | None]] = {}
        self.requests: dict[int, int] = dict.fromkeys(self.meters, 0)
        self.refused: dict[int, int] = dict.fromkeys(self.meters, 0)  # over max_read
        from hil.sim.signed_meter import SigningMeter

        self.signed = {unit: SigningMeter(model, clock) for unit, model in self.meters.items()
                       if model.map.extra_holding}
        self._server: ModbusTcpServer | ModbusSerialServer | None = None
        self._watch: asyncio.Task[None] | None = None
        self._rtu = False

    # ------------------------------------------------------------------ control

    def set_power(self, power_w: int, unit: int | None = None) -> None:
        for model in self._select(unit):
            model.set_power(power_w)

    def set_profile(self, profile: ChargingProfile, unit: int | None = None) -> None:
        for model in self._select(unit):
            model.set_profile(profile)

    def advance(self, seconds: float) -> None:
        """Move simulated time on (only with a :class:`ManualClock`)."""
        if not isinstance(self.clock, ManualClock):
            raise TypeError("advance() needs MeterSimulator(..., clock=ManualClock())")
        self.clock.advance(seconds)

    def energy_wh(self, unit: int | None = None) -> tuple[int, int]:
        """(import Wh, export Wh) of ``unit`` (default: the first meter)."""
        return self._select(unit)[0].energy_wh()

    def set_energy_wh(self, import_wh: int, export_wh: int, unit: int | None = None) -> None:
        """Force the counters (a meter swap, or a glitch for a plausibility test)."""
        for model in self._select(unit):
            model.set_energy_wh(import_wh, export_wh)

    def served_values(self, unit: int | None = None) -> dict[str, int]:
        return self._select(unit)[0].served_values()

    def set_raw(self, unit: int, name: str, words: list[int] | None) -> None:
        """Serve ``words`` for quantity ``name`` of ``unit`` from now on (a sentinel, a
        glitch); None goes back to the model's value."""
        model = self.meters[unit]
        spec = model.map.spec(name)
        if words is None:
            model.overrides.pop(name, None)
        elif len(words) != spec.count or not all(0 <= w <= 0xFFFF for w in words):
            raise ValueError(f"{name} takes {spec.count} registers of 0..65535")
        else:
            model.overrides[name] = list(words)

    def inject(self, unit: int, fault: Fault, times: int | None = None) -> None:
        """Apply ``fault`` to the next ``times`` replies of ``unit`` (None: until cleared)."""
        self._faults[unit] = (fault, times)

    def clear(self, unit: int | None = None) -> None:
        if unit is None:
            self._faults.clear()
        else:
            self._faults.pop(unit, None)

    def _select(self, unit: int | None) -> list[MeterModel]:
        if unit is None:
            return list(self.meters.values())
        return [self.meters[unit]]

    # ------------------------------------------------------------------ serving

    def _devices(self) -> list[SimDevice]:
        devices = []
        for unit, model in self.meters.items():
            blocks = [_span(_served_ranges(model.map, function))
                      for function in (FUNCTION_HOLDING, FUNCTION_INPUT)]
            bits = [SimData(0, count=16, values=False, datatype=SimType.BITS)]
            devices.append(SimDevice(id=unit, simdata=(bits, list(bits), [blocks[0]],
                                                       [blocks[1]]),
                                     action=partial(self._action, unit)))
        return devices

    async def _action(self, unit: int, function: int, start: int, address: int, count: int,
                      registers: list[int], set_values: object) -> ExcCodes | None:
        self.requests[unit] += 1
        model = self.meters[unit]
        signed = self.signed.get(unit)
        if set_values is not None:
            if signed is not None and function in (6, 16):
                return signed.write(address, list(set_values), start, registers)  # type: ignore[call-overload]
            return ExcCodes.ILLEGAL_FUNCTION  # a meter's measurements are read-only
        if count > model.map.max_read:
            self.refused[unit] += 1
            return ExcCodes.ILLEGAL_VALUE  # the meter's documented per-request limit
        if self._take_fault(unit, {Fault.EXCEPTION}) is Fault.EXCEPTION:
            return ExcCodes.DEVICE_FAILURE
        model.render(function, start, registers)
        if signed is not None and function == FUNCTION_HOLDING:
            signed.render(start, registers)
        return None

    def _take_fault(self, unit: int, kinds: set[Fault]) -> Fault | None:
        entry = self._faults.get(unit)
        if entry is None or entry[0] not in kinds:
            return None
        fault, times = entry
        if times is not None:
            if times <= 1:
                del self._faults[unit]
            else:
                self._faults[unit] = (fault, times - 1)
        return fault

    def _trace(self, sending: bool, packet: bytes) -> bytes:
        """Byte-level faults on outgoing replies (pymodbus ``trace_packet`` hook)."""
        if not sending or not packet:
            return packet
        unit = packet[0] if self._rtu else (packet[6] if len(packet) > 6 else 0)
        byte_faults = {Fault.SILENT} | ({Fault.CRC, Fault.SHORT, Fault.WRONG_UNIT}
                                        if self._rtu else set())
        fault = self._take_fault(unit, byte_faults)
        if fault is Fault.SILENT:
            return b""
        if fault is Fault.CRC:
            return packet[:-1] + bytes([packet[-1] ^ 0xFF])
        if fault is Fault.SHORT:
            return packet[:max(3, len(packet) // 2)]
        if fault is Fault.WRONG_UNIT:
            return with_crc(bytes([unit % 247 + 1]) + packet[1:-2])
        return packet

    async def start_tcp(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Serve Modbus TCP; returns the bound port."""
        self._rtu = False
        server = ModbusTcpServer(self._devices(), address=(host, port),
                                 trace_packet=self._trace)
        await server.serve_forever(background=True)
        self._server = server
        return server.transport.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def start_serial(self, port: str, *, baudrate: int = 9600, bytesize: int = 8,
                           parity: str = "N", stopbits: int = 1) -> None:
        """Serve Modbus RTU on ``port`` (a pty path). If the port vanishes (the socat pair
        was killed) the simulator waits for it to come back and attaches again, as a meter
        on a re-plugged cable would."""
        self._rtu = True
        options = dict(port=port, baudrate=baudrate, bytesize=bytesize, parity=parity,
                       stopbits=stopbits)
        await self._open_serial(options)
        self._watch = asyncio.create_task(self._watch_port(options), name="meter-sim-watch")

    async def _open_serial(self, options: dict[str, object]) -> None:
        server = ModbusSerialServer(self._devices(), framer=FramerType.RTU,
                                    ignore_missing_devices=True, trace_packet=self._trace,
                                    **options)  # type: ignore[arg-type]
        await server.serve_forever(background=True)
        self._server = server

    async def _watch_port(self, options: dict[str, object]) -> None:
        path = str(options["port"])
        target = _resolve(path)
        while True:
            await asyncio.sleep(0.05)
            now = _resolve(path)
            if now == target:
                continue
            if self._server is not None:
                await self._server.shutdown()
                self._server = None
            if now is not None:
                with contextlib.suppress(Exception):
                    await self._open_serial(options)
            target = now if self._server is not None else None

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
            self._watch = None
        if self._server is not None:
            await self._server.shutdown()
            self._server = None


def _served_ranges(meter_map: MeterMap, function: int) -> list[tuple[int, int]]:
    """(start, end) of everything the meter answers with ``function``: its quantities,
    their scale-factor registers, its identity registers, extra holding registers."""
    ranges = [(s.address, s.end) for s in meter_map.registers if s.function == function]
    ranges += [(a, a + 1) for f, a in meter_map.scale_registers() if f == function]
    ranges += [(f.address, f.address + f.count) for f in (meter_map.serial, meter_map.model_id)
               if f is not None and f.function == function]
    if function == FUNCTION_HOLDING:
        ranges += [(a, a + c) for a, c in meter_map.extra_holding]
    return ranges


def _span(ranges: list[tuple[int, int]]) -> SimData:
    """One block from the lowest to the highest register served (gaps read as 0, as on
    the real meters); outside it the server answers ILLEGAL DATA ADDRESS."""
    if not ranges:
        return SimData(0, count=1, values=0, datatype=SimType.REGISTERS)
    start = min(a for a, _ in ranges)
    end = max(e for _, e in ranges)
    return SimData(start, count=end - start, values=0, datatype=SimType.REGISTERS)


def _resolve(path: str) -> str | None:
    try:
        return os.path.realpath(path, strict=True)
    except OSError:
        return None


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m hil.sim.meter",
                                     description="Serve a simulated kWh meter over Modbus.")
    parser.add_argument("--map", action="append", default=[],
                        help="map name or file; repeat for more meters (unit ids 1, 2, ...)")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--tcp", metavar="HOST:PORT")
    where.add_argument("--serial", metavar="PATH")
    parser.add_argument("--baudrate", type=int, default=9600)
    parser.add_argument("--parity", choices=("N", "E", "O"), default="N")
    parser.add_argument("--stopbits", type=int, choices=(1, 2), default=1)
    parser.add_argument("--profile", default="0:7400",
                        help="power steps 't_s:W,t_s:W,...' e.g. '0:11000,60:-3000'")
    return parser.parse_args(argv)


async def _main(argv: Sequence[str] | None = None) -> None:
    args = _parse_args(argv)
    steps = [pair.split(":") for pair in args.profile.split(",")]
    profile = ChargingProfile.from_pairs([(float(t), int(p)) for t, p in steps])
    sim = MeterSimulator({i + 1: m for i, m in enumerate(args.map or ["sdm630"])}, profile)
    if args.tcp:
        host, _, port = args.tcp.rpartition(":")
        bound = await sim.start_tcp(host or "127.0.0.1", int(port))
        print(f"meter simulator on tcp {host or '127.0.0.1'}:{bound}", flush=True)
    else:
        await sim.start_serial(args.serial, baudrate=args.baudrate, parity=args.parity,
                               stopbits=args.stopbits)
        print(f"meter simulator on serial {args.serial}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await sim.stop()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main())
