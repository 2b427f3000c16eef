"""Charger control: the one abstract base every charger kind plugs into (IEC 61851-1).

THE INTERFACE (agreed with the charging-service engineer; keep changes minimal)::

    class CpState(enum.Enum):        # IEC 61851-1 control pilot states (Annex A)
        A  no vehicle               B  vehicle connected, not charging
        C  charging                 D  charging, ventilation required
        E  error (no pilot / short) F  EVSE fault / not available
        .plugged  -> B, C, D        .charging -> C, D

    @dataclass(frozen=True, slots=True)
    class ChargerStatus:
        connector: int
        state: CpState
        enabled: bool                  # the EVSE is allowed to deliver (PWM on when plugged)
        current_limit_a: float | None  # what the EVSE offers the car (None: not reported)
        power_w: int | None = None     # where the controller reports it
        fault: str | None = None       # the controller's own fault text/code, if any

    class Charger(abc.ABC):
        kind: ClassVar[str]
        def __init__(self, charger_id: str, connectors: tuple[int, ...]) -> None
        id: str; connectors: tuple[int, ...]; counters: Counter[str]
        @classmethod from_options(cls, charger_id, options, where) -> Self   # ConfigError
        async open() -> None; close() -> None
        async read_status(connector) -> ChargerStatus        # one poll; raises AdapterError
        async set_enabled(connector, enabled) -> None        # raises AdapterError
        async set_current_limit(connector, amps) -> None     # raises AdapterError/ValueError
        async watch(on_status, interval_s, on_event=None) -> None
        status(connector) -> ChargerStatus | None            # last good poll; None when silent

``watch`` opens the charger if needed, polls every connector every ``interval_s`` until
cancelled, and calls ``on_status`` with each status that differs from the previous one of
that connector (the first poll always reports). A charger that stops answering is treated
like a silent meter (firmware_adapters/modbus/driver.py): every failed poll counts
``counters[reason]``; the first failures report ``charger-read-failed`` events to
``on_event``, and after ``silent_after`` failures in a row one ``charger-silent`` event
(details: connector, reason), after which :meth:`status` returns None for that connector
until it answers again (``charger-recovered``). Nothing is invented: no status is reported
for a connector that did not answer. A connection that cannot be (re)opened gives
``charger-line-down`` (once) and ``charger-line-up`` with the outage length; the driver
reconnects with capped exponential back-off. The service stops delivery on
``charger-silent`` (it cannot command a charger that does not answer; the real devices
fall back to their safe current on their own communication time-out, see the maps).

Callbacks are plain functions (called from the event loop, must not block); the service
turns them into its own queue/events.
"""

from __future__ import annotations

import abc
import asyncio
import enum
import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar, Self

from agent.backoff import Backoff
from agent.errors import AdapterError, AdapterUnavailable, DecodeError
from agent.options import Table
from agent.readings import Event
from firmware_adapters.base import Clock, raise_if_cancelled, system_clock

log = logging.getLogger(__name__)


class CpState(enum.Enum):
    """IEC 61851-1:2017 Annex A control pilot states."""

    A = "A"   # no vehicle (+12 V)
    B = "B"   # vehicle connected, not charging (+9 V)
    C = "C"   # charging (+6 V)
    D = "D"   # charging, ventilation required (+3 V)
    E = "E"   # error: no pilot / short to PE (0 V)
    F = "F"   # EVSE fault / not available (-12 V)

    @property
    def plugged(self) -> bool:
        """A vehicle is connected (states B, C, D)."""
        return self in (CpState.B, CpState.C, CpState.D)

    @property
    def charging(self) -> bool:
        """The vehicle draws current (states C, D)."""
        return self in (CpState.C, CpState.D)


@dataclass(frozen=True, slots=True)
class ChargerStatus:
    connector: int
    state: CpState
    enabled: bool
    current_limit_a: float | None
    power_w: int | None = None
    fault: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.connector, bool) or not isinstance(self.connector, int) \
                or self.connector < 1:
            raise ValueError(f"connector must be an int >= 1, got {self.connector!r}")
        if not isinstance(self.state, CpState):
            raise ValueError(f"state must be a CpState, got {self.state!r}")
        if self.current_limit_a is not None and not 0 <= self.current_limit_a <= 1000:
            raise ValueError(f"current_limit_a out of range: {self.current_limit_a!r}")


