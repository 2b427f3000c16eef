"""Modbus RTU and TCP meter sources: thin asyncio around pymodbus and the register core.

Each poll cycle reads every meter of the source: the blocks planned from its map
(:func:`registers.plan_blocks`), decoded by :class:`registers.Block`, checked by
:class:`plausibility.PlausibilityChecker`, and emitted as integer readings with OBIS
names. A meter's snapshot is all or nothing: if one block fails, no reading of that meter
is emitted for the cycle (nothing is invented or carried over).

Faults and what they become (DESIGN s9): every failed read counts ``counters[reason]``
(``exception``, ``no-response``, ``crc-error``, ``short-frame``, ``wrong-unit``,
``not-a-number``, ``short-read``, ``line-down``) and emits a ``meter-read-failed`` event,
except while the meter is already known to be silent (``meter-silent`` after ``silent_after`` failures in a row,
``meter-recovered`` when it answers again). A line that disappears (serial port gone,
TCP refused) gives ``meter-line-down``; the source reopens it with capped exponential
back-off and says ``meter-line-up`` with the outage length. Polling never stops on bad
input.

RS-485 sharing: every source on the same serial port in one event loop shares one
pymodbus client and one lock (:class:`_SharedLine`), so requests to different unit ids
never overlap on the wire, and consecutive frames keep the 3.5-character silent interval
("MODBUS over Serial Line V1.02" s2.5.1.1).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Self

from pymodbus import FramerType
from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusException

from agent.backoff import Backoff
from agent.errors import (
    AdapterError,
    AdapterIOError,
    AdapterTimeout,
    AdapterUnavailable,
    DecodeError,
)
from agent.options import Table
from agent.readings import Event, Reading
from firmware_adapters.base import Clock, Emit, Source, system_clock
from firmware_adapters.modbus.mapfile import load_map, map_from_table
from firmware_adapters.modbus.plausibility import PlausibilityChecker
from firmware_adapters.modbus.registers import (
    FUNCTION_INPUT,
    Block,
    MeterMap,
    plan_blocks,
)
from firmware_adapters.modbus.rtu import LineFormat, diagnose_reply

log = logging.getLogger(__name__)

# pymodbus logs every timeout at ERROR with its own wording; our events say it better.
logging.getLogger("pymodbus").setLevel(logging.CRITICAL)


@dataclass(frozen=True, slots=True)
class MeterConfig:
    unit: int
    meter_map: MeterMap
    label: str


@dataclass(frozen=True, slots=True)
class PollConfig:
    interval_s: float = 1.0
    timeout_s: float = 0.5
    retries: int = 1
    backoff_initial_s: float = 0.2
    backoff_max_s: float = 10.0
    silent_after: int = 3


@dataclass(slots=True)
class _MeterState:
    config: MeterConfig
    blocks: tuple[Block, ...]
    checker: PlausibilityChecker
    failures: int = 0
    silent_since_ns: int | None = None


# --------------------------------------------------------------------------- links


class Link:
    """One connection to meters: read registers or raise one of our AdapterErrors."""

    async def open(self) -> None:
        raise NotImplementedError

    async def read(self, function: int, address: int, count: int, unit: int) -> list[int]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


async def _read_with(client: AsyncModbusTcpClient | AsyncModbusSerialClient, function: int,
                     address: int, count: int, unit: int) -> list[int]:
    call = client.read_input_registers if function == FUNCTION_INPUT \
        else client.read_holding_registers
    try:
        reply = await call(address, count=count, device_id=unit)
    except ConnectionException as exc:
        raise AdapterUnavailable("meter line is down", reason="line-down") from exc
    except ModbusException as exc:
        raise AdapterTimeout(f"unit {unit}: no valid reply", reason="no-response") from exc
    if reply.isError():
        code = getattr(reply, "exception_code", 0)
        raise AdapterIOError(f"unit {unit}: exception reply {code}", reason="exception")
    return list(reply.registers)


class TcpLink(Link):
    def __init__(self, host: str, port: int, poll: PollConfig) -> None:
        self.host, self.port, self.poll = host, port, poll
        self.client: AsyncModbusTcpClient | None = None

    async def open(self) -> None:
        self.close()
        client = AsyncModbusTcpClient(self.host, port=self.port, timeout=self.poll.timeout_s,
                                      retries=self.poll.retries, reconnect_delay=0)
        if not await client.connect():
            client.close()
            raise AdapterUnavailable(f"cannot connect to {self.host}:{self.port}",
                                     reason="line-down")
        self.client = client

    async def read(self, function: int, address: int, count: int, unit: int) -> list[int]:
        if self.client is None or not self.client.connected:
            raise AdapterUnavailable("meter connection lost", reason="line-down")
        return await _read_with(self.client, function, address, count, unit)

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None


class _SharedLine:
    """One RS-485 port: one client, one lock, shared by every source on that port."""

    _lines: dict[tuple[int, str], _SharedLine] = {}

    def __init__(self, key: tuple[int, str], line: LineFormat, poll: PollConfig) -> None:
        self.key, self.port, self.line, self.poll = key, key[1], line, poll
        self.lock = asyncio.Lock()
        self.client: AsyncModbusSerialClient | None = None
        self.users = 0
        self.received = b""
        self.last_frame_end = 0.0

    @classmethod
    def acquire(cls, port: str, line: LineFormat, poll: PollConfig) -> _SharedLine:
        key = (id(asyncio.get_running_loop()), port)
        shared = cls._lines.get(key)
        if shared is None:
            shared = cls._lines[key] = cls(key, line, poll)
        elif shared.line != line:
            raise AdapterUnavailable(f"{port} is already open with {shared.line}",
                                     reason="line-conflict")
        shared.users += 1
        return shared

    def release(self) -> None:
        self.users -= 1
        if self.users <= 0:
            self._drop()
            _SharedLine._lines.pop(self.key, None)

    def _trace(self, sending: bool, data: bytes) -> bytes:
        # pymodbus hands the whole receive buffer each time; keep the latest for diagnosis.
        if sending:
            self.received = b""
        else:
            self.received = data
        return data

    async def ensure_open(self) -> AsyncModbusSerialClient:
        if self.client is not None and self.client.connected:
            return self.client
        self._drop()
        client = AsyncModbusSerialClient(
            self.port, framer=FramerType.RTU, baudrate=self.line.baudrate,
            bytesize=self.line.bytesize, parity=self.line.parity,
            stopbits=self.line.stopbits, timeout=self.poll.timeout_s,
            retries=self.poll.retries, reconnect_delay=0, trace_packet=self._trace)
        if not await client.connect():
            client.close()
            raise AdapterUnavailable(f"cannot open {self.port}", reason="line-down")
        self.client = client
        return client

    def _drop(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None

    async def read(self, function: int, address: int, count: int, unit: int) -> list[int]:
        async with self.lock:
            client = await self.ensure_open()
            gap = self.last_frame_end + self.line.silent_interval_s - time.monotonic()
            if gap > 0:
                await asyncio.sleep(gap)
            try:
                return await _read_with(client, function, address, count, unit)
            except AdapterTimeout as exc:
                reason = diagnose_reply(self.received, unit, function)
                raise AdapterTimeout(f"unit {unit}: {reason}", reason=reason) from exc
            except AdapterUnavailable:
                self._drop()
                raise
            finally:
                self.last_frame_end = time.monotonic()


class RtuLink(Link):
    def __init__(self, port: str, line: LineFormat, poll: PollConfig) -> None:
        self.port, self.line, self.poll = port, line, poll
        self.shared: _SharedLine | None = None

    async def open(self) -> None:
        if self.shared is None:
            self.shared = _SharedLine.acquire(self.port, self.line, self.poll)
        async with self.shared.lock:
            await self.shared.ensure_open()

    async def read(self, function: int, address: int, count: int, unit: int) -> list[int]:
        if self.shared is None:
            raise AdapterUnavailable("line not opened", reason="line-down")
        return await self.shared.read(function, address, count, unit)

    def close(self) -> None:
        if self.shared is not None:
            self.shared.release()
            self.shared = None


# --------------------------------------------------------------------------- sources


class ModbusSource(Source):
    """Common poll loop of the RTU and TCP sources."""

    kind = "modbus"

    def __init__(self, source_id: str, link: Link, meters: tuple[MeterConfig, ...],
                 poll: PollConfig, clock: Clock = system_clock,
                 monotonic_ns: Callable[[], int] = time.monotonic_ns) -> None:
        super().__init__(source_id, clock)
        self.link, self.poll = link, poll
        self.monotonic_ns = monotonic_ns  # the plausibility checker's time (power x time)
        self.meters = [_MeterState(m, plan_blocks(m.meter_map), PlausibilityChecker(
            rated_power_w=m.meter_map.rated_power_w,
            energy_resolution_wh=_energy_resolution(m.meter_map))) for m in meters]
        self._line_down_since: int | None = None
        self._connected = False

    async def run(self, emit: Emit) -> None:
        backoff = Backoff(self.poll.backoff_initial_s,
                          max(self.poll.backoff_max_s, self.poll.backoff_initial_s))
        try:
            while True:
                started = time.monotonic()
                if not await self.ensure_line(emit):
                    await asyncio.sleep(backoff.next())
                    continue
                backoff.reset()
                await self.poll_once(emit)
                await asyncio.sleep(max(0.0, self.poll.interval_s - (time.monotonic() - started)))
        finally:
            self.link.close()

    async def poll_once(self, emit: Emit) -> int:
        """Read every meter once; returns how many complete snapshots were emitted."""
        done = 0
        for meter in self.meters:
            if not self._connected:
                break
            done += await self._poll_meter(meter, emit)
        return done

    async def ensure_line(self, emit: Emit) -> bool:
        """Open the line if it is not open; False (after a ``meter-line-down`` event the
        first time) when it cannot be opened."""
        if self._connected:
            return True
        try:
            await self.link.open()
        except AdapterError as exc:
            if exc.reason == "line-conflict":
                raise  # two configs disagree about one port: retrying cannot fix that
            self.counters["line-down"] += 1
            await self._line_down(emit, str(exc))
            return False
        self._connected = True
        if self._line_down_since is not None:
            now, _ = self.clock()
            await emit(Event("meter-line-up", "meter line is back", now, self.id,
                             (("down_ms", (now - self._line_down_since) // 1_000_000),)))
            self._line_down_since = None
        return True

    async def _line_down(self, emit: Emit, why: str) -> None:
        self._connected = False
        if self._line_down_since is None:
            now, _ = self.clock()
            self._line_down_since = now
            log.warning("%s: meter line down: %s", self.id, why)
            await emit(Event("meter-line-down", f"meter line down: {why}", now, self.id))

    async def _poll_meter(self, meter: _MeterState, emit: Emit) -> int:
        unit = meter.config.unit
        values: dict[str, int] = {}
        try:
            for block in meter.blocks:
                words = await self.link.read(block.function, block.address, block.count, unit)
                values.update(block.decode(words))
        except AdapterUnavailable as exc:
            self.counters[exc.reason] += 1
            self.link.close()
            await self._line_down(emit, str(exc))
            return 0
        except (AdapterError, DecodeError) as exc:
            await self._failed(meter, emit, exc.reason, str(exc))
            return 0
        await self._succeeded(meter, emit)
        now, status = self.clock()
        verdict = meter.checker.check(values, self.monotonic_ns())
        for name, value in values.items():
            await emit(Reading(name, value, meter.config.meter_map.spec(name).unit, now,
                               status, self.id, verdict.flags_for(name)))
        for finding in verdict.findings:
            self.counters[finding.code] += 1
            await emit(Event(finding.code, finding.message, now, self.id,
                             (("unit", unit), *finding.details)))
        return 1

    async def _failed(self, meter: _MeterState, emit: Emit, reason: str, why: str) -> None:
        self.counters[reason] += 1
        meter.failures += 1
        now, _ = self.clock()
        unit = meter.config.unit
        if meter.silent_since_ns is not None:
            return
        if meter.failures >= self.poll.silent_after:
            meter.silent_since_ns = now
            await emit(Event("meter-silent", f"{meter.config.label} stopped answering"[:500],
                             now, self.id, (("unit", unit), ("reason", reason))))
            return
        await emit(Event("meter-read-failed", why[:500], now, self.id,
                         (("unit", unit), ("reason", reason))))

    async def _succeeded(self, meter: _MeterState, emit: Emit) -> None:
        if meter.silent_since_ns is not None:
            now, _ = self.clock()
            await emit(Event("meter-recovered", f"{meter.config.label} answers again"[:500], now,
                             self.id, (("unit", meter.config.unit),
                                       ("silent_ms", (now - meter.silent_since_ns) // 1_000_000),
                                       ("failed_reads", meter.failures))))
        meter.failures = 0
        meter.silent_since_ns = None


# A float32 kWh counter below 2^17 kWh (131 MWh) moves in steps of at most 2^-6 kWh.
FLOAT_ENERGY_RESOLUTION_WH = Fraction(1000, 64)


def _energy_resolution(meter_map: MeterMap) -> Fraction:
    """The coarsest step of the map's energy counters, for the plausibility tolerance."""
    steps = [FLOAT_ENERGY_RESOLUTION_WH if s.dtype.is_float else s.scale
             for s in meter_map.registers if s.name in ("1-0:1.8.0", "1-0:2.8.0")]
    return max(steps, default=Fraction(1))


