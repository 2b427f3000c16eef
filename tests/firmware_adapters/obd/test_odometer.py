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
