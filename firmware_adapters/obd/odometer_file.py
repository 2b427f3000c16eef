"""The odometer's last value, kept in the state directory across agent restarts.

Without it, the odometer monitor starts blank after every restart, and a cluster clocked
back while the agent was off (or unplugged) goes unseen. A source that feeds an
:class:`~firmware_adapters.obd.odometer.OdometerMonitor` derives from :class:`OdometerSource`,
which keeps an :class:`OdometerKeeper`::

    keeper = OdometerKeeper(monitor, state_dir / "sources" / f"{source_id}.odometer")
    keeper.restore()        # at start: the monitor judges the first value against it
    keeper.checkpoint()     # after readings: saved when it moved by >= step_km
    keeper.checkpoint(force=True)   # when the source stops

The file holds one decimal number (km), written atomically (agent.durable: temp file,
fsync, rename, fsync of the directory) with mode 0600. Saving every ``step_km`` (1 km) keeps SD-card writes rare (one every ~30 s at
motorway speed); a rollback is thousands of km, far above that granularity. A file that
cannot be read or parsed is counted (``odometer-state-unreadable``) and ignored: a missing
baseline only means this one restart is not judged.
"""

from __future__ import annotations

import abc
import logging
import math
from collections import Counter
from pathlib import Path

from agent.durable import make_dir, write_atomic
from firmware_adapters.base import Emit, Source
from firmware_adapters.obd.odometer import OdometerMonitor

log = logging.getLogger(__name__)
MAX_BYTES = 64


class OdometerKeeper:
    def __init__(self, monitor: OdometerMonitor, path: Path, counters: Counter[str], *,
                 step_km: float = 1.0) -> None:
        self.monitor, self.path, self.counters, self.step_km = monitor, path, counters, step_km
        self._saved: float | None = None

    @property
    def saved(self) -> float | None:
        """The value on disk (restored or last saved), None before any."""
        return self._saved

    def restore(self) -> float | None:
        """Hand the saved value to the monitor; returns it (None: nothing usable saved)."""
        try:
            with open(self.path, "rb") as f:
                text = f.read(MAX_BYTES + 1)
            if len(text) > MAX_BYTES:
                raise ValueError("file too long")
            km = float(text.decode("ascii").strip())
            if not math.isfinite(km) or km < 0:
                raise ValueError(f"not an odometer value: {km}")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            self.counters["odometer-state-unreadable"] += 1
            log.warning("odometer state %s unreadable (%s); this restart is not judged",
                        self.path, exc)
            return None
        self.monitor.restore(km)
        self._saved = km
        return km

    def checkpoint(self, *, force: bool = False) -> None:
        """Save the monitor's last value if it moved by ``step_km`` (or at all, ``force``)."""
        km = self.monitor.last_km
        if km is None or km == self._saved:
            return
        if not force and self._saved is not None and abs(km - self._saved) < self.step_km:
            return
        try:
            make_dir(self.path.parent)
            write_atomic(self.path, f"{km!r}\n".encode("ascii"))  # tmp, fsync, rename, fsync dir
        except OSError as exc:  # a full or read-only disk must not stop the readings
            self.counters["odometer-state-write-failed"] += 1
            log.warning("cannot save odometer state %s: %s", self.path, exc.strerror)
            return
        self._saved = km


class OdometerSource(Source):
    """A source with an odometer monitor (``self.odometer``) whose last value survives
    restarts: ``attach_state`` restores it, ``_save_odometer`` after readings saves it,
    and ``run`` (around the subclass's ``_run``) saves it once more when the source stops."""

    odometer: OdometerMonitor
    odometer_keeper: OdometerKeeper | None = None

    def attach_state(self, directory: Path) -> None:
        self.odometer_keeper = OdometerKeeper(self.odometer,
                                              self.state_file(directory, "odometer"),
                                              self.counters)
        self.odometer_keeper.restore()

    async def run(self, emit: Emit) -> None:
        try:
            await self._run(emit)
        finally:
            if self.odometer_keeper is not None:
                self.odometer_keeper.checkpoint(force=True)

    @abc.abstractmethod
    async def _run(self, emit: Emit) -> None:
        """What ``run`` does: poll or listen until cancelled."""

    def _save_odometer(self) -> None:
        if self.odometer_keeper is not None:
            self.odometer_keeper.checkpoint()