class ModbusRtuSource(ModbusSource):
    """``kind = "modbus-rtu"``: meters on an RS-485 line (a serial port)."""

    kind = "modbus-rtu"

    @classmethod
    def from_options(cls, source_id: str, options: Mapping[str, object], where: str) -> Self:
        opts = Table.source(options, where, source_id)
        port = opts.nonempty_str("port")
        line = LineFormat(baudrate=opts.int("baudrate", 9600, min=300, max=921_600),
                          bytesize=opts.int("bytesize", 8, min=7, max=8),
                          parity=opts.choice("parity", "N", ("N", "E", "O")),
                          stopbits=opts.int("stopbits", 1, min=1, max=2))
        poll = poll_config(opts)
        meters = meter_configs(opts)
        opts.reject_unknown()
        return cls(source_id, RtuLink(port, line, poll), meters, poll)


class ModbusTcpSource(ModbusSource):
    """``kind = "modbus-tcp"``: meters behind a Modbus TCP server or gateway."""

    kind = "modbus-tcp"

    @classmethod
    def from_options(cls, source_id: str, options: Mapping[str, object], where: str) -> Self:
        opts = Table.source(options, where, source_id)
        host = opts.nonempty_str("host")
        port = opts.int("port", 502, min=1, max=65535)
        poll = poll_config(opts)
        meters = meter_configs(opts)
        opts.reject_unknown()
        return cls(source_id, TcpLink(host, port, poll), meters, poll)


