"""A simulated wallbox: the EVSE side of IEC 61851-1 (sans-I/O).

:class:`WallboxModel` holds, per connector, what a real EVSE knows: is a cable plugged in,
does the car ask for energy (the vehicle's S2 switch), is delivery enabled, what current is
offered on the pilot, is there a fault. The control pilot state follows from that as
IEC 61851-1:2017 Annex A says it does: A with no vehicle, B with a vehicle that may not or
does not want to charge, C (D with ventilation) while it charges, E for a shorted/missing
pilot, F for an EVSE fault. An offered current below 6 A means "no charging" (IEC 61851-1
Table A.8: PWM below 8 % duty is not a charging current), so such a car stays in B.

The plant (hil/sim/plant.py) runs the physics around it and serves it over Modbus.
"""

from __future__ import annotations

import enum
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from functools import partial

from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType as SimType
from pymodbus.simulator import SimData, SimDevice

from firmware_adapters.evse.base import CpState
from firmware_adapters.evse.maps import (
    READ_COILS,
    READ_HOLDING,
    READ_INPUT,
    WRITE_COIL,
    WRITE_REGISTER,
    ChargerMap,
    NumberField,
    Write,
    load_map,
)

# IEC 61851-1 Table A.8: 6 A is the lowest current a PWM duty cycle may offer.
MIN_CHARGING_CURRENT_A = 6.0


@dataclass(slots=True)
class ConnectorModel:
    max_current_a: float = 32.0
    plugged: bool = False
    car_requests: bool = True      # the car's S2 is closed: it wants energy
    ventilation: bool = False      # the car asks for state D
    enabled: bool = False
    limit_a: float = 16.0
    fault: str | None = None       # an EVSE fault (state F)
    pilot_error: bool = False      # pilot shorted / diode missing (state E)

    @property
    def state(self) -> CpState:
        if self.fault is not None:
            return CpState.F
        if self.pilot_error:
            return CpState.E
        if not self.plugged:
            return CpState.A
        if self.delivering:
            return CpState.D if self.ventilation else CpState.C
        return CpState.B

    @property
    def offered_a(self) -> float:
        """The current the pilot offers the car right now (0 when not enabled)."""
        if not self.enabled or self.fault is not None:
            return 0.0
        return min(self.limit_a, self.max_current_a)

    @property
    def delivering(self) -> bool:
        return (self.plugged and self.car_requests and self.fault is None
                and not self.pilot_error and self.offered_a >= MIN_CHARGING_CURRENT_A)


class WallboxModel:
    """Connectors numbered from 1."""

    def __init__(self, connectors: int = 1, max_current_a: float = 32.0) -> None:
        if not 1 <= connectors <= 8:
            raise ValueError("a wallbox has 1..8 connectors")
        self.connectors = {n: ConnectorModel(max_current_a=max_current_a)
                           for n in range(1, connectors + 1)}

    def __getitem__(self, connector: int) -> ConnectorModel:
        return self.connectors[connector]

    def plug(self, connector: int = 1, plugged: bool = True) -> None:
        self.connectors[connector].plugged = plugged

    def unplug(self, connector: int = 1) -> None:
        self.plug(connector, False)


# --------------------------------------------------------------------------- serving


class Fault(enum.Enum):
    SILENT = "silent"          # the controller does not answer at all
    EXCEPTION = "exception"    # exception reply 04 (server device failure)


