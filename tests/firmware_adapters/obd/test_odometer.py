"""Odometer integrity: decreases and jumps that speed x time cannot explain."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from firmware_adapters.obd.odometer import NS_PER_HOUR, OdometerMonitor

S = 1_000_000_000


def test_plausible_driving_is_silent() -> None:
    m = OdometerMonitor("car")
    m.speed(100.0)
    assert m.odometer(1000.0, 0, 0) is None
    m.speed(100.0)
    assert m.odometer(1000.0 + 100 / 3600 * 36, 36 * S, 1) is None  # 36 s at 100 km/h = 1 km


def test_decrease_is_an_event_with_details() -> None:
    m = OdometerMonitor("car")
    m.odometer(1000.0, 0, 0)
    event = m.odometer(990.0, S, 42)
    assert event is not None and event.code == "odometer-decreased"
    assert dict(event.details) == {"from_m": 1_000_000, "to_m": 990_000}
    assert event.ts_ns == 42 and event.source == "car"
    assert m.odometer(990.1, 2 * S, 43) is None  # carries on from the new value


def test_one_resolution_step_back_is_tolerated() -> None:
    m = OdometerMonitor()
    m.odometer(1000.1, 0, 0)
    assert m.odometer(1000.0, S, 0) is None


def test_jump_that_speed_cannot_explain() -> None:
    m = OdometerMonitor()
    m.speed(50.0)
    m.odometer(1000.0, 0, 0)
    m.speed(50.0)
    event = m.odometer(1010.0, 60 * S, 0)  # 10 km in a minute at 50 km/h
    assert event is not None and event.code == "odometer-jump"
    assert dict(event.details)["allowed_m"] == round((50 / 60 + 0.5) * 1000)


def test_distance_gained_while_asleep_is_a_jump() -> None:
    m = OdometerMonitor()
    m.speed(0.0)
    m.odometer(1000.0, 0, 0)
    m.asleep(S)
    m.awake(8 * 3600 * S)  # parked overnight
    m.speed(0.0)
    event = m.odometer(1300.0, 8 * 3600 * S + S, 0)
    assert event is not None and event.code == "odometer-jump"


def test_without_speed_the_bound_is_max_speed() -> None:
    m = OdometerMonitor(max_speed_kmh=200)
    m.odometer(0.0, 0, 0)
    assert m.odometer(199.0, NS_PER_HOUR, 0) is None
    assert m.odometer(500.0, 2 * NS_PER_HOUR, 0) is not None


@given(st.lists(st.tuples(st.floats(0, 250), st.integers(1, 10 * S)), max_size=50))
def test_consistent_traces_never_raise_an_event(steps: list[tuple[float, int]]) -> None:
    m = OdometerMonitor()
    km, now = 5000.0, 0
    m.speed(0.0)
    assert m.odometer(km, now, 0) is None
    for kmh, dt in steps:
        m.speed(kmh)
        now += dt
        km += kmh * dt / NS_PER_HOUR
        assert m.odometer(round(km, 1), now, 0) is None


# ------------------------------------------------------------------ across agent restarts


def test_a_restart_judges_only_a_decrease() -> None:
    m = OdometerMonitor("car")
    m.restore(1000.0)
    event = m.odometer(850.0, 0, 7)  # clocked back while the agent was off
    assert event is not None and event.code == "odometer-decreased"
    assert dict(event.details) == {"from_m": 1_000_000, "to_m": 850_000, "across_restart": 1}
    assert m.last_km == 850.0 and m.odometer(850.1, S, 8) is None  # carries on from there

    driven = OdometerMonitor("car")
    driven.restore(1000.0)
    assert driven.odometer(1400.0, 0, 0) is None  # driven while the agent was off: fine
    assert driven.odometer(999.95, S, 1) is not None  # ... and the usual rules go on

    same = OdometerMonitor("car")
    same.restore(1000.0)
    assert same.odometer(999.95, 0, 0) is None  # within the 0.1 km resolution of PID A6


def test_keeper_saves_by_step_restores_and_survives_a_bad_file(tmp_path) -> None:
    from collections import Counter

    from firmware_adapters.obd.odometer_file import OdometerKeeper

    path = tmp_path / "state" / "sources" / "car.odometer"
    counters: Counter[str] = Counter()
    m = OdometerMonitor("car")
    keeper = OdometerKeeper(m, path, counters)
    assert keeper.restore() is None and not path.exists()
    m.odometer(1000.0, 0, 0)
    keeper.checkpoint()  # the first value is saved at once
    assert path.read_text() == "1000.0\n" and oct(path.stat().st_mode & 0o777) == "0o600"
    m.odometer(1000.5, S * 60, 1)
    keeper.checkpoint()  # less than step_km: not yet (few SD-card writes)
    assert path.read_text() == "1000.0\n"
    keeper.checkpoint(force=True)  # the source stopping
    assert path.read_text() == "1000.5\n"

    again = OdometerMonitor("car")
    assert OdometerKeeper(again, path, counters).restore() == 1000.5
    assert again.odometer(900.0, 0, 0) is not None

    for bad in (b"", b"nan\n", b"-5\n", b"\xff\xfe", b"1" * 100, b"12 km"):
        path.write_bytes(bad)
        fresh = OdometerMonitor("car")
        assert OdometerKeeper(fresh, path, counters).restore() is None
        assert fresh.odometer(1.0, 0, 0) is None  # no baseline: this restart is not judged
    assert counters["odometer-state-unreadable"] == 6


def test_keeper_counts_a_failed_save_and_goes_on(tmp_path) -> None:
    from collections import Counter

    from firmware_adapters.obd.odometer_file import OdometerKeeper

    blocker = tmp_path / "sources"
    blocker.write_text("a file where the directory should be")
    counters: Counter[str] = Counter()
    m = OdometerMonitor("car")
    keeper = OdometerKeeper(m, blocker / "car.odometer", counters)
    m.odometer(10.0, 0, 0)
    keeper.checkpoint()
    assert counters["odometer-state-write-failed"] == 1 and keeper.saved is None
