"""A stand-in wallbox for the rig and the in-process tests, until the simulated wallbox
and plant of hil/sim/evse.py and hil/sim/plant.py are merged (issue 13, charger part);
then the rig names ``kind = "hil-evse"`` in its station config instead.

It has the shape of firmware_adapters/evse/base.py's Charger (what agent/channel/context.py
drives): IEC 61851 states A-F per connector, enable / disable, a current limit, a watch
that reports every change. It gates the simulated meters the way a wallbox gates the
power: while a connector is enabled and a car is plugged in, the station's meter follows
the charging profile and the car's own on-board counter (a second meter simulator, in the
car) follows it less the charger's losses; otherwise both stand still. ``plug`` /
``unplug`` / ``fail`` are the rig's hands on the cable.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from agent.errors import AdapterTimeout
from agent.readings import Event
from hil.sim.meter import ChargingProfile, MeterSimulator


class CpState(enum.Enum):  # IEC 61851-1 control pilot states
    A = "A"   # no vehicle
    B = "B"   # vehicle connected, not charging
    C = "C"   # charging
    D = "D"   # charging, ventilation required
    E = "E"   # error
    F = "F"   # EVSE not available


@dataclass(frozen=True, slots=True)
class ChargerStatus:
    connector: int
    state: CpState
    enabled: bool
    current_limit_a: float | None
    power_w: int | None = None
    fault: str | None = None


def tail(profile: ChargingProfile, t_s: float, scale: float = 1.0) -> ChargingProfile:
    """``profile`` from ``t_s`` on, re-based at 0, powers times ``scale``."""
    steps = [(0.0, round(profile.power_at(t_s) * scale))]
    steps += [(t - t_s, round(p * scale)) for t, p in profile.steps if t > t_s]
    return ChargingProfile(tuple(steps))


class StandInWallbox:
    kind = "hil-wallbox"

    def __init__(self, charger_id: str, station_meter: MeterSimulator,
                 car_meter: MeterSimulator | None = None, *, connector: int = 1,
                 profile: ChargingProfile | None = None, efficiency_ppm: int = 990_000,
                 plugged: bool = True) -> None:
        self.id, self.connector = charger_id, connector
        self.station_meter, self.car_meter = station_meter, car_meter
        self.efficiency = efficiency_ppm / 1_000_000
        self.counters: Counter[str] = Counter()
        self.state = CpState.B if plugged else CpState.A
        self.enabled = False
        self.current_limit_a: float | None = None
        self.silent = False
        self.switches: list[bool] = []          # every set_enabled, for tests
        self._profile = profile or ChargingProfile.constant(11_000)
        self._t0 = station_meter.clock()
        self._changed = asyncio.Event()
        self._apply()

    # -- the rig's hands -------------------------------------------------------------------
    def set_profile(self, profile: ChargingProfile) -> None:
        self._profile, self._t0 = profile, self.station_meter.clock()
        self._apply()

    def plug(self) -> None:
        self._set_state(CpState.C if self.enabled else CpState.B)

    def unplug(self) -> None:
        self._set_state(CpState.A)

    def fail(self) -> None:
        self._set_state(CpState.F)

    # -- the Charger interface -------------------------------------------------------------
    async def open(self) -> None:
        return None

    def close(self) -> None:
        return None

    def status(self) -> ChargerStatus:
        power = self.station_meter.meters[min(self.station_meter.meters)].power_w
        return ChargerStatus(self.connector, self.state, self.enabled, self.current_limit_a,
                             power, "not available" if self.state is CpState.F else None)

    async def read_status(self, connector: int) -> ChargerStatus:
        self._check(connector)
        return self.status()

    async def set_enabled(self, connector: int, enabled: bool) -> None:
        self._check(connector)
        self.switches.append(enabled)
        self.enabled = enabled
        if self.state in (CpState.B, CpState.C):
            self.state = CpState.C if enabled else CpState.B
        self._apply()
        self._changed.set()

    async def set_current_limit(self, connector: int, amps: float) -> None:
        self._check(connector)
        self.current_limit_a = amps

    async def watch(self, on_status: Callable[[ChargerStatus], None], interval_s: float,
                    on_event: Callable[[Event], None] | None = None) -> None:
        """As the Charger base does: each changed status; one ``charger-silent`` event when
        it stops answering, ``charger-recovered`` when it answers again."""
        last, silent = None, False
        report = on_event or (lambda event: None)
        while True:
            if self.silent != silent:
                silent = self.silent
                code = "charger-silent" if silent else "charger-recovered"
                report(Event(code, f"{self.id} connector {self.connector}", time.time_ns(),
                             self.id, (("connector", self.connector),)))
                last = None
            if not silent:
                status = self.status()
                if status != last:
                    on_status(status)
                    last = status
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), interval_s)

    def set_silent(self, silent: bool) -> None:
        self.silent = silent
        self._changed.set()

    # -- internals ---------------------------------------------------------------------
    def _check(self, connector: int) -> None:
        if self.silent:
            self.counters["no-response"] += 1
            raise AdapterTimeout(f"charger {self.id}: no answer", reason="no-response")
        if connector != self.connector:
            raise AdapterTimeout(f"charger {self.id}: no connector {connector}",
                                 reason="no-connector")

    def _set_state(self, state: CpState) -> None:
        self.state = state
        self._apply()
        self._changed.set()

    def _apply(self) -> None:
        flowing = self.enabled and self.state in (CpState.B, CpState.C)
        elapsed = self.station_meter.clock() - self._t0
        for sim, scale in ((self.station_meter, 1.0), (self.car_meter, self.efficiency)):
            if sim is None:
                continue
            if flowing:
                sim.set_profile(tail(self._profile, elapsed, scale))
            else:
                sim.set_power(0)
