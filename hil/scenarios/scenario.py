"""HIL scenario files: a profile, faults on a timeline, and expectations judged on a record.

Scope: the TOML format, its loader (every error a ConfigError naming file and key, through
``agent.config.Table``), and the evaluation of expectations against an
:class:`hil.report.SessionRecord`. The runner (``edge-agent hil run``) drives the rig from
a :class:`Scenario`, fills a SessionRecord and calls :meth:`Scenario.evaluate`; nothing here
does I/O beyond reading the file, and time is always an argument.

Format (``hil/scenarios/*.toml``)::

    [scenario]
    name = "broker-outage"           # defaults to the file name
    description = "..."
    duration_s = 120                 # the session length
    seed = 1                         # for the simulators' noise

    [profile]
    kind = "charging"                # charging | driving
    step_s = 1.0                     # simulator update period
    power_w = [[0, 0], [5, 11000], [110, 11000], [115, 0]]   # [t_s, W], piecewise linear;
                                     # negative = export (V2G)
    export_price_per_kwh = 250000    # charging only: the station's V2G price (default 0)
    speed_kmh = [[0, 0], [20, 50]]   # driving only, optional

    [[faults]]
    kind = "broker-outage"           # see FAULTS
    start_s = 30
    duration_s = 20
    target = "broker"                # what is hit; defaults per kind

    [[expect]]
    name = "all envelopes verify"    # shown in the report
    check = "envelopes-verify"       # see CHECKS; other keys are the check's parameters
    min_envelopes = 10

Rules: a check never passes for lack of data: no receipt, no verification, no reading from
the source at all, or a fault that never happened in the record are FAILs that say so. Event
codes the runner writes into ``SessionRecord.events`` and checks may name:
``uplink-reconnected``, ``agent-restarted``, ``channel-challenged``, ``source-timeout``.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from agent.config import load_toml
from agent.options import Table
from hil.report import ExpectationResult, FaultWindow, SessionRecord

SCENARIO_DIR = Path(__file__).resolve().parent
S = 1_000_000_000

ParamValue = int | float | str | bool
# A parameter: (type name, default). A default of REQUIRED means the key must be given.
REQUIRED = object()
ParamSpec = Mapping[str, tuple[str, object]]


# --- faults ---------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class FaultSpec:
    doc: str
    targets: tuple[str, ...]            # allowed targets; () = any source id
    default_target: str
    params: ParamSpec = field(default_factory=dict)


FAULTS: dict[str, FaultSpec] = {
    "broker-outage": FaultSpec(
        "the MQTT broker is stopped at start_s and restarted after duration_s",
        ("broker",), "broker"),
    "meter-timeout": FaultSpec(
        "the meter (a source id) stops answering Modbus requests for duration_s", (), "meter0"),
    "agent-crash": FaultSpec(
        "the target agent is killed at start_s (its tasks cancelled mid-flight: no flush, no "
        "close) and restarted from its state directory after duration_s",
        ("vehicle", "station"), "station"),
    "ignition-off": FaultSpec(
        "the simulated ECU (a source id) goes silent for duration_s", (), "ecu0"),
    "stale-state-close": FaultSpec(
        "at start_s the target closes the channel on chain with a co-signed state nonces_back "
        "behind the latest; duration_s is the dispute window the other party must challenge in",
        ("vehicle", "station"), "station", {"nonces_back": ("int>=1", 1)}),
}


@dataclass(frozen=True, slots=True)
class Fault:
    kind: str
    start_s: float
    duration_s: float
    target: str
    params: Mapping[str, ParamValue] = field(default_factory=dict)

    @property
    def end_s(self) -> float:
        return self.start_s + self.duration_s

    def window(self, started_ns: int) -> FaultWindow:
        return FaultWindow(self.kind, started_ns + int(self.start_s * S),
                           started_ns + int(self.end_s * S), self.target)


# --- profile --------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Profile:
    """Power (and, driving, speed) over time, piecewise linear between points; constant
    after the last point, and the first value before the first."""

    kind: str
    step_s: float
    power_w: tuple[tuple[float, float], ...]
    speed_kmh: tuple[tuple[float, float], ...] = ()
    export_price_per_kwh: int = 0

    def power_at(self, t_s: float) -> int:
        return round(_interpolate(self.power_w, t_s))

    def energy_wh(self, t_s: float) -> float:
        """Exact integral of the power from 0 to ``t_s`` in Wh (trapezoids are exact here)."""
        total, points = 0.0, self.power_w
        knots = [0.0] + [t for t, _ in points if 0.0 < t < t_s] + [t_s]
        for a, b in zip(knots, knots[1:], strict=False):
            total += (b - a) * (_interpolate(points, a) + _interpolate(points, b)) / 2
        return total / 3600.0


def _interpolate(points: Sequence[tuple[float, float]], t: float) -> float:
    times = [p[0] for p in points]
    i = bisect.bisect_right(times, t)
    if i == 0:
        return points[0][1]
    if i == len(points):
        return points[-1][1]
    (t0, v0), (t1, v1) = points[i - 1], points[i]
    return v0 + (v1 - v0) * (t - t0) / (t1 - t0)


# --- checks ---------------------------------------------------------------------------------

Params = Mapping[str, ParamValue]
Verdict = tuple[bool, str]


@dataclass(frozen=True, slots=True)
class CheckSpec:
    doc: str
    params: ParamSpec
    run: Callable[[SessionRecord, Params, Scenario], Verdict]


def _envelopes_verify(record: SessionRecord, p: Params, _: Scenario) -> Verdict:
    v = record.verification
    if v is None:
        return False, "no verification in the record"
    problems = [f"{name} {value}" for name, value in (
        ("gaps", v.gaps), ("broken links", v.broken_links), ("reordered", v.reorders),
        ("rejected", sum(v.failures.values()))) if value]
    if not p["allow_declared_drops"] and v.dropped_declared:
        problems.append(f"declared drops {v.dropped_declared}")
    if v.envelopes < int(p["min_envelopes"]):
        problems.append(f"only {v.envelopes} envelopes (want >= {p['min_envelopes']})")
    if not v.ok:
        problems.append("verifier says FAIL")
    detail = (f"{v.envelopes} envelopes, {v.readings} readings, {v.duplicates} duplicates "
              f"removed, {v.dropped_declared} declared drops")
    return not problems, detail + ("; " + ", ".join(problems) if problems else "")


def _energy_paid(record: SessionRecord, p: Params, _: Scenario) -> Verdict:
    r = record.receipt
    if r is None:
        return False, "no receipt in the record"
    diff = r.energy_wh - r.paid_wh
    ok = abs(diff) <= int(p["tolerance_wh"]) and r.energy_wh > 0
    return ok, (f"metered {r.energy_wh} Wh, paid for {r.paid_wh} Wh (difference {diff} Wh, "
                f"tolerance {p['tolerance_wh']} Wh)" + ("" if r.energy_wh > 0 else
                                                        "; no energy metered"))


def _amount_matches_tariff(record: SessionRecord, p: Params, _: Scenario) -> Verdict:
    r = record.receipt
    if r is None:
        return False, "no receipt in the record"
    due = r.paid_wh * r.price_per_kwh // 1000
    diff = r.paid - due
    return abs(diff) <= int(p["tolerance"]), (
        f"paid {r.paid}, {r.paid_wh} Wh at {r.price_per_kwh}/kWh is {due} (difference {diff}, "
        f"tolerance {p['tolerance']})")


def _channel_settled(record: SessionRecord, p: Params, _: Scenario) -> Verdict:
    r = record.receipt
    if r is None:
        return False, "no receipt in the record"
    problems = []
    if not r.settled:
        problems.append("not settled")
    if p["close"] != "any" and r.close != p["close"]:
        problems.append(f"closed {r.close}, want {p['close']}")
    if p["at_latest_state"] and r.settled_nonce != r.latest_nonce:
        problems.append(f"settled at nonce {r.settled_nonce}, latest co-signed {r.latest_nonce}")
    detail = f"{r.close}, settled nonce {r.settled_nonce}, latest {r.latest_nonce}"
    if r.settlement_tx:
        detail += f", tx {r.settlement_tx}"
    return not problems, detail + ("; " + ", ".join(problems) if problems else "")


def _fault_windows(record: SessionRecord, p: Params, scenario: Scenario,
                   ) -> tuple[str, list[FaultWindow]]:
    """The source judged (default: the first fault's target) and the windows that concern it:
    the faults of that kind aimed at the source, or all of that kind when none is (a crashed
    station agent stops its meter's readings too)."""
    faults = [f for f in scenario.faults if f.kind == p["fault"]]
    source = str(p["source"]) or faults[0].target
    # The windows the runner measured (when the fault really began and ended) win over the
    # planned ones: those are only where the fault was meant to be.
    windows = [w for w in record.faults if w.kind == p["fault"]] or [
        f.window(record.started_ns) for f in faults]
    aimed = [w for w in windows if w.target == source] or windows
    return source, aimed


def _no_readings_during_fault(record: SessionRecord, p: Params, scenario: Scenario) -> Verdict:
    source, windows = _fault_windows(record, p, scenario)
    grace_ns = int(float(p["grace_s"]) * S)
    mine = [r for r in record.readings if r.source == source
            and (not p["reading"] or r.name == p["reading"])]
    if not mine:
        return False, f"no readings from {source} in the record at all: nothing to judge"
    invented = [r for r in mine for w in windows if w.start_ns + grace_ns <= r.ts_ns < w.end_ns]
    detail = (f"{len(mine)} readings from {source}, {len(invented)} inside "
              f"{len(windows)} {p['fault']} window(s)")
    if invented:
        first = invented[0]
        detail += f"; first at +{(first.ts_ns - record.started_ns) / S:.1f} s ({first.name})"
    return not invented, detail


def _readings_resume(record: SessionRecord, p: Params, scenario: Scenario) -> Verdict:
    source, windows = _fault_windows(record, p, scenario)
    within_ns = int(float(p["within_s"]) * S)
    times = sorted(r.ts_ns for r in record.readings if r.source == source)
    late = []
    for w in windows:
        i = bisect.bisect_left(times, w.end_ns)
        if i == len(times) or times[i] > w.end_ns + within_ns:
            late.append(f"none within {p['within_s']} s after +{(w.end_ns - record.started_ns) / S:g} s")
    return not late, (f"{source}: readings resumed after {len(windows) - len(late)}/"
                      f"{len(windows)} {p['fault']} window(s)" + ("; " + "; ".join(late)
                                                                  if late else ""))


def _event_seen(record: SessionRecord, p: Params, _: Scenario) -> Verdict:
    seen = [e for e in record.events if e.code == p["code"]
            and (not p["where"] or e.where == p["where"])]
    where = f" from {p['where']}" if p["where"] else ""
    return len(seen) >= int(p["min_count"]), (
        f"{len(seen)} '{p['code']}' event(s){where}, want >= {p['min_count']}")


def _v2g_paid(record: SessionRecord, p: Params, _: Scenario) -> Verdict:
    r = record.receipt
    if r is None:
        return False, "no receipt in the record"
    due = r.export_wh * r.export_price_per_kwh // 1000
    diff = r.refunded - due
    ok = r.export_wh >= int(p["min_export_wh"]) and r.refunded > 0 and \
        abs(diff) <= int(p["tolerance"])
    return ok, (f"fed back {r.export_wh} Wh at {r.export_price_per_kwh}/kWh is {due}; the "
                f"station paid the vehicle {r.refunded} (difference {diff}, tolerance "
                f"{p['tolerance']}, at least {p['min_export_wh']} Wh fed back)")


def _energy_range(record: SessionRecord, p: Params, _: Scenario) -> Verdict:
    r = record.receipt
    if r is None:
        return False, "no receipt in the record"
    ok = int(p["min_wh"]) <= r.energy_wh <= int(p["max_wh"])
    return ok, f"metered {r.energy_wh} Wh, want {p['min_wh']}..{p['max_wh']} Wh"


CHECKS: dict[str, CheckSpec] = {
    "envelopes-verify": CheckSpec(
        "every envelope verifies: no gap, broken link, reorder or rejected envelope",
        {"min_envelopes": ("int>=0", 1), "allow_declared_drops": ("bool", True)},
        _envelopes_verify),
    "energy-paid": CheckSpec(
        "the metered energy equals the energy paid for (energy_wh == paid_wh)",
        {"tolerance_wh": ("int>=0", 0)}, _energy_paid),
    "amount-matches-tariff": CheckSpec(
        "the amount paid is the paid energy at the signed tariff",
        {"tolerance": ("int>=0", 0)}, _amount_matches_tariff),
    "channel-settled": CheckSpec(
        "the channel settled on chain (optionally: how, and at the latest co-signed state)",
        {"close": ("close", "any"), "at_latest_state": ("bool", True)}, _channel_settled),
    "no-readings-during-fault": CheckSpec(
        "no reading from the source is timestamped inside a fault window (none invented)",
        {"fault": ("fault", REQUIRED), "source": ("str", ""), "reading": ("str", ""),
         "grace_s": ("float>=0", 0.0)}, _no_readings_during_fault),
    "readings-resume": CheckSpec(
        "readings from the source come back within within_s after each fault window",
        {"fault": ("fault", REQUIRED), "source": ("str", ""), "within_s": ("float>0", 10.0)},
        _readings_resume),
    "event-seen": CheckSpec(
        "the runner recorded an event with this code (e.g. agent-restarted)",
        {"code": ("str", REQUIRED), "min_count": ("int>=0", 1), "where": ("str", "")},
        _event_seen),
    "v2g-paid": CheckSpec(
        "the station paid the vehicle for the energy fed back, at the signed export price",
        {"tolerance": ("int>=0", 0), "min_export_wh": ("int>=0", 1)}, _v2g_paid),
    "energy-range": CheckSpec(
        "the metered energy lies in [min_wh, max_wh]",
        {"min_wh": ("int>=0", 0), "max_wh": ("int>=0", REQUIRED)}, _energy_range),
}
CLOSE_KINDS = ("any", "cooperative", "unilateral", "challenged")
SCALED_PARAMS = ("grace_s", "within_s")   # check parameters that are times (Scenario.scaled)


@dataclass(frozen=True, slots=True)
class Expectation:
    name: str
    check: str
    params: Mapping[str, ParamValue]


# --- scenario -------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    description: str
    duration_s: float
    seed: int
    profile: Profile
    faults: tuple[Fault, ...]
    expectations: tuple[Expectation, ...]
    path: str = ""

    def active_faults(self, t_s: float) -> tuple[Fault, ...]:
        """Faults in force at ``t_s`` seconds after the start (the runner's timeline)."""
        return tuple(f for f in self.faults if f.start_s <= t_s < f.end_s)

    def fault_windows(self, started_ns: int) -> tuple[FaultWindow, ...]:
        return tuple(f.window(started_ns) for f in self.faults)

    def evaluate(self, record: SessionRecord) -> tuple[ExpectationResult, ...]:
        """One result per expectation, in file order. Never raises for a bad record."""
        results = []
        for expectation in self.expectations:
            spec = CHECKS[expectation.check]
            passed, detail = spec.run(record, expectation.params, self)
            results.append(ExpectationResult(expectation.name, expectation.check, passed, detail))
        return tuple(results)

    def scaled(self, time_scale: float) -> Scenario:
        """This scenario on the wall clock of a run ``time_scale`` times faster than
        simulated time: every time on the timeline (duration, profile, fault start and
        length) and every time a check allows (``grace_s``, ``within_s``) is divided by
        ``time_scale``; powers, energies and counts are unchanged. The runner judges a
        scaled run's record (wall-clock timestamps) with the scaled scenario."""
        if time_scale <= 0:
            raise ValueError("time_scale must be > 0")
        k = time_scale
        p = self.profile
        profile = Profile(p.kind, p.step_s / k, tuple((t / k, v) for t, v in p.power_w),
                          tuple((t / k, v) for t, v in p.speed_kmh), p.export_price_per_kwh)
        faults = tuple(dataclasses.replace(f, start_s=f.start_s / k,
                                           duration_s=f.duration_s / k) for f in self.faults)
        expectations = tuple(dataclasses.replace(e, params={
            key: value / k if key in SCALED_PARAMS else value
            for key, value in e.params.items()}) for e in self.expectations)
        return dataclasses.replace(self, duration_s=self.duration_s / k, profile=profile,
                                   faults=faults, expectations=expectations)

    def judge(self, record: SessionRecord) -> SessionRecord:
        """The runner's last step: the record with this scenario's name, its fault windows
        (unless the runner recorded the real ones) and one result per expectation."""
        named = dataclasses.replace(record, scenario=self.name,
                                    faults=record.faults or self.fault_windows(record.started_ns))
        return named.with_expectations(self.evaluate(named))


def reference_markdown() -> str:
    """The fault kinds and checks as markdown, generated from FAULTS and CHECKS (the doc
    docs/hil-scenarios.md embeds it; a test keeps the two in step)."""
    lines = ["| Fault `kind` | Targets (default) | Parameters | What the rig does |",
             "|---|---|---|---|"]
    for kind, fault in FAULTS.items():
        targets = ", ".join(fault.targets) or "a source id"
        lines.append(f"| `{kind}` | {targets} (`{fault.default_target}`) | "
                     f"{_params_markdown(fault.params)} | {fault.doc} |")
    lines += ["", "| Expectation `check` | Parameters | Passes when |", "|---|---|---|"]
    for name, check in CHECKS.items():
        lines.append(f"| `{name}` | {_params_markdown(check.params)} | {check.doc} |")
    return "\n".join(lines) + "\n"


_KIND_TEXT = {"int>=0": "integer >= 0", "int>=1": "integer >= 1", "float>=0": "number >= 0",
              "float>0": "number > 0", "bool": "true/false", "str": "string",
              "close": " / ".join(CLOSE_KINDS), "fault": "a fault kind of this scenario"}


def _params_markdown(params: ParamSpec) -> str:
    def default_text(value: object) -> str:
        if value is REQUIRED:
            return "required"
        shown = str(value).lower() if isinstance(value, bool) else json.dumps(value)
        return f"default `{shown}`"

    return ", ".join(f"`{key}` ({_KIND_TEXT[kind]}; {default_text(default)})"
                     for key, (kind, default) in params.items()) or "-"


def load_scenario(path: str | Path) -> Scenario:
    """Read and validate one scenario file (ConfigError naming file and key)."""
    return parse_scenario(load_toml(path), default_name=Path(path).stem)


def builtin_scenarios() -> list[Path]:
    return sorted(SCENARIO_DIR.glob("*.toml"))


def parse_scenario(top: Table, default_name: str = "scenario") -> Scenario:
    head = top.table("scenario", required=True)
    name = head.str("name", default_name)
    description = head.str("description", "")
    duration_s = head.float("duration_s", min=1.0, max=86_400.0)
    seed = head.int("seed", 0, min=0)
    head.reject_unknown()
    profile = _parse_profile(top.table("profile", required=True), duration_s)
    faults = tuple(_parse_fault(t, duration_s) for t in top.tables("faults"))
    _reject_overlaps(top, faults)
    expectations = tuple(_parse_expectation(t, faults) for t in top.tables("expect"))
    if not expectations:
        raise top.error("expect", "at least one [[expect]] table", "none")
    top.reject_unknown()
    return Scenario(name, description, duration_s, seed, profile, faults, expectations,
                    top.where)


def _parse_points(table: Table, key: str, duration_s: float, low: float, high: float,
                  ) -> tuple[tuple[float, float], ...]:
    points = []
    for index, item in enumerate(table.list(key)):
        if (not isinstance(item, list) or len(item) != 2
                or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in item)):
            raise table.error(f"{key}[{index}]", "a [t_s, value] pair of numbers", item)
        t, v = float(item[0]), float(item[1])
        if not 0 <= t <= duration_s or (points and t <= points[-1][0]):
            raise table.error(f"{key}[{index}]", f"t_s increasing within [0, {duration_s:g}]", t)
        if not low <= v <= high:
            raise table.error(f"{key}[{index}]", f"a value in [{low:g}, {high:g}]", v)
        points.append((t, v))
    if not points:
        raise table.error(key, "at least one [t_s, value] point", "an empty array")
    return tuple(points)


def _parse_profile(table: Table, duration_s: float) -> Profile:
    kind = table.str("kind", choices=("charging", "driving"))
    step_s = table.float("step_s", 1.0, min=0.01, max=60.0)
    # 350 kW: the largest DC chargers; V2G export down to -350 kW.
    power = _parse_points(table, "power_w", duration_s, -350_000, 350_000)
    speed = _parse_points(table, "speed_kmh", duration_s, 0, 300) if "speed_kmh" in table.data \
        else ()
    if speed and kind != "driving":
        raise table.error("speed_kmh", "no speed profile for kind = \"charging\"", "a profile")
    export_price = table.int("export_price_per_kwh", 0, min=0, max=(1 << 63) - 1)
    if export_price and kind != "charging":
        raise table.error("export_price_per_kwh", "a price only for kind = \"charging\"",
                          export_price)
    table.reject_unknown()
    return Profile(kind, step_s, power, speed, export_price)


def _parse_params(table: Table, spec: ParamSpec, faults: Sequence[Fault] = ()) -> dict[str, ParamValue]:
    values: dict[str, ParamValue] = {}
    for key, (kind, default) in spec.items():
        required = default is REQUIRED
        if not required and key not in table.data:
            values[key] = default  # type: ignore[assignment]
            continue
        if kind.startswith("int"):
            values[key] = table.int(key, min=1 if kind == "int>=1" else 0)
        elif kind.startswith("float"):
            value = table.float(key, min=0.0)
            if kind == "float>0" and value == 0:
                raise table.error(key, "a number > 0", value)
            values[key] = value
        elif kind == "bool":
            values[key] = table.bool(key)
        elif kind == "close":
            values[key] = table.str(key, choices=CLOSE_KINDS)
        elif kind == "fault":
            kinds = tuple(sorted({f.kind for f in faults}))
            if not kinds:
                raise table.error(key, "a fault kind that this scenario injects ([[faults]])",
                                  table.data.get(key))
            values[key] = table.str(key, choices=kinds)
        else:
            values[key] = table.str(key)
    table.reject_unknown()
    return values


def _parse_fault(table: Table, duration_s: float) -> Fault:
    kind = table.str("kind", choices=tuple(FAULTS))
    spec = FAULTS[kind]
    start_s = table.float("start_s", min=0.0)
    length_s = table.float("duration_s", min=0.0)
    if length_s <= 0:
        raise table.error("duration_s", "a number > 0", length_s)
    if start_s + length_s > duration_s:
        raise table.error("duration_s", f"a fault that ends by the scenario's end "
                          f"({duration_s:g} s)", start_s + length_s)
    target = table.str("target", spec.default_target, choices=spec.targets)
    if not target:
        raise table.error("target", "a source id", target)
    params = _parse_params(table, spec.params)
    return Fault(kind, start_s, length_s, target, params)


def _reject_overlaps(top: Table, faults: Sequence[Fault]) -> None:
    by_target: dict[tuple[str, str], list[Fault]] = {}
    for fault in faults:
        by_target.setdefault((fault.kind, fault.target), []).append(fault)
    for (kind, target), group in by_target.items():
        group.sort(key=lambda f: f.start_s)
        for a, b in zip(group, group[1:], strict=False):
            if b.start_s < a.end_s:
                raise top.error("faults", f"{kind} windows on {target} that do not overlap",
                                f"[{a.start_s:g}, {a.end_s:g}) and [{b.start_s:g}, {b.end_s:g})")


def _parse_expectation(table: Table, faults: Sequence[Fault]) -> Expectation:
    check = table.str("check", choices=tuple(CHECKS))
    name = table.str("name", check)
    params = _parse_params(table, CHECKS[check].params, faults)
    return Expectation(name, check, params)
