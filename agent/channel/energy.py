"""The vehicle's own count of the energy it received, from its own readings (DESIGN s5b).
Sans-I/O: readings in (name, value, unit, ts_ns), Wh since the session began out.

The vehicle audits the station's METERs with this count, never with data the station sent
(agent/channel/vehicle.py rule 6). Which of its own signals the count comes from is config
(``[channel.energy]``, agent/channel/settings.py):

    counter  a cumulative energy reading (an on-board charger's Wh or kWh counter):
             delivered = (value - value at the start) x scale
    power    a power reading in W (or kW), integrated over time (trapezoids)
    vi       HV battery voltage x current, integrated over time (``scale = -1`` when the
             car reports charging current as negative)
    soc      state of charge in % x ``capacity_wh``: coarse (a 1 % step of 64 kWh is 640 Wh:
             widen the audit tolerance accordingly)

Integrating methods ignore a gap longer than MAX_GAP_S between two readings (the source
was down: that energy is unknown, and nothing is invented). The count never goes below zero
and never decreases: a car that feeds energy back (V2G) is audited by the station's export
price, which it checks against the tariff.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.channel.settings import EnergyConfig

MAX_GAP_S = 30.0
_ENERGY_UNITS = {"Wh": 1.0, "kWh": 1000.0}
_POWER_UNITS = {"W": 1.0, "kW": 1000.0}


@dataclass
class EnergyCount:
    """Feed it the vehicle's readings; ``delivered_wh`` is the count (None: no data yet).

    ``start_value`` / ``accumulated_wh`` are what a restart needs to go on (the service
    persists them with the session)."""

    config: EnergyConfig
    start_value: float | None = None
    accumulated_wh: float = 0.0

    def __post_init__(self) -> None:
        self._last: dict[str, tuple[float, int]] = {}   # name -> (value, ts_ns)
        self._prev_power: tuple[float, int] | None = None
        self._high = self.accumulated_wh

    @property
    def names(self) -> frozenset[str]:
        c = self.config
        return frozenset(n for n in (c.reading, c.voltage, c.current) if n)

    @property
    def delivered_wh(self) -> int | None:
        if self.config.method in ("counter", "soc") and self.start_value is None:
            return None
        if self.config.method in ("power", "vi") and self._prev_power is None \
                and self.accumulated_wh == 0:
            return None
        return int(self._high)

    def observe(self, name: str, value: float, unit: str, ts_ns: int) -> bool:
        """One reading; True when the count may have changed."""
        if name not in self.names or isinstance(value, bool):
            return False
        method = self.config.method
        if method == "counter":
            factor = _ENERGY_UNITS.get(unit)
            if factor is None:
                return False
            return self._level(value * factor)
        if method == "soc":
            return self._level(value * self.config.capacity_wh / 100.0)
        if method == "power":
            factor = _POWER_UNITS.get(unit)
            if factor is None:
                return False
            return self._integrate(value * factor, ts_ns)
        self._last[name] = (value, ts_ns)
        voltage = self._last.get(self.config.voltage)
        current = self._last.get(self.config.current)
        if voltage is None or current is None or name != self.config.current:
            return False
        return self._integrate(voltage[0] * current[0], ts_ns)

    def _level(self, wh: float) -> bool:
        if self.start_value is None:
            self.start_value = wh
        return self._raise((wh - self.start_value) * self.config.scale)

    def _integrate(self, power_w: float, ts_ns: int) -> bool:
        power_w *= self.config.scale
        previous, self._prev_power = self._prev_power, (power_w, ts_ns)
        if previous is None:
            return False
        dt_s = (ts_ns - previous[1]) / 1e9
        if not 0 < dt_s <= MAX_GAP_S:
            return False
        self.accumulated_wh += max(0.0, (previous[0] + power_w) / 2 * dt_s / 3600.0)
        return self._raise(self.accumulated_wh)

    def _raise(self, wh: float) -> bool:
        if wh > self._high:
            self._high = wh
            return True
        return False
