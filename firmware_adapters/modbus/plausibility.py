"""Plausibility of meter snapshots (sans-I/O).

Scope: a kWh meter's readings are what a driver pays for, so a snapshot that cannot be
physically true is flagged, never silently passed on or silently dropped. Three rules:

1. Energy counters (``1-0:1.8.0`` import, ``1-0:2.8.0`` export) never decrease.
2. Active power stays within the meter's rating (plus ``power_margin``).
3. An energy step is consistent with power x time: between two snapshots the import
   counter grows by at least min(P0, P1) x dt and at most max(P0, P1) x dt, using the
   import part of the signed total power (the export counter uses the export part), with
   a tolerance of two register resolutions plus ``relative_tolerance`` of the bound
   (power is sampled, not integrated; the counter is quantised).

Rules:

- Time is an argument (``ts_ns``); nothing here reads a clock.
- A violation becomes a :class:`Finding` (an event code, a message and small details) and
  the flag ``"implausible"`` on every reading it concerns. The driver turns findings into
  signed events. A decreasing counter does not move the baseline, so one glitch is one
  finding, not two.
- Rule 3 is skipped when the gap between snapshots exceeds ``max_step_s`` (after an outage
  nobody knows what the power was in between).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction

IMPLAUSIBLE = "implausible"
IMPORT_WH = "1-0:1.8.0"
EXPORT_WH = "1-0:2.8.0"
POWER_W = "1-0:16.7.0"
NS_PER_HOUR = 3_600_000_000_000


@dataclass(frozen=True, slots=True)
class Finding:
    code: str
    message: str
    details: tuple[tuple[str, int | str], ...]
    names: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Verdict:
    flags: Mapping[str, tuple[str, ...]]
    findings: tuple[Finding, ...]

    def flags_for(self, name: str) -> tuple[str, ...]:
        return self.flags.get(name, ())


class PlausibilityChecker:
    """Feed each complete snapshot of one meter with :meth:`check`."""

    def __init__(self, *, rated_power_w: int, energy_resolution_wh: Fraction = Fraction(1),
                 power_margin: Fraction = Fraction(1, 10),
                 relative_tolerance: Fraction = Fraction(1, 10),
                 max_step_s: int = 60) -> None:
        if rated_power_w <= 0 or max_step_s <= 0:
            raise ValueError("rated_power_w and max_step_s must be > 0")
        self.rated_power_w = rated_power_w
        self.power_limit_w = rated_power_w * (1 + power_margin)
        self.tolerance_wh = 2 * max(energy_resolution_wh, Fraction(1))
        self.relative_tolerance = relative_tolerance
        self.max_step_ns = max_step_s * 1_000_000_000
        self._last: dict[str, int] = {}
        self._last_power: int | None = None
        self._last_ts: int | None = None

    def check(self, values: Mapping[str, int], ts_ns: int) -> Verdict:
        findings: list[Finding] = []
        power = values.get(POWER_W)
        if power is not None and abs(power) > self.power_limit_w:
            findings.append(Finding(
                "meter-power-out-of-range",
                f"active power {power} W outside the rating of {self.rated_power_w} W",
                (("power_w", power), ("rated_power_w", self.rated_power_w)), (POWER_W,)))
            power = None  # an implausible power is no basis for the step check
        step_ok = (power is not None and self._last_power is not None
                   and self._last_ts is not None
                   and 0 < ts_ns - self._last_ts <= self.max_step_ns)
        for name, sign in ((IMPORT_WH, 1), (EXPORT_WH, -1)):
            if name not in values:
                continue
            energy, last = values[name], self._last.get(name)
            if last is not None and energy < last:
                findings.append(Finding(
                    "meter-energy-decreased", f"{name} went down from {last} to {energy} Wh",
                    (("name", name), ("previous_wh", last), ("value_wh", energy)), (name,)))
                continue
            if step_ok and last is not None:
                finding = self._step(name, energy - last, sign, power, ts_ns)  # type: ignore[arg-type]
                if finding:
                    findings.append(finding)
            self._last[name] = energy
        if power is not None or POWER_W not in values:
            self._last_power = power
        self._last_ts = ts_ns
        flags: dict[str, tuple[str, ...]] = {}
        for finding in findings:
            for name in finding.names:
                flags[name] = (IMPLAUSIBLE,)
        return Verdict(flags, tuple(findings))

    def _step(self, name: str, delta_wh: int, sign: int, power: int,
              ts_ns: int) -> Finding | None:
        assert self._last_power is not None and self._last_ts is not None
        dt_ns = ts_ns - self._last_ts
        p0, p1 = max(sign * self._last_power, 0), max(sign * power, 0)
        low = Fraction(min(p0, p1) * dt_ns, NS_PER_HOUR)
        high = Fraction(max(p0, p1) * dt_ns, NS_PER_HOUR)
        slack = self.tolerance_wh + self.relative_tolerance * high
        if low - slack <= delta_wh <= high + slack:
            return None
        return Finding(
            "meter-energy-step-inconsistent",
            f"{name} grew {delta_wh} Wh in {dt_ns // 1_000_000} ms; power says "
            f"{int(low)}..{int(high) + 1} Wh",
            (("name", name), ("delta_wh", delta_wh), ("dt_ms", dt_ns // 1_000_000),
             ("expected_min_wh", int(low)), ("expected_max_wh", int(high) + 1)),
            (name, POWER_W))
