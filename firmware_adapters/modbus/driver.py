"""Modbus RTU and TCP meter sources: thin asyncio around pymodbus and the register core.

Each poll cycle reads every meter of the source: the blocks planned from its map
(:func:`registers.plan_blocks`, within the meter's documented per-request limit), decoded
by :func:`registers.decode_snapshot`, checked by :class:`plausibility.PlausibilityChecker`,
and emitted as integer readings with OBIS names, each naming its meter (``meter`` =
``"<unit>"`` or ``"<unit>/<serial>"``). A meter's snapshot is all or nothing: if one block
fails, no reading of that meter is emitted for the cycle (nothing is invented or carried
over).

Once per connection (not per poll) each meter is identified: ``map = "auto"`` /
``"sunspec"`` resolve its map from the meter (:mod:`sunspec`), its serial number is read
from its identity registers (``meter-identified``; a different serial than before is
``meter-changed``: someone swapped the meter), and a signed meter's public key is read
and emitted as ``Meter.PublicKey``.

Faults and what they become (DESIGN s9): every failed read counts ``counters[reason]``
(``exception``, ``no-response``, ``crc-error``, ``short-frame``, ``wrong-unit``,
``short-read``, ``line-down``) and emits a ``meter-read-failed`` event, except while the
meter is already known to be silent (``meter-silent`` after ``silent_after`` failures in a
row, ``meter-recovered`` when it answers again). A quantity the meter reports as not
available (a documented sentinel, NaN) is no reading, counts ``not-available`` and gives
one ``meter-value-unavailable`` event when it becomes unavailable. A value no reading can
hold (beyond 64 bits) counts ``unrepresentable`` with a ``meter-value-absurd`` event.
Plausibility findings are flagged readings plus events. A line that disappears (serial
port gone, TCP refused) gives ``meter-line-down``; the source reopens it with capped
exponential back-off and says ``meter-line-up`` with the outage length. Polling never
stops on bad input.

``inverted = true`` (a meter row option) is for a CT or a meter wired the wrong way round:
powers change sign, import and export counters swap.

Signed (Eichrecht) meters, ``signed_meter = true``: :meth:`ModbusSource.begin_transaction`
/ :meth:`ModbusSource.end_transaction` (the charging session calls them), and with
``signed_interval_s`` the source itself closes and reopens the meter's transaction at that
period; every record the meter signs is emitted unchanged as a ``Meter.OCMF`` reading.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Self

from agent.backoff import Backoff
from agent.errors import AdapterError, AdapterUnavailable, ConfigError, DecodeError
from agent.options import Table
from agent.readings import METER_SIGNALS, Event, Reading, TimeStatus
from firmware_adapters.base import Clock, Emit, Source, raise_if_cancelled, system_clock
from firmware_adapters.modbus.links import Link, PollConfig, RtuLink, TcpLink
from firmware_adapters.modbus.mapfile import load_map, map_from_table
from firmware_adapters.modbus.plausibility import PlausibilityChecker
from firmware_adapters.modbus.registers import (
    FUNCTION_HOLDING,
    Block,
    MeterMap,
    decode_snapshot,
    plan_blocks,
)
from firmware_adapters.modbus.rtu import LineFormat
from firmware_adapters.modbus.signed import SignedMeter
from firmware_adapters.modbus.sunspec import detect, discover_sunspec

log = logging.getLogger(__name__)

# pymodbus logs every timeout at ERROR with its own wording; our events say it better.
logging.getLogger("pymodbus").setLevel(logging.CRITICAL)

DISCOVERED = ("auto", "sunspec")
SAVE_EVERY_NS = 60 * 1_000_000_000
STATUS_POLL_S = 0.02
SWAPS = {"1-0:1.8.0": "1-0:2.8.0", "1-0:2.8.0": "1-0:1.8.0",
         "1-0:3.8.0": "1-0:4.8.0", "1-0:4.8.0": "1-0:3.8.0"}


@dataclass(frozen=True, slots=True)
class MeterConfig:
    unit: int
    meter_map: MeterMap | None  # None: resolved from the meter ("auto", "sunspec")
    label: str
    discover: str = ""
    inverted: bool = False
    signed: bool = False
    rated_power_w: int | None = None


@dataclass(slots=True)
class _MeterState:
    config: MeterConfig
    meter_map: MeterMap | None = None
    blocks: tuple[Block, ...] = ()
    checker: PlausibilityChecker | None = None
    identity: str | None = None          # None: not identified on this connection
    known_serial: str | None = None      # across connections: a swap is noticed
    unavailable: frozenset[str] = frozenset()
    failures: int = 0
    silent_since_ns: int | None = None
    public_key: str | None = None
    in_transaction: bool = False
    stored_window: list[list[int]] = field(default_factory=list)


class ModbusSource(Source):
    """Common poll loop of the RTU and TCP sources."""

    kind = "modbus"

    def __init__(self, source_id: str, link: Link, meters: tuple[MeterConfig, ...],
                 poll: PollConfig, clock: Clock = system_clock,
                 monotonic_ns: Callable[[], int] = time.monotonic_ns,
                 signed_interval_s: float = 0.0) -> None:
        super().__init__(source_id, clock)
        self.link, self.poll = link, poll
        self.monotonic_ns = monotonic_ns  # the plausibility checker's time (power x time)
        self.meters = [_MeterState(m) for m in meters]
        for meter in self.meters:
            if m_map := meter.config.meter_map:
                self._use_map(meter, m_map)
        self.signed_interval_ns = int(signed_interval_s * 1e9)
        self._line_down_since: int | None = None
        self._connected = False
        self._emit: Emit | None = None
        self._state_path: Path | None = None
        self._saved_ns = 0
        self._next_signed_ns = 0

    # ------------------------------------------------------------------ public

    def identities(self) -> tuple[str, ...]:
        """The meters of this source as readings name them (for the status)."""
        return tuple(m.identity or str(m.config.unit) for m in self.meters)

    def attach_state(self, directory: Path) -> None:
        """The plausibility window survives restarts (``sources/<id>.plausibility``)."""
        self._state_path = self.state_file(directory, "plausibility")
        try:
            data = json.loads(self._state_path.read_text(encoding="utf-8"))
            elapsed = time.time_ns() - int(data["wall_ns"])
            for meter in self.meters:
                rows = data["meters"].get(str(meter.config.unit), [])
                meter.stored_window = rows
                if meter.checker is not None:
                    meter.checker.restore_window(rows, self.monotonic_ns(), elapsed)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return  # nothing stored, or a damaged file: start a fresh window

    async def begin_transaction(self, unit: int, metadata: Mapping[str, object] = {},
                                ) -> None:
        """Start the signed meter's transaction (the session's start)."""
        meter = self._signed_meter(unit)
        now, status = self.clock()
        await self._signer(meter).begin(metadata, now // 1_000_000_000,
                                        status is TimeStatus.SYNCED)
        meter.in_transaction = True

    async def end_transaction(self, unit: int) -> str:
        """Stop it; the meter's OCMF record, also emitted as a ``Meter.OCMF`` reading."""
        meter = self._signed_meter(unit)
        record = await self._signer(meter).end()
        meter.in_transaction = False
        if self._emit is not None:
            await self._emit_reading(meter, self._emit, "Meter.OCMF", record)
        return record

    # ------------------------------------------------------------------ the loop

    async def run(self, emit: Emit) -> None:
        self._emit = emit
        backoff = Backoff(self.poll.backoff_initial_s,
                          max(self.poll.backoff_max_s, self.poll.backoff_initial_s))
        try:
            while True:
                raise_if_cancelled()   # pymodbus can lose our cancel (see there)
                started = time.monotonic()
                if not await self.ensure_line(emit):
                    await asyncio.sleep(backoff.next())
                    continue
                backoff.reset()
                await self.poll_once(emit)
                await self._signed_period(emit)
                self._save_window()
                await asyncio.sleep(max(0.0, self.poll.interval_s - (time.monotonic() - started)))
        finally:
            self._save_window(force=True)
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
                raise  # built outside the runtime's check (build_sources): still no retry
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
        for meter in self.meters:
            meter.identity = None  # identify again on the next connection
        if self._line_down_since is None:
            now, _ = self.clock()
            self._line_down_since = now
            log.warning("%s: meter line down: %s", self.id, why)
            await emit(Event("meter-line-down", f"meter line down: {why}"[:500], now, self.id))

    async def _poll_meter(self, meter: _MeterState, emit: Emit) -> int:
        unit = meter.config.unit
        words: dict[tuple[int, int], int] = {}
        try:
            if meter.identity is None:
                await self._identify(meter, emit)
            assert meter.meter_map is not None and meter.checker is not None
            for block in meter.blocks:
                reply = await self.link.read(block.function, block.address, block.count, unit)
                words.update(block.decode(reply))
            snapshot = decode_snapshot(meter.meter_map, words)
        except AdapterUnavailable as exc:
            self.counters[exc.reason] += 1
            self.link.close()
            await self._line_down(emit, str(exc))
            return 0
        except (AdapterError, DecodeError) as exc:
            await self._failed(meter, emit, exc.reason, str(exc))
            return 0
        except ConfigError as exc:  # "auto" found no model it knows: try again later
            await self._failed(meter, emit, "unidentified", str(exc))
            return 0
        await self._succeeded(meter, emit)
        now, _ = self.clock()
        values = _inverted(snapshot.values) if meter.config.inverted else snapshot.values
        await self._unavailable(meter, emit, snapshot.unavailable, now)
        verdict = meter.checker.check(values, self.monotonic_ns())
        for name, value in values.items():
            await self._emit_reading(meter, emit, name, value, verdict.flags_for(name))
        for finding in verdict.findings:
            self.counters[finding.code] += 1
            if finding.announce:
                details = tuple((k, v if isinstance(v, str) or abs(v) < 1 << 63
                                 else str(v)[:40]) for k, v in finding.details)
                await emit(Event(finding.code, finding.message[:500], now, self.id,
                                 (("unit", unit), ("meter", meter.identity or str(unit)),
                                  *details)))
        return 1

    async def _emit_reading(self, meter: _MeterState, emit: Emit, name: str,
                            value: int | str, flags: tuple[str, ...] = ()) -> None:
        now, status = self.clock()
        try:
            reading = Reading(name, value, METER_SIGNALS[name].unit, now, status, self.id,
                              flags, meter.identity or str(meter.config.unit))
        except ValueError:
            # Beyond what any reading (and the verifier) can hold: never sealed, said.
            self.counters["unrepresentable"] += 1
            await emit(Event("meter-value-absurd", f"{name} = {str(value)[:40]} cannot be "
                             "published", now, self.id,
                             (("unit", meter.config.unit), ("name", name))))
            return
        await emit(reading)

    async def _unavailable(self, meter: _MeterState, emit: Emit, reasons: Mapping[str, str],
                           now: int) -> None:
        if reasons:
            self.counters["not-available"] += len(reasons)
        new = sorted(set(reasons) - meter.unavailable)
        meter.unavailable = frozenset(reasons)
        if new:
            await emit(Event("meter-value-unavailable",
                             f"not available: {', '.join(new)}"[:500], now, self.id,
                             (("unit", meter.config.unit), ("names", ",".join(new)[:200]),
                              ("reason", reasons[new[0]]))))

    # ------------------------------------------------------------------ identity

    async def _identify(self, meter: _MeterState, emit: Emit) -> None:
        """Once per connection: the map (if discovered), the serial, the signing key."""
        unit, config = meter.config.unit, meter.config

        async def read(function: int, address: int, count: int) -> list[int]:
            return await self.link.read(function, address, count, unit)

        rated = config.rated_power_w or 44_850
        if config.discover == "sunspec":
            self._use_map(meter, await discover_sunspec(read, rated))
        elif config.discover == "auto":
            _, found = await detect(read, rated)
            self._use_map(meter, found)
        assert meter.meter_map is not None
        serial = ""
        if (field_ := meter.meter_map.serial) is not None:
            serial = field_.decode(await read(field_.function, field_.address, field_.count))
        identity = f"{unit}/{serial}" if serial else str(unit)
        if config.signed:
            meter.public_key = await self._signer(meter).public_key()
        now, _ = self.clock()
        code = "meter-changed" if meter.known_serial not in (None, serial) else \
            "meter-identified" if meter.known_serial is None else ""
        meter.identity, meter.known_serial = identity, serial
        if code:
            await emit(Event(code, f"{config.label}: {meter.meter_map.model} {identity}"[:500],
                             now, self.id, (("unit", unit), ("meter", identity),
                                            ("model", meter.meter_map.model[:64]))))
        if meter.public_key is not None:
            await self._emit_reading(meter, emit, "Meter.PublicKey", meter.public_key)

    def _use_map(self, meter: _MeterState, meter_map: MeterMap) -> None:
        if meter.meter_map == meter_map and meter.checker is not None:
            return
        rated = meter.config.rated_power_w or meter_map.rated_power_w
        meter.meter_map, meter.blocks = meter_map, plan_blocks(meter_map)
        meter.checker = PlausibilityChecker(rated_power_w=rated,
                                            energy_resolution_wh=_energy_resolution(meter_map),
                                            ranges=_ranges(meter_map, rated))
        if meter.stored_window:
            meter.checker.restore_window(meter.stored_window, self.monotonic_ns(), 0)

    # ------------------------------------------------------------------ signed meters

    def _signed_meter(self, unit: int) -> _MeterState:
        for meter in self.meters:
            if meter.config.unit == unit and meter.config.signed:
                return meter
        raise ConfigError(key="signed_meter", expected="a meter with signed_meter = true",
                          found=f"unit {unit}")

    def _signer(self, meter: _MeterState) -> SignedMeter:
        unit = meter.config.unit

        async def read(address: int, count: int) -> list[int]:
            return await self.link.read(FUNCTION_HOLDING, address, count, unit)

        async def write(address: int, values: list[int]) -> None:
            await self.link.write(address, values, unit)

        return SignedMeter(read, write, lambda: asyncio.sleep(STATUS_POLL_S))

    async def _signed_period(self, emit: Emit) -> None:
        """``signed_interval_s``: close and reopen each signed meter's transaction."""
        if not self.signed_interval_ns or not self._connected:
            return
        now = self.monotonic_ns()
        if now < self._next_signed_ns:
            return
        self._next_signed_ns = now + self.signed_interval_ns
        for meter in self.meters:
            if not meter.config.signed or meter.identity is None:
                continue
            try:
                if meter.in_transaction or await self._signer(meter).state() == 1:
                    await self.end_transaction(meter.config.unit)
                await self.begin_transaction(meter.config.unit, {"FV": "1.0", "GI": self.id})
            except AdapterError as exc:
                await self._failed(meter, emit, exc.reason, str(exc))

    # ------------------------------------------------------------------ bookkeeping

    def _save_window(self, force: bool = False) -> None:
        if self._state_path is None:
            return
        now = self.monotonic_ns()
        if not force and now - self._saved_ns < SAVE_EVERY_NS:
            return
        self._saved_ns = now
        data = {"wall_ns": time.time_ns(), "meters": {
            str(m.config.unit): m.checker.export_window(now)
            for m in self.meters if m.checker is not None}}
        tmp = self._state_path.with_suffix(".tmp")
        try:
            self._state_path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(data), encoding="utf-8")
            os.replace(tmp, self._state_path)
        except OSError as exc:  # a full disk must not stop the meter readings
            self.counters["state-save-failed"] += 1
            log.warning("%s: plausibility window not saved: %s", self.id, exc.strerror)

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


