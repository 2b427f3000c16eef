"""ECU simulator: the profile, the sans-I/O core, ``hil-ecu``, and the simulator as its own
process on udp_multicast with an ignition off/on cycle (SIGUSR1 / SIGUSR2)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from firmware_adapters.obd import pids as P
from firmware_adapters.obd.can_driver import ObdCanSource
from firmware_adapters.obd.isotp import Reassembler
from hil.sim.ecu import DrivingProfile, EcuSimCore
from hil.sim.ecu_source import HilEcuSource
from tests.firmware_adapters.obd.peers import FREEZE, collect, events, named


def test_profile_integrates_speed_into_odometer() -> None:
    p = DrivingProfile()
    assert p.state(0).speed_kmh == 0 and p.state(0).odometer_km == p.odometer_start_km
    assert p.state(20).speed_kmh == pytest.approx(50)
    # 0->50 km/h in 20 s then 40 s at 50: 20*25/3600 + 40*50/3600 km
    assert p.state(60).odometer_km - p.odometer_start_km == pytest.approx(2500 / 3600)
    assert p.state(100).charging and not p.state(30).charging
    loop = sum(s.duration_s for s in p.segments)
    one = p.state(loop).odometer_km - p.odometer_start_km
    assert p.state(3 * loop).odometer_km - p.odometer_start_km == pytest.approx(3 * one)


@given(st.floats(0, 10_000), st.floats(0, 1_000))
def test_odometer_never_decreases_and_soc_stays_in_range(t: float, dt: float) -> None:
    p = DrivingProfile()
    a, b = p.state(t), p.state(t + dt)
    assert b.odometer_km >= a.odometer_km - 1e-9
    assert 0 <= a.soc_pct <= 100


def ask(core: EcuSimCore, arb_id: int, req: bytes, t: float = 0.0) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    rs: dict[int, Reassembler] = {}
    frames = core.handle(arb_id, bytes((len(req),)) + req + b"\xcc" * (7 - len(req)), t)
    while frames:
        more = []
        for resp_id, data in frames:
            got = rs.setdefault(resp_id, Reassembler()).feed(data, 0)
            if got.message:
                out[resp_id] = got.message
            if got.flow_control:
                more += core.handle(resp_id - 8, got.flow_control, t)
        frames = more
    return out


def test_core_answers_decode_with_the_pid_table() -> None:
    core = EcuSimCore(ecus=2)
    (bitmap,) = ask(core, 0x7E0, b"\x01\x00").values()
    ans = P.decode_answer(bitmap)
    assert isinstance(ans, P.SupportedPids) and {0x0C, 0x0D, 0x20} <= ans.pids
    both = ask(core, 0x7DF, b"\x01\x0d\x5b\xa6", t=20.0)
    assert set(both) == {0x7E8, 0x7E9}
    values = dict(P.decode_answer(both[0x7E8]).values)  # type: ignore[union-attr]
    state = core.profile.state(20.0)
    assert values[0x0D] == round(state.speed_kmh)
    assert values[0xA6] == pytest.approx(state.odometer_km, abs=0.05)
    assert values[0x5B] == pytest.approx(state.soc_pct, abs=0.3)
    assert P.decode_answer(both[0x7E9]) == P.PidValues(((0x0D, 50),))
    assert P.decode_answer(ask(core, 0x7E0, b"\x09\x02")[0x7E8]) == P.Vin(core.vin)


def test_core_negative_answers_only_to_physical_requests_and_ignition() -> None:
    core = EcuSimCore()
    assert ask(core, 0x7E0, b"\x22\xf1\x90") == {0x7E8: bytes.fromhex("7F2211")}
    assert ask(core, 0x7DF, b"\x22\xf1\x90") == {}
    assert ask(core, 0x7E0, b"\x01\x0d\x0c\x05\x04\x0f\x11\x1f") == {}  # 8 bytes: not an SF
    assert ask(core, 0x7E0, b"\x01\x02") == {0x7E8: bytes.fromhex("7F0131")}
    assert P.decode_answer(ask(core, 0x7E0, b"\x03")[0x7E8]) == P.Dtcs(3, ("P0A80",))
    assert ask(core, 0x7E0, b"\x04") == {0x7E8: b"\x44"}
    assert P.decode_answer(ask(core, 0x7E0, b"\x03")[0x7E8]) == P.Dtcs(3, ())
    core.ignition = False
    assert ask(core, 0x7DF, b"\x01\x00") == {}


def test_hil_ecu_source_needs_no_files_and_emits_the_demo_signals() -> None:
    src = HilEcuSource.from_options("car", {"time_scale": 20.0}, "demo.toml")
    need = {"Vehicle.Speed", "Vehicle.TraveledDistance",
            "Vehicle.Powertrain.TractionBattery.StateOfCharge.Current"}
    items = asyncio.run(collect(src, lambda xs: need <= {getattr(x, "name", "") for x in xs},
                                20))
    assert need <= {getattr(x, "name", "") for x in items}
    assert src.simulator is None  # stopped with the source


def test_tampered_odometer_is_a_signed_event() -> None:
    src = HilEcuSource.from_options("car", {"pids": {"ODOMETER": 0.05, "SPEED": 0.05},
                                            "read_vin": False}, "t")

    async def scenario() -> list[object]:
        seen: list[object] = []

        def until(xs: list[object]) -> bool:
            odo = named(xs, "Vehicle.TraveledDistance")  # type: ignore[arg-type]
            if len(odo) == 3:
                src.core.odometer_offset_km = -150.0  # a clocked-back cluster
            if len(odo) == 6:
                src.core.odometer_offset_km = 300.0  # ... and rolled forward
            seen[:] = xs
            return len(events(xs, but=FREEZE)) >= 2  # type: ignore[arg-type]

        return await collect(src, until, 20)  # type: ignore[arg-type,return-value]

    items = asyncio.run(scenario())
    assert [e.code for e in events(items, but=FREEZE)] == [  # type: ignore[arg-type]
        "odometer-decreased", "odometer-jump"]


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_over_udp_multicast_with_ignition_off_and_on() -> None:
    port = free_udp_port()
    group = "239.74.163.2"  # administratively scoped (RFC 2365), TTL 1
    proc = subprocess.Popen([sys.executable, "-m", "hil.sim.ecu", "--interface", "udp_multicast",
                             "--channel", group, "--bus-option", f"port={port}"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        src = ObdCanSource.from_options("obd0", {
            "interface": "udp_multicast", "channel": group, "bus_options": {"port": port},
            "pids": {"SPEED": 0.05, "ODOMETER": 0.1}, "sleep_after": 3, "sleep_hold_s": 0.5,
            "probe_interval_s": 0.2, "response_timeout_ms": 50}, "t.toml")
        phase = {"off": False, "on": False}

        def until(xs: list[object]) -> bool:
            if not phase["off"] and len(named(xs, "Vehicle.Speed")) >= 3:  # type: ignore[arg-type]
                phase["off"] = True
                os.kill(proc.pid, signal.SIGUSR1)  # ignition off
            codes = [e.code for e in events(xs, but=FREEZE)]  # type: ignore[arg-type]
            if "vehicle-asleep" in codes and not phase["on"]:
                phase["on"] = True
                os.kill(proc.pid, signal.SIGUSR2)  # ignition on
            return "vehicle-awake" in codes and getattr(xs[-1], "name", "") == "Vehicle.Speed"

        items = asyncio.run(collect(src, until, 40))  # type: ignore[arg-type]
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    codes = [e.code for e in events(items, but=FREEZE)]
    assert codes == ["vehicle-asleep", "vehicle-awake"]  # no odometer event: it stood still
    assert named(items, "Vehicle.VehicleIdentification.VIN")[0].value == "WP0ZZZ99ZTS390000"
    speeds_after_wake = items[[getattr(i, "code", "") for i in items].index("vehicle-awake"):]
    assert named(speeds_after_wake, "Vehicle.Speed")


@given(st.integers(0, 0x1FFFFFFF), st.binary(max_size=12), st.floats(0, 1e6))
def test_core_survives_any_frame(arb_id: int, data: bytes, t: float) -> None:
    for bits in (11, 29):
        for arb, payload in EcuSimCore(addressing=bits, ecus=2).handle(arb_id, data, t):
            assert len(payload) == 8 and arb > 0


def test_profile_with_zero_length_segments() -> None:
    from hil.sim.ecu import Segment
    p = DrivingProfile((Segment(0, 0, 30), Segment(10, 30, 30)))
    assert p.state(5).speed_kmh == 30
    assert DrivingProfile((Segment(0, 0, 0),)).state(3).odometer_km == p.odometer_start_km


def test_odometer_clocked_back_while_the_agent_was_off_is_caught(tmp_path) -> None:
    """The agent saves the odometer's last value in its state directory. Restarted on a
    car that went on from there, it is silent; restarted on a car whose cluster was clocked
    back in between, the first value is a signed ``odometer-decreased`` event."""
    options = {"pids": {"ODOMETER": 0.05, "SPEED": 0.05}, "read_vin": False,
               "time_scale": 20.0}

    def run_once(offset_km: float, readings: int) -> list[object]:
        src = HilEcuSource.from_options("car", options, "t")
        src.attach_state(tmp_path)  # as the runtime does, before run
        src.core.odometer_offset_km = offset_km
        return asyncio.run(collect(  # type: ignore[return-value]
            src, lambda xs: len(named(xs, "Vehicle.TraveledDistance")) >= readings, 20))

    first = run_once(0.0, 3)
    saved = float((tmp_path / "sources" / "car.odometer").read_text())
    assert saved == named(first, "Vehicle.TraveledDistance")[-1].value  # type: ignore[arg-type]
    assert events(run_once(0.0, 3), but=FREEZE) == []  # type: ignore[arg-type]  # went on: silent
    tampered = run_once(-2_000.0, 2)
    (event,) = events(tampered, but=FREEZE)  # type: ignore[arg-type]
    assert event.code == "odometer-decreased" and dict(event.details)["across_restart"] == 1
