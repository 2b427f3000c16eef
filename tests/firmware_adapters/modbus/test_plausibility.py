"""Plausibility rules, with time passed explicitly (no clocks, no sleeps)."""

from __future__ import annotations

from fractions import Fraction

import pytest

from firmware_adapters.modbus.plausibility import IMPLAUSIBLE, PlausibilityChecker

S = 1_000_000_000  # ns


def snap(import_wh: int, power_w: int, export_wh: int = 0) -> dict[str, int]:
    return {"1-0:1.8.0": import_wh, "1-0:2.8.0": export_wh, "1-0:16.7.0": power_w}


def checker(**kw) -> PlausibilityChecker:
    return PlausibilityChecker(rated_power_w=22_000, **kw)


def test_consistent_charging_is_clean() -> None:
    c = checker()
    # 11 kW for 36 s = 110 Wh per step.
    for i in range(5):
        verdict = c.check(snap(1_000_000 + 110 * i, 11_000), i * 36 * S)
        assert verdict.findings == () and verdict.flags == {}


def test_decreasing_energy_is_flagged_once_and_keeps_the_baseline() -> None:
    c = checker()
    c.check(snap(5_000, 0), 0)
    bad = c.check(snap(4_000, 0), 1 * S)
    assert [f.code for f in bad.findings] == ["meter-energy-decreased"]
    assert bad.flags_for("1-0:1.8.0") == (IMPLAUSIBLE,)
    assert bad.flags_for("1-0:16.7.0") == ()
    # Back at the old level: no second finding; the glitch did not move the baseline.
    assert c.check(snap(5_000, 0), 2 * S).findings == ()


def test_export_counter_decreasing_is_flagged() -> None:
    c = checker()
    c.check(snap(5_000, -3_000, export_wh=900), 0)
    bad = c.check(snap(5_000, -3_000, export_wh=800), S)
    assert [f.code for f in bad.findings] == ["meter-energy-decreased"]
    assert dict(bad.findings[0].details)["name"] == "1-0:2.8.0"


@pytest.mark.parametrize("power", [24_201, -30_000])
def test_power_outside_rating_is_flagged(power) -> None:
    verdict = checker().check(snap(0, power), 0)
    assert [f.code for f in verdict.findings] == ["meter-power-out-of-range"]
    assert verdict.flags_for("1-0:16.7.0") == (IMPLAUSIBLE,)


def test_power_at_rating_plus_margin_is_fine() -> None:
    assert checker().check(snap(0, 24_200), 0).findings == ()


def test_energy_jump_without_power_is_flagged() -> None:
    c = checker()
    c.check(snap(1_000, 0), 0)
    verdict = c.check(snap(2_000, 0), 10 * S)  # 1 kWh in 10 s at 0 W
    assert [f.code for f in verdict.findings] == ["meter-energy-step-inconsistent"]
    assert verdict.flags_for("1-0:1.8.0") == (IMPLAUSIBLE,)
    assert verdict.flags_for("1-0:16.7.0") == (IMPLAUSIBLE,)


def test_frozen_counter_under_load_is_flagged() -> None:
    c = checker()
    c.check(snap(1_000, 11_000), 0)
    verdict = c.check(snap(1_000, 11_000), 60 * S)  # 183 Wh expected
    assert [f.code for f in verdict.findings] == ["meter-energy-step-inconsistent"]


def test_step_uses_the_export_part_for_the_export_counter() -> None:
    c = checker()
    c.check(snap(1_000, -7_200, export_wh=0), 0)
    assert c.check(snap(1_000, -7_200, export_wh=120), 60 * S).findings == ()


def test_power_change_between_snapshots_is_within_bounds() -> None:
    c = checker()
    c.check(snap(0, 0), 0)
    # Power went 0 -> 7.2 kW at some instant in the 60 s: anything in 0..120 Wh is fine.
    assert c.check(snap(60, 7_200), 60 * S).findings == ()