def poll_config(opts: Table) -> PollConfig:
    return PollConfig(interval_s=opts.float("interval_s", 1.0, min=0.0, max=3600.0),
                      timeout_s=opts.float("timeout_s", 0.5, min=0.01, max=60.0),
                      retries=opts.int("retries", 1, min=0, max=10),
                      backoff_initial_s=opts.float("backoff_initial_s", 0.2, min=0.01, max=60.0),
                      backoff_max_s=opts.float("backoff_max_s", 10.0, min=0.01, max=3600.0),
                      silent_after=opts.int("silent_after", 3, min=1, max=1000))


def meter_configs(opts: Table) -> tuple[MeterConfig, ...]:
    """``meters = [{unit = 1, map = "sdm630"}, ...]``, or ``unit`` + ``map`` for one."""
    if "meters" in opts.data:
        rows = opts.list("meters")
        if not rows:
            raise opts.error("meters", "a non-empty array of {unit, map} tables", rows)
        found = [_meter(Table(row, opts.where, f"{opts.key('meters')}[{i}]"), single=False)
                 for i, row in enumerate(rows)]
    else:
        found = [_meter(opts, single=True)]
    units = [m.unit for m in found]
    if len(set(units)) != len(units):
        raise opts.error("meters", "distinct unit ids", units)
    return tuple(found)


def _meter(sub: Table, single: bool) -> MeterConfig:
    """One meter: a row of ``meters``, or (``single``) the source table itself."""
    unit = sub.int("unit", 1, min=1, max=247)
    spec = sub.raw("map")
    if isinstance(spec, str):
        meter_map = load_map(spec)
    elif isinstance(spec, Mapping):
        meter_map = map_from_table(spec, f"{sub.where} ({sub.key('map')})")
    else:
        raise sub.error("map", "a map name, a .toml path or an inline map table", spec)
    if single:
        return MeterConfig(unit, meter_map, f"{meter_map.model} #{unit}")
    label = sub.nonempty_str("label", f"{meter_map.model} #{unit}")
    sub.reject_unknown()
    return MeterConfig(unit, meter_map, label)