MAX_CONNECTORS = 8


def charger_table(options: Mapping[str, object], where: str, charger_id: str) -> Table:
    """A ``[[chargers]]`` entry's options, keys named ``chargers.<id>.<key>`` (``id`` and
    ``kind`` were read by the caller)."""
    return Table(options, where, f"chargers.{charger_id}", ignore=("id", "kind"))


def connector_list(o: Table) -> tuple[int, ...]:
    """``connectors = [1, 2]`` (default ``[1]``): distinct connector numbers 1..8."""
    raw = o.list("connectors", [1])
    found: list[int] = []
    for n in raw:
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_CONNECTORS \
                or n in found:
            raise o.error("connectors", "a non-empty array of distinct connector numbers "
                          f"1..{MAX_CONNECTORS}", raw)
        found.append(n)
    if not found:
        raise o.error("connectors", "a non-empty array of connector numbers", raw)
    return tuple(found)


StatusCallback = Callable[[ChargerStatus], None]
EventCallback = Callable[[Event], None]


@dataclass(slots=True)
class _Watched:
    last: ChargerStatus | None = None       # last status reported to on_status
    failures: int = 0
    silent_since_ns: int | None = None


class Charger(abc.ABC):
    kind: ClassVar[str]

    def __init__(self, charger_id: str, connectors: tuple[int, ...], *,
                 clock: Clock = system_clock, silent_after: int = 3,
                 backoff_initial_s: float = 0.2, backoff_max_s: float = 10.0) -> None:
        if not connectors or len(set(connectors)) != len(connectors) \
                or any(c < 1 for c in connectors):
            raise ValueError(f"connectors must be distinct ints >= 1, got {connectors!r}")
        self.id = charger_id
        self.connectors = tuple(connectors)
        self.clock = clock
        self.silent_after = silent_after
        self.counters: Counter[str] = Counter()
        self._backoff = Backoff(backoff_initial_s, max(backoff_initial_s, backoff_max_s))
        self._watched = {c: _Watched() for c in self.connectors}
        self._good: dict[int, ChargerStatus] = {}
        self._line_down_since: int | None = None
        self.opened = False

    # ------------------------------------------------------------------ the kind's part

    @classmethod
    @abc.abstractmethod
    def from_options(cls, charger_id: str, options: Mapping[str, object], where: str) -> Self:
        """Validate the ``[[chargers]]`` table; raise ConfigError naming ``where`` and key."""

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect; AdapterUnavailable when the charger cannot be reached."""

    @abc.abstractmethod
    def close(self) -> None:
        """Drop the connection (idempotent)."""

    @abc.abstractmethod
    async def read_status(self, connector: int) -> ChargerStatus:
        """One poll of ``connector``; AdapterError (or DecodeError) when it fails."""

    @abc.abstractmethod
    async def set_enabled(self, connector: int, enabled: bool) -> None:
        """Allow or stop delivery on ``connector``."""

    @abc.abstractmethod
    async def set_current_limit(self, connector: int, amps: float) -> None:
        """The current the EVSE offers the car (IEC 61851-1 PWM duty cycle)."""

    async def keepalive(self) -> None:  # noqa: B027 - optional hook
        """Called once per watch cycle: a kind whose device forgets its set-point after a
        communication time-out (Alfen's validity time) rewrites it here."""

    # ------------------------------------------------------------------ shared

    def _check_connector(self, connector: int) -> None:
        if connector not in self.connectors:
            raise ValueError(f"{self.id}: no connector {connector} "
                             f"(configured: {', '.join(map(str, self.connectors))})")

    def status(self, connector: int) -> ChargerStatus | None:
        """The last status read from ``connector``; None before the first good poll and
        while the connector is silent."""
        self._check_connector(connector)
        return self._good.get(connector)

    def is_silent(self, connector: int) -> bool:
        self._check_connector(connector)
        return self._watched[connector].silent_since_ns is not None

    async def watch(self, on_status: StatusCallback, interval_s: float,
                    on_event: EventCallback | None = None) -> None:
        """Poll every connector until cancelled (see the module docstring)."""
        if interval_s <= 0:
            raise ValueError("interval_s must be > 0")
        report = on_event or (lambda event: None)
        try:
            while True:
                raise_if_cancelled()   # pymodbus can lose our cancel (see there)
                started = time.monotonic()
                if not await self.poll_once(on_status, report):
                    await asyncio.sleep(self._backoff.next())
                    continue
                self._backoff.reset()
                await asyncio.sleep(max(0.0, interval_s - (time.monotonic() - started)))
        finally:
            self.close()
            self.opened = False

    async def poll_once(self, on_status: StatusCallback, report: EventCallback) -> bool:
        """One watch cycle: open the line if needed, read every connector, run the
        keep-alive. False when the line is down (the caller backs off)."""
        if not await self._ensure_open(report):
            for connector in self.connectors:
                self._failed(connector, report, "line-down", "charger line is down")
            return False
        for connector in self.connectors:
            if not self.opened:
                self._failed(connector, report, "line-down", "charger line is down")
                continue
            try:
                status = await self.read_status(connector)
            except AdapterUnavailable as exc:
                self.close()
                self.opened = False
                self._went_down(report, str(exc))
                self._failed(connector, report, exc.reason, str(exc))
                continue
            except (AdapterError, DecodeError) as exc:
                self._failed(connector, report, exc.reason, str(exc))
                continue
            self._succeeded(connector, report)
            watched = self._watched[connector]
            self._good[connector] = status
            if status != watched.last:
                watched.last = status
                on_status(status)
        if self.opened:
            try:
                await self.keepalive()
            except AdapterError as exc:
                self.counters[f"keepalive-{exc.reason}"] += 1
        return self.opened

    async def _ensure_open(self, report: EventCallback) -> bool:
        if self.opened:
            return True
        try:
            await self.open()
        except AdapterUnavailable as exc:   # counted per connector by the caller
            self._went_down(report, str(exc))
            return False
        self.opened = True
        if self._line_down_since is not None:
            now, _ = self.clock()
            report(Event("charger-line-up", "charger line is back", now, self.id,
                         (("down_ms", (now - self._line_down_since) // 1_000_000),)))
            self._line_down_since = None
        return True

    def _went_down(self, report: EventCallback, why: str) -> None:
        if self._line_down_since is None:
            now, _ = self.clock()
            self._line_down_since = now
            log.warning("%s: charger line down: %s", self.id, why)
            report(Event("charger-line-down", f"charger line down: {why}"[:500], now, self.id))

    def _failed(self, connector: int, report: EventCallback, reason: str,
                      why: str) -> None:
        self.counters[reason] += 1
        watched = self._watched[connector]
        watched.failures += 1
        self._good.pop(connector, None)   # an unanswered poll leaves nothing to trust
        if watched.silent_since_ns is not None:
            return
        now, _ = self.clock()
        details = (("connector", connector), ("reason", reason))
        if watched.failures >= self.silent_after:
            watched.silent_since_ns = now
            watched.last = None   # the first status after recovery is reported again
            self.counters["silent"] += 1
            report(Event("charger-silent", f"{self.id} connector {connector} stopped "
                         f"answering: {why}"[:500], now, self.id, details))
            return
        report(Event("charger-read-failed", why[:500], now, self.id, details))

    def _succeeded(self, connector: int, report: EventCallback) -> None:
        watched = self._watched[connector]
        if watched.silent_since_ns is not None:
            now, _ = self.clock()
            report(Event("charger-recovered", f"{self.id} connector {connector} answers "
                         "again", now, self.id,
                         (("connector", connector),
                          ("silent_ms", (now - watched.silent_since_ns) // 1_000_000),
                          ("failed_reads", watched.failures))))
        watched.failures = 0
        watched.silent_since_ns = None
