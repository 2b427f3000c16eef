"""The HIL runner: every built-in scenario runs on the real rig (mosquitto, in-process chain,
Modbus meter and CAN ECU simulators, both agents) and passes its expectations; a run that
cannot meet its expectations, and records tampered after a good run, fail."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest

from agent.errors import ConfigError
from agent.options import Table
from hil.report import FaultWindow, RecordedReading, SessionRecord
from hil.scenarios.rig import stepped
from hil.scenarios.runner import DEFAULT_TIME_SCALE, resolve, run_scenario
from hil.scenarios.scenario import Scenario, builtin_scenarios, load_scenario, parse_scenario

ROOT = Path(__file__).resolve().parents[2]
S = 1_000_000_000
SCENARIOS = {path.stem: path for path in builtin_scenarios()}
_RUNS: dict[str, tuple[Scenario, SessionRecord]] = {}
_OUT: dict[str, Path] = {}


def run(name: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Scenario, SessionRecord]:
    """Each scenario runs once per session (the sabotage tests reuse the records)."""
    if name not in _RUNS:
        scenario = load_scenario(SCENARIOS[name])
        out = _OUT[name] = tmp_path_factory.mktemp(name)
        _RUNS[name] = scenario, run_scenario(scenario, out, time_scale=DEFAULT_TIME_SCALE)
    return _RUNS[name]


def failures(record: SessionRecord) -> str:
    return "\n".join(f"FAIL {r.name}: {r.detail}" for r in record.expectations if not r.passed)


@pytest.mark.timeout(150)
@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_builtin_scenario_passes_its_expectations(name, tmp_path_factory):
    scenario, record = run(name, tmp_path_factory)
    assert len(record.expectations) == len(scenario.expectations)
    assert record.passed, failures(record)
    assert record.scenario == name
    # every fault really happened, and was measured on the wall clock inside the run
    assert sorted(w.kind for w in record.faults) == sorted(f.kind for f in scenario.faults)
    for window in record.faults:
        assert record.started_ns <= window.start_ns < window.end_ns <= record.ended_ns
    if scenario.profile.kind == "charging":
        receipt = record.receipt
        assert receipt is not None and receipt.settled and receipt.energy_wh > 300
        assert receipt.paid == receipt.paid_wh * receipt.price_per_kwh // 1000
    else:
        assert record.receipt is None


def test_the_report_is_written_and_says_pass(tmp_path_factory):
    scenario, record = run("agent-crash", tmp_path_factory)
    out = _OUT["agent-crash"]
    data = json.loads((out / "session.json").read_text())
    assert data["scenario"] == "agent-crash"
    assert all(e["passed"] for e in data["expectations"])
    assert "agent-restarted" in {e["code"] for e in data["events"]}
    assert "<svg" in (out / "session.html").read_text()


def test_a_reading_invented_inside_the_crash_window_fails(tmp_path_factory):
    scenario, record = run("agent-crash", tmp_path_factory)
    window = next(w for w in record.faults if w.kind == "agent-crash")
    middle = (window.start_ns + window.end_ns) // 2
    forged = RecordedReading(middle, "demo-station", "meter0", "1-0:1.8.0", 1.0)
    bad = dataclasses.replace(record, readings=record.readings + (forged,), expectations=())
    judged = scenario.scaled(DEFAULT_TIME_SCALE).judge(bad)
    verdict = {r.check: r.passed for r in judged.expectations}
    assert verdict["no-readings-during-fault"] is False
    assert verdict["event-seen"] is True  # only the tampered part fails


def test_a_record_without_the_reconnects_or_the_settlement_fails(tmp_path_factory):
    scenario, record = run("broker-outage", tmp_path_factory)
    scaled = scenario.scaled(DEFAULT_TIME_SCALE)
    no_events = dataclasses.replace(record, events=(), expectations=())
    assert not scaled.judge(no_events).passed
    unsettled = dataclasses.replace(record, expectations=(), receipt=dataclasses.replace(
        record.receipt, settled_nonce=record.receipt.latest_nonce - 3))
    verdict = {r.check: r.passed for r in scaled.judge(unsettled).expectations}
    assert verdict["channel-settled"] is False


IMPOSSIBLE = """\
[scenario]
name = "impossible"
description = "a short charge judged by expectations it cannot meet"
duration_s = 30

[profile]
kind = "charging"
power_w = [[0, 11000]]

[[expect]]
name = "far more energy than 30 s at 11 kW can give"
check = "energy-range"
min_wh = 5000
max_wh = 6000