def _inverted(values: Mapping[str, int]) -> dict[str, int]:
    """A CT or meter mounted backwards: powers change sign, the counters swap."""
    out = {}
    for name, value in values.items():
        unit = METER_SIGNALS[name].unit
        if name in SWAPS:
            out[SWAPS[name]] = value
        elif unit in ("W", "1/1000") and name != "1-0:1.7.0":
            out[name] = -value
        else:
            out[name] = value
    return out


def _ranges(meter_map: MeterMap, rated_power_w: int) -> dict[str, tuple[int, int]]:
    """Rule 4 of the plausibility check: the meter's physical range per quantity."""
    limits, power = meter_map.limits, rated_power_w * 11 // 10
    ranges: dict[str, tuple[int, int]] = {}
    for spec in meter_map.registers:
        unit = spec.unit
        ranges[spec.name] = {
            "mV": (0, limits.max_voltage_mv), "mA": (-meter_map.max_current_ma,
                                                   meter_map.max_current_ma),
            "Wh": (0, limits.max_energy_wh), "varh": (0, limits.max_energy_wh),
            "mHz": limits.frequency_mhz, "1/1000": (-1000, 1000),
            "W": (-power, power)}.get(unit, (-(1 << 63), (1 << 63) - 1))
    ranges.pop("1-0:16.7.0", None)  # rule 2 (meter-power-out-of-range) covers the total
    return ranges


