"""Odometer integrity (sans-I/O): the digital logbook against mileage fraud.

Fed every odometer reading (km, PID 0xA6 or a DBC signal) and every speed reading (km/h) with
a monotonic ``now`` in ns. Two things become an :class:`~agent.readings.Event` (the runtime
signs it like a reading):

* ``odometer-decreased``: a value below the last accepted one (beyond the 0.1 km resolution
  of PID 0xA6). A real odometer never goes back.
* ``odometer-jump``: an increase that speed x time cannot explain. The bound is the highest
  speed seen since the last odometer value (or ``max_speed_kmh`` when no speed was seen while
  the car was awake) times the elapsed time, plus ``slack_km``. While the car sleeps it cannot
  drive, so a gap that spans an ignition-off counts only the awake time: a bigger odometer
  after a night parked is exactly what a roll-forward or cluster swap looks like.

The monitor never drops a value: it reports and carries on from the new value, so one event
marks one discontinuity (not every reading after it).

Across a restart of the agent (``restore(km)``, the last value the source saved in the state
directory, see :mod:`firmware_adapters.obd.odometer_file`) only a decrease is judged: the
car may have been driven while the agent was off, but never backwards. That is the classic
fraud: unplug the box, clock the cluster back, plug it in again.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.readings import Event

NS_PER_HOUR = 3_600_000_000_000


@dataclass(slots=True)
class OdometerMonitor:
    source: str = ""
    slack_km: float = 0.5  # two 0.1 km steps of PID 0xA6 plus rounding in the cluster
    max_speed_kmh: float = 250.0
    _last_km: float | None = None
    _last_now: int = 0
    _peak_kmh: float | None = None
    _current_kmh: float | None = None
    _asleep_ns: int = 0
    _sleep_started: int | None = None
    _restored_km: float | None = None

    @property
    def last_km(self) -> float | None:
        """The last accepted odometer value (what a source saves across restarts)."""
        return self._last_km

    def restore(self, km: float) -> None:
        """The last value seen before the agent (re)started: the next value is judged
        against it for a decrease only."""
        self._restored_km = km

    def speed(self, kmh: float) -> None:
        self._current_kmh = kmh
        self._peak_kmh = kmh if self._peak_kmh is None else max(self._peak_kmh, kmh)

    def asleep(self, now: int) -> None:
        if self._sleep_started is None:
            self._sleep_started = now

    def awake(self, now: int) -> None:
        if self._sleep_started is not None:
            self._asleep_ns += max(0, now - self._sleep_started)
            self._sleep_started = None
            self._current_kmh = None  # a parked car starts from zero; the next sample says

    def odometer(self, km: float, now: int, ts_ns: int) -> Event | None:
        last = self._last_km
        if last is None:
            restored, self._restored_km = self._restored_km, None
            self._accept(km, now)
            if restored is not None and km < restored - 0.1:
                return Event("odometer-decreased",
                             f"odometer went from {restored} km (before the agent started) "
                             f"to {km} km", ts_ns, self.source,
                             (("from_m", round(restored * 1000)), ("to_m", round(km * 1000)),
                              ("across_restart", 1)))
            return None
        event = None
        if km < last - 0.1:
            event = Event("odometer-decreased", f"odometer went from {last} km to {km} km",
                          ts_ns, self.source,
                          (("from_m", round(last * 1000)), ("to_m", round(km * 1000))))
        else:
            awake_ns = max(0, now - self._last_now - self._asleep_ns)
            peak = self._peak_kmh if self._peak_kmh is not None else self.max_speed_kmh
            allowed = peak * awake_ns / NS_PER_HOUR + self.slack_km
            if km - last > allowed:
                event = Event("odometer-jump",
                              f"odometer rose {km - last:.1f} km, speed x time allows "
                              f"{allowed:.1f} km", ts_ns, self.source,
                              (("from_m", round(last * 1000)), ("to_m", round(km * 1000)),
                               ("allowed_m", round(allowed * 1000))))
        self._accept(km, now)
        return event

    def _accept(self, km: float, now: int) -> None:
        self._last_km = km
        self._last_now = now
        self._peak_kmh = self._current_kmh  # the speed at this instant bounds what follows
        self._asleep_ns = 0
        if self._sleep_started is not None:
            self._sleep_started = now