[[expect]]
name = "a restart that never happened"
check = "event-seen"
code = "agent-restarted"

[[expect]]
name = "all envelopes verify"
check = "envelopes-verify"
"""


@pytest.mark.timeout(120)
def test_a_run_that_cannot_meet_its_expectations_exits_1(tmp_path):
    path = tmp_path / "impossible.toml"
    path.write_text(IMPOSSIBLE)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "agent.cli", "hil", "run", str(path),
                           "--out", str(out), "--time-scale", "10"],
                          cwd=ROOT, capture_output=True, text=True, timeout=110)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert any(line.startswith("FAIL  far more energy") for line in lines), proc.stdout
    assert any(line.startswith("FAIL  a restart that never") for line in lines), proc.stdout
    assert any(line.startswith("PASS  all envelopes verify") for line in lines), proc.stdout
    assert str(out / "session.html") in proc.stdout
    record = json.loads((out / "session.json").read_text())
    assert [e["passed"] for e in record["expectations"]] == [False, False, True]


@pytest.mark.timeout(90)
def test_a_session_that_does_not_end_in_time_fails_with_a_report(tmp_path):
    scenario = load_scenario(SCENARIOS["happy-path"])
    record = run_scenario(scenario, tmp_path, time_scale=DEFAULT_TIME_SCALE, timeout_s=2.0)
    assert record.passed is False
    assert record.receipt is None
    assert "run-timeout" in {e.code for e in record.events}
    verdict = {r.check: r for r in record.expectations}
    assert not verdict["energy-paid"].passed
    assert "no receipt" in verdict["energy-paid"].detail
    assert verdict["envelopes-verify"].passed  # what did arrive still verifies
    assert json.loads((tmp_path / "session.json").read_text())["receipt"] is None


def test_hil_list_names_every_builtin_scenario():
    proc = subprocess.run([sys.executable, "-m", "agent.cli", "hil", "list"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert {line.split()[0] for line in proc.stdout.splitlines()} == set(SCENARIOS)


def test_resolve_names_and_paths(tmp_path):
    assert resolve("happy-path") == SCENARIOS["happy-path"]
    assert resolve(str(SCENARIOS["happy-path"])) == SCENARIOS["happy-path"]
    with pytest.raises(ConfigError, match="one of: agent-crash"):
        resolve("no-such-scenario")


def test_stepped_profile_keeps_the_energy_of_the_linear_one():
    scenario = load_scenario(SCENARIOS["happy-path"])
    profile = stepped(scenario.profile, scenario.duration_s)
    imported, exported = profile.energy_between(0, scenario.duration_s + 10)
    assert exported == 0
    assert abs(imported - Fraction(scenario.profile.energy_wh(scenario.duration_s))) < 1
    assert profile.power_at(scenario.duration_s + 1) == 0


def test_scaled_scenario_divides_every_time_and_nothing_else():
    scenario = load_scenario(SCENARIOS["meter-timeout"])
    fast = scenario.scaled(10)
    assert fast.duration_s == scenario.duration_s / 10
    assert [(f.start_s, f.duration_s) for f in fast.faults] == [
        (f.start_s / 10, f.duration_s / 10) for f in scenario.faults]
    assert fast.profile.power_w == tuple((t / 10, p) for t, p in scenario.profile.power_w)
    for slow, quick in zip(scenario.expectations, fast.expectations, strict=True):
        for key, value in slow.params.items():
            want = value / 10 if key in ("grace_s", "within_s") else value
            assert quick.params[key] == want, key
    with pytest.raises(ValueError):
        scenario.scaled(0)


def test_measured_windows_win_over_planned_ones():
    scenario = parse_scenario(Table({
        "scenario": {"duration_s": 100},
        "profile": {"kind": "charging", "power_w": [[0, 1000]]},
        "faults": [{"kind": "meter-timeout", "start_s": 10, "duration_s": 10}],
        "expect": [{"check": "no-readings-during-fault", "fault": "meter-timeout"}]},
        "<test>"))
    t0 = 1_000 * S
    reading = RecordedReading(t0 + 15 * S, "cs", "meter0", "1-0:1.8.0", 1.0)  # planned window
    record = SessionRecord("t", t0, t0 + 100 * S, readings=(reading,))
    assert not scenario.judge(record).passed
    measured = dataclasses.replace(record, faults=(
        FaultWindow("meter-timeout", t0 + 30 * S, t0 + 40 * S, "meter0"),))
    assert scenario.judge(measured).passed