class WallboxServer:
    """A pymodbus server that implements one charger map's documented registers over a
    :class:`WallboxModel`, with the limits the real controller has:

    - only the map's function codes (others: exception 01 ILLEGAL FUNCTION);
    - reads longer than the map's ``max_read`` (or the protocol's 125): exception 03;
    - registers outside the documented ones: exception 02 (pymodbus, from the spans);
    - writes only to the writable registers (current limit, enable coil; others: 02), a
      multi-register value only in one FC 16 request (Alfen s1.3; else 03), a current
      outside the controller's range: 03;
    - a set-point validity time (Alfen s1.3.1): without a rewrite the station falls back
      to its safe current, as it also does at start-up.

    ``power_of(connector)`` gives the power the wallbox's meter reports (the plant's
    physics); by default a simple estimate from the offered current.
    """

    def __init__(self, charger_map: ChargerMap | str, wallbox: WallboxModel, *,
                 unit: int | None = None, power_of: Callable[[int], int] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 safe_current_a: float = 6.0) -> None:
        self.map = load_map(charger_map) if isinstance(charger_map, str) else charger_map
        self.wallbox = wallbox
        self.clock = clock
        self.power_of = power_of or self._estimate_power
        self.safe_current_a = safe_current_a
        if self.map.unit is None and unit is None:
            self.units = {c: c for c in wallbox.connectors}
        else:
            self.units = {unit if unit is not None else (self.map.unit or 0): 1}
        self.on_change: Callable[[], None] = lambda: None   # after each applied write
        self.requests: Counter[int] = Counter()
        self.writes: list[tuple[int, Write]] = []
        self._faults: dict[int, tuple[Fault, int | None]] = {}
        self._written_at: dict[int, float] = {}
        self._server: ModbusTcpServer | None = None
        if self.map.setpoint_valid_s is not None:   # start-up: the safe current (s1.3.1)
            for connector in wallbox.connectors.values():
                connector.enabled, connector.limit_a = True, safe_current_a

    # ------------------------------------------------------------------ control

    def inject(self, unit: int, fault: Fault, times: int | None = None) -> None:
        """Apply ``fault`` to the next ``times`` requests to ``unit`` (None: until cleared)."""
        self._faults[unit] = (fault, times)

    def clear(self) -> None:
        self._faults.clear()

    def _take(self, unit: int, kinds: set[Fault]) -> Fault | None:
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

    def _estimate_power(self, connector: int) -> int:
        c = self.wallbox[connector]
        return round(c.offered_a * 230 * 3) if c.delivering else 0

    def _expire(self, connector: int) -> None:
        valid = self.map.setpoint_valid_s
        last = self._written_at.get(connector)
        if valid is not None and last is not None and self.clock() - last > valid:
            c = self.wallbox[connector]
            c.enabled, c.limit_a = True, self.safe_current_a   # s1.3.1: fall back
            del self._written_at[connector]

    # ------------------------------------------------------------------ registers

    def _render(self, connector: int) -> dict[tuple[int, int], int]:
        """(function, address) -> register word for every mapped register."""
        self._expire(connector)
        c = self.wallbox[connector]
        m = self.map
        words: dict[tuple[int, int], int] = {}

        def put(function: int, address: int, values: Sequence[int]) -> None:
            for i, value in enumerate(values):
                words[(function, address + i)] = value

        put(m.state.function, m.state.address, m.state.encode(self._state_text(c)))
        limit = Fraction(c.offered_a if m.enable_coil is None else c.limit_a)
        put(m.current_read.function, m.current_read.address, _clamped(m.current_read, limit))
        if m.current_read is not m.current:
            written = c.limit_a if c.enabled else 0.0
            put(m.current.function, m.current.address, _clamped(m.current, Fraction(written)))
        if m.power is not None:
            put(m.power.function, m.power.address,
                _clamped(m.power, Fraction(self.power_of(connector))))
        if m.fault is not None:
            put(m.fault.number.function, m.fault.number.address,
                _clamped(m.fault.number, Fraction(self._fault_code(c))))
        return words

    def _state_text(self, c: ConnectorModel) -> str:
        state = c.state
        texts = [t for t, s in self.map.state.values.items() if s is state]
        if not texts:   # the device cannot say it (Bender has no F): it reports E
            texts = [t for t, s in self.map.state.values.items() if s is CpState.E]
        pwm = c.offered_a >= MIN_CHARGING_CURRENT_A
        for text in texts:   # Alfen: "B2"/"C2" with PWM on, "B1" without
            if text[-1:] == ("2" if pwm else "1"):
                return text
        return texts[0]

    def _fault_code(self, c: ConnectorModel) -> int:
        fault = self.map.fault
        if fault is None:
            return 0
        if c.fault is None:
            return min(fault.ok)
        for code, text in fault.texts.items():
            if text == c.fault:
                return code
        return next(iter(fault.texts), 1)

    # ------------------------------------------------------------------ pymodbus

    def _devices(self) -> list[SimDevice]:
        m = self.map
        spans: dict[int, list[tuple[int, int]]] = {READ_HOLDING: [], READ_INPUT: []}
        for f in (*m.fields(), m.current):
            spans[f.function].append((f.address, f.address + f.count))
        if READ_INPUT not in m.functions:   # so that FC 4 reaches the action: exception 01
            spans[READ_INPUT] = list(spans[READ_HOLDING])
        blocks = {fn: [SimData(lo, count=hi - lo, values=0, datatype=SimType.REGISTERS)
                       for lo, hi in _merge(s)] or
                  [SimData(0, count=1, values=0, datatype=SimType.INVALID)]
                  for fn, s in spans.items()}
        # pymodbus keeps bits in 16-bit registers; in this layout SimData's address is
        # the coil number itself.
        coils = [SimData(m.enable_coil or 0, count=1, values=False, datatype=SimType.BITS)]
        inputs = [SimData(0, count=16, values=False, datatype=SimType.BITS)]
        return [SimDevice(id=unit, simdata=(coils, inputs, blocks[READ_HOLDING],
                                            blocks[READ_INPUT]),
                          action=partial(self._action, unit, connector))
                for unit, connector in self.units.items()]

    async def _action(self, unit: int, connector: int, function: int, start: int,
                      address: int, count: int, registers: list[int],
                      set_values: list[int] | list[bool] | None) -> ExcCodes | None:
        self.requests[unit] += 1
        if function not in self.map.functions:
            return ExcCodes.ILLEGAL_FUNCTION
        if self._take(unit, {Fault.EXCEPTION}) is Fault.EXCEPTION:
            return ExcCodes.DEVICE_FAILURE
        if set_values is not None:
            return self._apply(unit, connector, function, address,
                               [int(v) for v in set_values])
        if function in (READ_HOLDING, READ_INPUT) and count > self.map.max_read:
            return ExcCodes.ILLEGAL_VALUE
        words = self._render(connector)
        if function == READ_COILS:
            bits = [False] * (16 * len(registers))
            if self.map.enable_coil is not None:
                bits[self.map.enable_coil - 16 * start] = self.wallbox[connector].enabled
            registers[:] = [sum(int(b) << i for i, b in enumerate(bits[n:n + 16]))
                            for n in range(0, len(bits), 16)]
            return None
        for i in range(len(registers)):
            registers[i] = words.get((function, start + i), 0)
        return None

    def _apply(self, unit: int, connector: int, function: int, address: int,
               values: list[int]) -> ExcCodes | None:
        m = self.map
        c = self.wallbox[connector]
        if function == WRITE_COIL:
            if address != m.enable_coil:
                return ExcCodes.ILLEGAL_ADDRESS
            c.enabled = bool(values[0])
        else:
            if address != m.current.address or len(values) > m.current.count:
                return ExcCodes.ILLEGAL_ADDRESS
            if len(values) != m.current.count or \
                    (function == WRITE_REGISTER and m.current.count != 1):
                return ExcCodes.ILLEGAL_VALUE   # Alfen s1.3: whole values, one request
            amps = m.current.decode(values)
            if amps is None or not (amps == 0 and m.enable_coil is None) and \
                    not m.min_current_a <= amps <= min(m.max_current_a,
                                                       Fraction(c.max_current_a)):
                return ExcCodes.ILLEGAL_VALUE
            if m.enable_coil is None:
                c.enabled = amps > 0
            if amps > 0:
                c.limit_a = float(amps)
            self._written_at[connector] = self.clock()
        self.writes.append((unit, Write(function, address, tuple(values))))
        self.on_change()
        return None

    def _trace(self, sending: bool, packet: bytes) -> bytes:
        """Drop replies of a silent unit (pymodbus ``trace_packet`` hook, MBAP unit id at
        byte 6: Modbus Messaging on TCP/IP V1.0b s3.1.3)."""
        if not sending or len(packet) < 7:
            return packet
        return b"" if self._take(packet[6], {Fault.SILENT}) is Fault.SILENT else packet

    async def start_tcp(self, host: str = "127.0.0.1", port: int = 0) -> int:
        server = ModbusTcpServer(self._devices(), address=(host, port),
                                 trace_packet=self._trace)
        await server.serve_forever(background=True)
        self._server = server
        return int(server.transport.sockets[0].getsockname()[1])  # type: ignore[attr-defined]  # an asyncio Server

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.shutdown()
            self._server = None


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Join touching/overlapping spans, and short gaps (read as 0, as on the devices)."""
    merged: list[tuple[int, int]] = []
    for low, high in sorted(spans):
        if merged and low <= merged[-1][1] + 16:
            merged[-1] = (merged[-1][0], max(merged[-1][1], high))
        else:
            merged.append((low, high))
    return merged


def _clamped(f: NumberField, value: Fraction) -> tuple[int, ...]:
    """``value`` in ``f``'s registers, clamped to the type's range (a uint32 power
    register reads 0 while the car feeds back)."""
    if not f.dtype.is_float:
        bits = f.dtype.words * 16
        signed = f.dtype.value.startswith("int")
        low, high = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else \
            (0, (1 << bits) - 1)
        value = min(max(value / f.scale, Fraction(low)), Fraction(high)) * f.scale
    return f.encode(value)
