"""The asyncio loop shared by the OBD-II sources (CAN and ELM327): thin on purpose.

It opens the transport, asks the :class:`~firmware_adapters.obd.scheduler.Poller` what to send,
lets the transport exchange it, emits what the poller makes of the answers, and sleeps until
the poller's next time. A transport failure closes the transport, is counted, and is retried
with capped exponential back-off: unplugging an adapter or losing the bus never ends ``run``.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from agent.errors import AdapterError, AdapterUnavailable, DecodeError
from firmware_adapters.base import Clock, Emit, system_clock
from firmware_adapters.obd.odometer import OdometerMonitor
from firmware_adapters.obd.odometer_file import OdometerSource
from firmware_adapters.obd.scheduler import Plan, Poller

log = logging.getLogger(__name__)
RECONNECT_MIN_S = 0.2
RECONNECT_MAX_S = 30.0


@dataclass(frozen=True, slots=True)
class Exchange:
    """What one request brought: complete answers by ECU number, and how the link looked.
    ``silent``: nothing at all came from the car (no frame; ``NO DATA``). ``heard``: frames
    came but made no complete answer. Neither, without answers: an adapter fault."""

    answers: dict[int, bytes] = field(default_factory=dict)
    silent: bool = False
    heard: bool = False


class PollingSource(OdometerSource):
    """A Source that polls OBD-II through a transport given by the subclass."""

    def __init__(self, source_id: str, poll: Mapping[str, object], *,
                 slack_km: float = 0.5, clock: Clock = system_clock) -> None:
        super().__init__(source_id, clock)
        self.rx_errors: list[DecodeError] = []  # transport-level faults of the last exchange
        self.odometer = OdometerMonitor(source_id, slack_km=slack_km)
        self.poller = Poller(source=source_id, counters=self.counters,
                             odometer=self.odometer, **poll)  # type: ignore[arg-type]

    @abc.abstractmethod
    async def _open(self) -> None:
        """Open the transport; AdapterUnavailable / AdapterIOError when it is not there."""

    @abc.abstractmethod
    async def _close(self) -> None:
        """Close the transport; never raises."""

    @abc.abstractmethod
    async def _exchange(self, plan: Plan) -> Exchange:
        """Send one request; return every ECU's complete answer and the link's state."""

    async def _run(self, emit: Emit) -> None:
        delay = RECONNECT_MIN_S
        while True:
            try:
                await self._open()
                delay = RECONNECT_MIN_S
                await self._poll(emit)
            except AdapterUnavailable as exc:
                self.counters[f"unavailable-{exc.reason}"] += 1
                log.warning("source %s unavailable: %s", self.id, exc)
            except AdapterError as exc:
                self.counters[f"io-{exc.reason}"] += 1
                log.warning("source %s: %s; reconnecting", self.id, exc)
            finally:
                await self._close()
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX_S)

    async def _poll(self, emit: Emit) -> None:
        while True:
            now = time.monotonic_ns()
            plan = self.poller.next_request(now)
            if plan is None:
                await asyncio.sleep(max(0, self.poller.next_time(now) - now) / 1e9)
                continue
            self.requests[plan.kind] += 1   # work, not a fault (status, metrics)
            ex = await self._exchange(plan)
            ts_ns, status = self.clock()
            errors, self.rx_errors = self.rx_errors, []
            for item in self.poller.on_transport_errors(errors, ts_ns):
                await emit(item)
            for item in self.poller.on_answers(plan, ex.answers, time.monotonic_ns(), ts_ns,
                                               status, silent=ex.silent, heard=ex.heard):
                await emit(item)
            self._save_odometer()
