"""Scenario files: the loader's errors, the profile maths, and every check judged on records
that satisfy it and on records that break it (a check that cannot fail is not a check)."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.errors import ConfigError
from agent.options import Table
from hil.report import (
    Receipt,
    RecordedReading,
    Sample,
    SessionEvent,
    SessionRecord,
    VerificationSummary,
)
from hil.scenarios.scenario import (
    CHECKS,
    FAULTS,
    SCENARIO_DIR,
    Scenario,
    builtin_scenarios,
    load_scenario,
    parse_scenario,
    reference_markdown,
)

S = 10**9
T0 = 1_763_700_000 * S
PRICE = 300_000             # 0.30 per kWh at 6 decimals


def good_record(sc: Scenario) -> SessionRecord:
    """What a well-behaved rig would record for ``sc``: 1 Hz readings from every source
    named in the scenario except inside outage windows, the events the checks ask for, a
    consistent receipt and a clean verification."""
    sources = {"meter0", "ecu0"} | {f.target for f in sc.faults}
    sources |= {str(e.params["source"]) for e in sc.expectations if e.params.get("source")}
    silent = [f for f in sc.faults if f.kind in ("meter-timeout", "ignition-off", "agent-crash")]
    readings = tuple(
        RecordedReading(T0 + t * S, "dev", source, "1-0:1.8.0", float(t))
        for t in range(int(sc.duration_s)) for source in sorted(sources)
        if not any(f.start_s <= t < f.end_s for f in silent))
    energy = int(sc.profile.energy_wh(sc.duration_s))
    export = 0
    if any(p < 0 for _, p in sc.profile.power_w):   # V2G: import and export apart
        steps = [sc.profile.power_at(t / 10) for t in range(int(sc.duration_s * 10))]
        energy = int(sum(p for p in steps if p > 0) / 36_000)
        export = int(sum(-p for p in steps if p < 0) / 36_000)
    export_price = sc.profile.export_price_per_kwh
    samples = tuple(Sample(T0 + t * S, sc.profile.power_at(t), int(sc.profile.energy_wh(t)),
                           int(sc.profile.energy_wh(t)) * PRICE // 1000)
                    for t in range(int(sc.duration_s)))
    closes = [e.params["close"] for e in sc.expectations
              if e.check == "channel-settled" and e.params["close"] != "any"]
    receipt = Receipt("ab" * 32, "ev-1", "cs-1", energy_wh=energy, paid_wh=energy,
                      price_per_kwh=PRICE, payments=40, paid=energy * PRICE // 1000,
                      decimals=6, latest_nonce=40, settled_nonce=40,
                      close=str(closes[0]) if closes else "cooperative", settled=True,
                      settlement_tx="0x" + "01" * 32, export_wh=export,
                      export_price_per_kwh=export_price, refunded=export * export_price // 1000)
    events = tuple(SessionEvent(T0 + S, str(e.params["where"]) or "rig", str(e.params["code"]))
                   for e in sc.expectations if e.check == "event-seen"
                   for _ in range(int(e.params["min_count"])))
    return SessionRecord(sc.name, T0, T0 + int(sc.duration_s * S), samples, readings, receipt,
                         VerificationSummary(ok=True, envelopes=100, readings=1000), sc.fault_windows(T0),
                         events, scenario=sc.name)


def results_by_check(sc: Scenario, record: SessionRecord) -> dict[str, list[bool]]:
    out: dict[str, list[bool]] = {}
    for result in sc.evaluate(record):
        out.setdefault(result.check, []).append(result.passed)
    return out


# --- the built-in scenarios ------------------------------------------------------------------

def test_one_scenario_per_fault_plus_a_happy_path() -> None:
    scenarios = [load_scenario(path) for path in builtin_scenarios()]
    names = {sc.name for sc in scenarios}
    assert {"happy-path"} | set(FAULTS) <= names
    for kind in FAULTS:
        (sc,) = [s for s in scenarios if s.name == kind]
        assert [f.kind for f in sc.faults] == [kind]
    assert not [s for s in scenarios if s.name == "happy-path"][0].faults


@pytest.mark.parametrize("path", builtin_scenarios(), ids=lambda p: p.stem)
def test_builtin_scenario_passes_on_a_good_record(path: Path) -> None:
    sc = load_scenario(path)
    results = sc.evaluate(good_record(sc))
    assert len(results) == len(sc.expectations) >= 3
    assert all(r.passed for r in results), [r for r in results if not r.passed]
    record = good_record(sc).with_expectations(results)
    assert record.passed is True


@pytest.mark.parametrize("path", builtin_scenarios(), ids=lambda p: p.stem)
def test_builtin_scenario_fails_on_an_empty_record(path: Path) -> None:
    sc = load_scenario(path)
    results = sc.evaluate(SessionRecord("nothing happened", T0, T0 + 10 * S))
    assert not any(r.passed for r in results), [r for r in results if r.passed]
    assert all(r.detail for r in results)


# --- each check can fail ---------------------------------------------------------------------

def test_invented_reading_during_meter_outage_fails() -> None:
    sc = load_scenario(SCENARIO_DIR / "meter-timeout.toml")
    good = good_record(sc)
    fault = sc.faults[0]
    invented = RecordedReading(T0 + int((fault.start_s + 3) * S), "cs", "meter0", "1-0:1.8.0", 1)
    bad = dataclasses.replace(good, readings=good.readings + (invented,))
    (result,) = [r for r in sc.evaluate(bad) if r.check == "no-readings-during-fault"]
    assert not result.passed and "1 inside 1 meter-timeout window" in result.detail
    assert "+53.0 s" in result.detail
    # within the grace period after the fault starts: a reading already being taken is fine
    edge = RecordedReading(T0 + int((fault.start_s + 0.2) * S), "cs", "meter0", "1-0:1.8.0", 1)
    ok = dataclasses.replace(good, readings=good.readings + (edge,))
    assert all(results_by_check(sc, ok)["no-readings-during-fault"])


def test_readings_that_never_resume_fail() -> None:
    sc = load_scenario(SCENARIO_DIR / "ignition-off.toml")
    good = good_record(sc)
    end_ns = T0 + int(sc.faults[0].end_s * S)
    stopped = dataclasses.replace(good, readings=tuple(
        r for r in good.readings if r.source != "ecu0" or r.ts_ns < end_ns))
    checks = results_by_check(sc, stopped)
    assert checks["readings-resume"] == [False]
    assert checks["no-readings-during-fault"] == [True]


def test_no_readings_at_all_is_not_a_pass() -> None:
    sc = load_scenario(SCENARIO_DIR / "meter-timeout.toml")
    silent = dataclasses.replace(good_record(sc), readings=())
    (result,) = [r for r in sc.evaluate(silent) if r.check == "no-readings-during-fault"]
    assert not result.passed and "nothing to judge" in result.detail


@pytest.mark.parametrize("change, check", [
    (dict(paid_wh=400), "energy-paid"),
    (dict(energy_wh=0, paid_wh=0, paid=0), "energy-paid"),
    (dict(paid=1), "amount-matches-tariff"),
    (dict(energy_wh=100, paid_wh=100, paid=30_000), "energy-range"),
    (dict(settled=False), "channel-settled"),
    (dict(close="unilateral"), "channel-settled"),
    (dict(settled_nonce=37), "channel-settled"),
])
def test_receipt_checks_fail(change: dict[str, object], check: str) -> None:
    sc = load_scenario(SCENARIO_DIR / "happy-path.toml")
    good = good_record(sc)
    assert all(results_by_check(sc, good)[check])
    bad = dataclasses.replace(good, receipt=dataclasses.replace(good.receipt, **change))
    assert results_by_check(sc, bad)[check] == [False]


@pytest.mark.parametrize("change", [dict(gaps=1), dict(broken_links=1), dict(reorders=2),
                                    dict(failures={"bad-signature": 1}), dict(envelopes=3),
                                    dict(ok=False), dict(dropped_declared=4)])
def test_verification_problems_fail(change: dict[str, object]) -> None:
    sc = load_scenario(SCENARIO_DIR / "broker-outage.toml")
    good = good_record(sc)
    bad = dataclasses.replace(good, verification=dataclasses.replace(good.verification, **change))
    assert results_by_check(sc, bad)["envelopes-verify"] == [False]


def test_declared_drops_allowed_when_the_scenario_says_so() -> None:
    sc = load_scenario(SCENARIO_DIR / "meter-timeout.toml")    # allow_declared_drops = true
    good = good_record(sc)
    dropped = dataclasses.replace(good, verification=dataclasses.replace(
        good.verification, dropped_declared=4))
    assert results_by_check(sc, dropped)["envelopes-verify"] == [True]


def test_missing_event_fails() -> None:
    sc = load_scenario(SCENARIO_DIR / "broker-outage.toml")
    good = good_record(sc)
    one_left = dataclasses.replace(good, events=good.events[:1])     # wants 2 reconnects
    (result,) = [r for r in sc.evaluate(one_left) if r.check == "event-seen"]
    assert not result.passed and result.detail == (
        "1 'uplink-reconnected' event(s), want >= 2")


def test_stale_state_close_must_settle_at_the_latest_state() -> None:
    sc = load_scenario(SCENARIO_DIR / "stale-state-close.toml")
    good = good_record(sc)
    assert sc.faults[0].params == {"nonces_back": 3}
    cheated = dataclasses.replace(good, receipt=dataclasses.replace(
        good.receipt, close="unilateral", settled_nonce=37))
    (result,) = [r for r in sc.evaluate(cheated) if r.check == "channel-settled"]
    assert not result.passed
    assert "closed unilateral, want challenged" in result.detail
    assert "settled at nonce 37, latest co-signed 40" in result.detail


# --- profile and timeline --------------------------------------------------------------------

def test_profile_interpolates_and_integrates_exactly() -> None:
    sc = load_scenario(SCENARIO_DIR / "happy-path.toml")
    profile = sc.profile
    assert profile.power_at(0) == 0 and profile.power_at(2.5) == 5500
    assert profile.power_at(100) == 11_000 and profile.power_at(149) == 0
    # ramp 5 s to 11 kW, 130 s flat, ramp 5 s down: (27.5 + 1430 + 27.5) kJ... in kWs -> Wh
    assert profile.energy_wh(150) == pytest.approx(1485_000 / 3600)
    assert profile.energy_wh(5) == pytest.approx(27_500 / 3600)
    assert profile.energy_wh(0) == 0


def test_active_faults_timeline() -> None:
    sc = load_scenario(SCENARIO_DIR / "broker-outage.toml")
    assert sc.active_faults(39.9) == ()
    assert [f.kind for f in sc.active_faults(40)] == ["broker-outage"]
    assert sc.active_faults(60) == ()
    (window,) = sc.fault_windows(T0)
    assert (window.start_ns, window.end_ns, window.target) == (T0 + 40 * S, T0 + 60 * S, "broker")


def test_every_check_and_fault_is_documented() -> None:
    assert all(spec.doc for spec in CHECKS.values()) and all(f.doc for f in FAULTS.values())


# --- loader errors ---------------------------------------------------------------------------

BASE = {
    "scenario": {"duration_s": 100},
    "profile": {"kind": "charging", "power_w": [[0, 0], [10, 7000]]},
    "faults": [{"kind": "broker-outage", "start_s": 10, "duration_s": 5}],
    "expect": [{"check": "envelopes-verify"}],
}


def with_change(path: tuple[object, ...], value: object) -> dict[str, object]:
    data = copy.deepcopy(BASE)
    node: object = data
    for key in path[:-1]:
        node = node[key]  # type: ignore[index]
    if value is KeyError:
        del node[path[-1]]  # type: ignore[union-attr]
    elif isinstance(node, list) and path[-1] == len(node):
        node.append(value)
    else:
        node[path[-1]] = value  # type: ignore[index]
    return data


@pytest.mark.parametrize("path, value, message", [
    (("scenario",), KeyError, "x.toml: scenario: expected a value"),
    (("scenario", "duration_s"), -1, "scenario.duration_s: expected a number in [1.0, 86400.0]"),
    (("scenario", "durations"), 5, "scenario.durations: expected one of description, duration_s"),
    (("profile", "kind"), "flying", "profile.kind: expected one of charging, driving"),
    (("profile", "power_w"), [[0, 0], [0, 5]], "profile.power_w[1]: expected t_s increasing"),
    (("profile", "power_w"), [[0, 0], [200, 5]], "profile.power_w[1]: expected t_s increasing"),
    (("profile", "power_w"), [[0, "x"]], "profile.power_w[0]: expected a [t_s, value] pair"),
    (("profile", "power_w"), [[0, 1e9]], "profile.power_w[0]: expected a value in"),
    (("profile", "power_w"), [], "profile.power_w: expected at least one"),
    (("profile", "speed_kmh"), [[0, 5]], "profile.speed_kmh: expected no speed profile"),
    (("faults", 0, "kind"), "meteor", "faults[0].kind: expected one of broker-outage"),
    (("faults", 0, "duration_s"), 95, "faults[0].duration_s: expected a fault that ends by"),
    (("faults", 0, "duration_s"), 0, "faults[0].duration_s: expected a number > 0"),
    (("faults", 0, "target"), "vehicle", "faults[0].target: expected one of broker"),
    (("faults", 0, "nonces_back"), 2, "faults[0].nonces_back: expected one of"),
    (("faults", 1), {"kind": "broker-outage", "start_s": 12, "duration_s": 5},
     "faults: expected broker-outage windows on broker that do not overlap"),
    (("expect",), [], "expect: expected at least one [[expect]] table"),
    (("expect", 0, "check"), "vibes", "expect[0].check: expected one of envelopes-verify"),
    (("expect", 0, "min_envelopes"), -1, "expect[0].min_envelopes: expected an integer >= 0"),
    (("expect", 0, "min_envelope"), 1, "expect[0].min_envelope: expected one of"),
    (("expect", 1), {"check": "no-readings-during-fault", "fault": "meter-timeout"},
     "expect[1].fault: expected one of broker-outage"),
    (("expect", 1), {"check": "readings-resume"}, "expect[1].fault: expected a value"),
    (("expect", 1), {"check": "channel-settled", "close": "politely"},
     "expect[1].close: expected one of any, cooperative"),
    (("expect", 1), {"check": "readings-resume", "fault": "broker-outage", "within_s": 0},
     "expect[1].within_s: expected a number > 0"),
])
def test_loader_errors_name_file_and_key(path: tuple[object, ...], value: object,
                                         message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_scenario(Table(with_change(path, value), "x.toml"))
    assert message in str(info.value)


def test_expectation_on_a_fault_the_scenario_lacks() -> None:
    data = with_change(("faults",), [])
    data["expect"] = [{"check": "readings-resume", "fault": "broker-outage"}]
    with pytest.raises(ConfigError, match="expect\\[0\\].fault: expected a fault kind that"):
        parse_scenario(Table(data, "x.toml"))


def test_missing_or_broken_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such config file"):
        load_scenario(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[scenario\nduration_s = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_scenario(bad)
    good = tmp_path / "mine.toml"
    good.write_text('[scenario]\nduration_s = 10\n[profile]\nkind = "driving"\n'
                    'power_w = [[0, 1]]\n[[expect]]\ncheck = "energy-range"\nmax_wh = 5\n')
    sc = load_scenario(good)
    assert sc.name == "mine" and sc.expectations[0].name == "energy-range"


toml_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False)
    | st.text(max_size=12) | st.sampled_from(["charging", "driving", "broker-outage",
                                               "envelopes-verify", "meter-timeout"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["kind", "check", "fault", "start_s", "duration_s", "power_w", "x",
                         "target", "name"]), inner, max_size=5),
    max_leaves=25)


@settings(max_examples=300, deadline=None)
@given(st.fixed_dictionaries({}, optional={
    "scenario": st.dictionaries(st.sampled_from(["duration_s", "name", "seed"]), toml_values)
    | toml_values,
    "profile": st.dictionaries(st.sampled_from(["kind", "power_w", "step_s", "speed_kmh"]),
                               toml_values) | toml_values,
    "faults": st.lists(toml_values, max_size=3) | toml_values,
    "expect": st.lists(toml_values, max_size=3) | toml_values,
}))
def test_hostile_tables_raise_only_config_error(data: dict[str, object]) -> None:
    try:
        parse_scenario(Table(data, "fuzz.toml"))
    except ConfigError:
        pass


def test_judge_names_the_record_and_adds_one_result_per_expectation() -> None:
    sc = load_scenario(SCENARIO_DIR / "agent-crash.toml")
    raw = dataclasses.replace(good_record(sc), scenario="", faults=())
    judged = sc.judge(raw)
    assert judged.scenario == "agent-crash" and judged.faults == sc.fault_windows(T0)
    assert len(judged.expectations) == len(sc.expectations) and judged.passed is True
    broken = sc.judge(dataclasses.replace(raw, events=()))
    assert broken.passed is False
    assert [r.check for r in broken.expectations if not r.passed] == ["event-seen"]


def test_reference_doc_is_generated_from_the_tables() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "hil-scenarios.md").read_text()
    assert reference_markdown() in doc
    for kind in FAULTS:
        assert f"| `{kind}` |" in doc
    for check in CHECKS:
        assert f"| `{check}` |" in doc


def test_v2g_paid_fails_when_the_station_does_not_pay_the_car() -> None:
    sc = load_scenario(SCENARIO_DIR / "v2g-export.toml")
    good = good_record(sc)
    assert results_by_check(sc, good)["v2g-paid"] == [True]
    assert good.receipt is not None and good.receipt.refunded > 0
    for receipt in (dataclasses.replace(good.receipt, refunded=0),
                    dataclasses.replace(good.receipt, refunded=good.receipt.refunded - 1),
                    dataclasses.replace(good.receipt, export_wh=0, refunded=0)):
        bad = dataclasses.replace(good, receipt=receipt)
        assert results_by_check(sc, bad)["v2g-paid"] == [False], receipt