# A float32 kWh counter below 2^17 kWh (131 MWh) moves in steps of at most 2^-6 kWh.
FLOAT_ENERGY_RESOLUTION_WH = Fraction(1000, 64)


def _energy_resolution(meter_map: MeterMap) -> Fraction:
    """The coarsest step of the map's energy counters, for the plausibility tolerance."""
    steps = [FLOAT_ENERGY_RESOLUTION_WH if s.dtype.is_float or s.dtype.is_exponent
             else s.scale * (10 if s.scale_from is not None else 1)
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
        signed_s = opts.float("signed_interval_s", 0.0, min=0.0, max=86_400.0)
        opts.reject_unknown()
        source = cls(source_id, RtuLink(port, line, poll), meters, poll,
                     signed_interval_s=signed_s)
        source.line_claim = (port, line)
        return source

    line_claim: tuple[str, LineFormat] = ("", LineFormat(9600))

    def claims(self) -> dict[str, object]:
        """The serial port and its line settings: two sources naming one port must agree
        (checked by the runtime before anything runs: a config error, not a retry)."""
        port, line = self.line_claim
        return {f"serial:{os.path.realpath(port)}": line}


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
        signed_s = opts.float("signed_interval_s", 0.0, min=0.0, max=86_400.0)
        opts.reject_unknown()
        return cls(source_id, TcpLink(host, port, poll), meters, poll,
                   signed_interval_s=signed_s)


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
    meter_map: MeterMap | None = None
    discover = ""
    if spec in DISCOVERED:
        discover = str(spec)
    elif isinstance(spec, str):
        meter_map = load_map(spec)
    elif isinstance(spec, Mapping):
        meter_map = map_from_table(spec, f"{sub.where} ({sub.key('map')})")
    else:
        raise sub.error("map", "a map name, \"auto\", \"sunspec\", a .toml path or an "
                        "inline map table", spec)
    inverted = sub.bool("inverted", False)
    signed = sub.bool("signed_meter", False)
    rated = sub.opt_int("rated_power_w", min=1, max=10**7)
    if signed and (meter_map is None or not meter_map.extra_holding):
        raise sub.error("signed_meter", "a map with an OCMF interface (wm3m4)", spec)
    model = meter_map.model if meter_map else f"{discover} meter"
    label = f"{model} #{unit}" if single else sub.nonempty_str("label", f"{model} #{unit}")
    if not single:
        sub.reject_unknown()
    return MeterConfig(unit, meter_map, label, discover, inverted, signed, rated)