def test_coarse_counter_resolution_is_tolerated() -> None:
    c = checker(energy_resolution_wh=Fraction(100))  # EM340: 0.1 kWh steps
    c.check(snap(10_000, 3_600), 0)
    assert c.check(snap(10_000, 3_600), 10 * S).findings == ()   # 10 Wh due, 0 shown
    assert c.check(snap(10_100, 3_600), 20 * S).findings == ()


def test_no_step_check_after_a_long_gap() -> None:
    c = checker(max_step_s=60)
    c.check(snap(0, 0), 0)
    assert c.check(snap(50_000, 0), 3600 * S).findings == ()


def test_bad_parameters() -> None:
    with pytest.raises(ValueError):
        PlausibilityChecker(rated_power_w=0)


# ---------------------------------------------------------------- issue 16: the window


def run_window(c: PlausibilityChecker, energy, power, steps: int, start: int = 0,
               base: int = 1_000_000):
    """One snapshot a second; ``energy(i)`` Wh above ``base``, ``power(i)`` W."""
    return [c.check(snap(base + energy(i), power(i)), (start + i) * S) for i in range(steps)]


def float_meter(**kw) -> PlausibilityChecker:
    # an SDM630-like float32 counter: per-step tolerance 2 x 15.6 Wh hides a 1 s step
    return checker(energy_resolution_wh=Fraction(1000, 64), window_s=600, **kw)


def test_a_counter_creeping_at_zero_watts_is_drift_with_one_event() -> None:
    verdicts = run_window(float_meter(), lambda i: i // 5, lambda i: 0, 1200)  # 12 Wh/min
    assert all(f.code != "meter-energy-step-inconsistent"
               for v in verdicts for f in v.findings)  # each step looks fine
    drift = [f for v in verdicts for f in v.findings if f.code == "meter-energy-drift"]
    assert drift and sum(f.announce for f in drift) == 1
    assert verdicts[-1].flags_for("1-0:1.8.0") == (IMPLAUSIBLE,)


def test_a_counter_stuck_at_22_kw_is_flagged() -> None:
    verdicts = run_window(float_meter(), lambda i: 0, lambda i: 22_000, 700)
    codes = {f.code for v in verdicts for f in v.findings}
    assert "meter-counter-stuck" in codes
    assert "meter-energy-step-inconsistent" not in codes


def test_consistent_charging_over_the_window_is_clean() -> None:
    # 11 kW: 11000/3600 Wh per second, the counter quantised to 15.625 Wh steps
    verdicts = run_window(float_meter(), lambda i: int(i * 11_000 / 3600 // 15.625 * 15.625),
                          lambda i: 11_000, 1500)
    assert [f.code for v in verdicts for f in v.findings] == []


def test_the_window_survives_a_restart() -> None:
    first = float_meter()
    run_window(first, lambda i: i // 5, lambda i: 0, 200)
    stored = first.export_window(199 * S)
    second = float_meter()  # after a 10 s restart, on a new monotonic clock origin
    second.restore_window(stored, 5_000 * S, elapsed_ns=10 * S)
    verdicts = run_window(second, lambda i: (i + 210) // 5, lambda i: 0, 200, start=5_000)
    assert any(f.code == "meter-energy-drift" for v in verdicts for f in v.findings)
    fresh = float_meter()  # without the stored window, the same 200 s say nothing yet
    assert not any(f.code == "meter-energy-drift" for v in run_window(
        fresh, lambda i: (i + 210) // 5, lambda i: 0, 200, start=5_000) for f in v.findings)


def test_out_of_range_values_are_flagged_and_kept_out_of_the_other_rules() -> None:
    c = checker(ranges={"1-0:32.7.0": (0, 300_000), "1-0:1.8.0": (0, 10**12)})
    c.check({**snap(1_000, 0), "1-0:32.7.0": 230_000}, 0)
    verdict = c.check({**snap(10**30, 0), "1-0:32.7.0": 230_000}, S)
    assert [f.code for f in verdict.findings] == ["meter-value-out-of-range"]
    assert verdict.flags_for("1-0:1.8.0") == (IMPLAUSIBLE,)
    assert c.check(snap(1_000, 0), 2 * S).findings == ()  # the glitch moved no baseline
