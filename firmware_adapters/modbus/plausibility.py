"""Plausibility of meter snapshots (sans-I/O).

Scope: a kWh meter's readings are what a driver pays for, so a snapshot that cannot be
physically true is flagged, never silently passed on or silently dropped. Five rules:

1. Energy counters (``1-0:1.8.0`` import, ``1-0:2.8.0`` export) never decrease.
2. Active power stays within the meter's rating (plus ``power_margin``).
3. An energy step is consistent with power x time: between two snapshots the import
   counter grows by at least min(P0, P1) x dt and at most max(P0, P1) x dt, using the
   import part of the signed total power (the export counter uses the export part), with
   a tolerance of two register resolutions plus ``relative_tolerance`` of the bound
   (power is sampled, not integrated; the counter is quantised).
4. Every quantity stays within the meter's physical range (``ranges``: voltage, current,
   energy counters, frequency, power factor); a float glitch (1e30) or a counter beyond
   what the meter can hold is ``meter-value-out-of-range``.
5. Over a sliding window (``window_s``, default 15 min) the import counter's growth matches
   the power integrated over the same samples (trapezoids of the import part of the
   signed power). A counter that creeps while power reads 0 W (``meter-energy-drift``) or
   sticks while power reads 22 kW (``meter-counter-stuck``) passes rule 3 step by step
   (each step is within one register resolution) but not rule 5. The window survives a
   restart (:meth:`PlausibilityChecker.export_window` / ``restore_window``, wall-clock
   ages); a gap longer than ``max_step_s`` restarts it. One event when the counter
   enters the state, one flag per snapshot while it stays.

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

from collections import deque
from collections.abc import Mapping, Sequence
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
    announce: bool = True  # False: a state already reported (flag the readings, no event)


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
                 max_step_s: int = 60, window_s: int = 900,
                 ranges: Mapping[str, tuple[int, int]] | None = None) -> None:
        if rated_power_w <= 0 or max_step_s <= 0 or window_s <= 0:
            raise ValueError("rated_power_w, max_step_s and window_s must be > 0")
        self.ranges = dict(ranges or {})
        self.window_ns = window_s * 1_000_000_000
        self._window: deque[tuple[int, int, int]] = deque()  # (ts_ns, import_wh, power_w)
        self._window_state: str | None = None
        self._area = 0  # sum over the window of (p0+ + p1+) x dt, in W x ns
        self.rated_power_w = rated_power_w
        self.power_limit_w = rated_power_w * (1 + power_margin)
        self.tolerance_wh = 2 * max(energy_resolution_wh, Fraction(1))
        self.relative_tolerance = relative_tolerance
        self.max_step_ns = max_step_s * 1_000_000_000
        self._last: dict[str, int] = {}
        self._last_power: int | None = None
        self._last_ts: int | None = None

    def check(self, values: Mapping[str, int], ts_ns: int) -> Verdict:
        findings: list[Finding] = self._ranges(values)
        out_of_range = {name for f in findings for name in f.names}
        values = {k: v for k, v in values.items() if k not in out_of_range}
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
        if IMPORT_WH in values and power is not None and not any(
                f.code == "meter-energy-decreased" for f in findings):
            findings.extend(self._window_check(values[IMPORT_WH], power, ts_ns))
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

    # ------------------------------------------------------------------ rule 4: ranges

    def _ranges(self, values: Mapping[str, int]) -> list[Finding]:
        found = []
        for name, value in values.items():
            bounds = self.ranges.get(name)
            if bounds is None or bounds[0] <= value <= bounds[1]:
                continue
            found.append(Finding(
                "meter-value-out-of-range",
                f"{name} = {value} outside the meter's range {bounds[0]}..{bounds[1]}"[:500],
                (("name", name), ("value", str(value)[:40]), ("low", bounds[0]),
                 ("high", bounds[1])), (name,)))
        return found

    # ------------------------------------------------------------------ rule 5: window

    def _window_check(self, import_wh: int, power_w: int, ts_ns: int) -> list[Finding]:
        window = self._window
        if window and not 0 < ts_ns - window[-1][0] <= self.max_step_ns:
            window.clear()  # an outage or a clock step: nobody knows the power in between
            self._window_state = None
            self._area = 0
        if window:
            self._area += _segment(window[-1], (ts_ns, import_wh, power_w))
        window.append((ts_ns, import_wh, power_w))
        while len(window) > 2 and ts_ns - window[1][0] >= self.window_ns:
            self._area -= _segment(window[0], window[1])
            window.popleft()
        if ts_ns - window[0][0] < self.window_ns // 2:
            return []  # not enough history for a verdict yet
        integral = Fraction(self._area, 2 * NS_PER_HOUR)  # trapezoids, kept as a running sum
        delta = import_wh - window[0][1]
        slack = 2 * self.tolerance_wh + self.relative_tolerance * integral
        state = "meter-energy-drift" if delta > integral + slack else \
            "meter-counter-stuck" if delta < integral - slack else None
        entered = state is not None and state != self._window_state
        self._window_state = state
        if state is None:
            return []
        span_s = (ts_ns - window[0][0]) // 1_000_000_000
        finding = Finding(
            state, f"{IMPORT_WH} grew {delta} Wh in {span_s} s while the power integrates to "
                   f"{int(integral)} Wh",
            (("delta_wh", delta), ("integrated_wh", int(integral)), ("window_s", span_s)),
            (IMPORT_WH,), announce=entered)
        return [finding]

    def export_window(self, now_ns: int) -> list[list[int]]:
        """The window as [[age_ns, import_wh, power_w], ...] (ages relative to ``now_ns``
        on this checker's clock), to be stored across a restart."""
        return [[now_ns - ts, energy, power] for ts, energy, power in self._window]

    def restore_window(self, rows: Sequence[Sequence[int]], now_ns: int,
                       elapsed_ns: int) -> None:
        """Put back a stored window; ``elapsed_ns`` is the wall-clock time since it was
        stored. Rows that are malformed, or older than the window, are ignored."""
        window: deque[tuple[int, int, int]] = deque()
        for row in rows:
            if len(row) != 3 or not all(isinstance(v, int) and not isinstance(v, bool)
                                        for v in row):
                return
            age = row[0] + elapsed_ns
            if 0 <= age <= self.window_ns + self.max_step_ns:
                window.append((now_ns - age, row[1], row[2]))
        if list(window) == sorted(window):
            self._window = window
            self._area = sum(_segment(a, b) for a, b in zip(window, list(window)[1:],
                                                            strict=False))


def _segment(a: tuple[int, int, int], b: tuple[int, int, int]) -> int:
    """Twice the import energy of one trapezoid, in W x ns (integers, exact)."""
    return (max(a[2], 0) + max(b[2], 0)) * (b[0] - a[0])
