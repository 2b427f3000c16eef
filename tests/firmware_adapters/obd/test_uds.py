"""UDS profiles: the TOML tables, DID decoding (bytes in, values out), and every shipped
profile end to end through the CAN path (our ECU simulator on a python-can virtual bus) and
the ELM327 path (ELM327-emulator serving the same profile); response pending (NRC 0x78)."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import can
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.errors import ConfigError, DecodeError
from agent.readings import Reading
from firmware_adapters.obd import uds
from firmware_adapters.obd.can_driver import ObdCanSource
from firmware_adapters.obd.pids import NegativeResponse
from firmware_adapters.obd.serial_driver import Elm327Source
from hil.sim import uds as sim_uds
from hil.sim.ecu import DrivingProfile, EcuSimCore, EcuSimulator
from tests.firmware_adapters.obd.peers import _stop, collect, emulator_pty, start_emulator

PROFILES = uds.builtin_profiles()
T = 100.0  # profile time: charging at 11 kW (IsCharging = 1, current into the battery)
CHARGING = ("Vehicle.Powertrain.TractionBattery.AccumulatedChargedEnergy",
            "Vehicle.Powertrain.TractionBattery.CurrentVoltage",
            "Vehicle.Powertrain.TractionBattery.CurrentCurrent",
            "Vehicle.Powertrain.TractionBattery.StateOfCharge.Current")


def test_at_least_three_families_each_with_the_charging_signals() -> None:
    assert len(PROFILES) >= 3
    for name in PROFILES:
        p = uds.load_profile(name)
        assert p.source and set(CHARGING) <= p.signals, name


def resolution(f: uds.Field) -> float:
    return 0.0 if f.states else abs(f.mul / f.div)


def check_values(profile: uds.Profile, got: dict[str, float | int | str]) -> None:
    """Every signal of the profile arrived with the simulator's value, within a step."""
    want = sim_uds.physical(DrivingProfile().state(T))
    for d in profile.dids:
        for f in d.fields:
            assert f.name in got, f.name
            tol = resolution(f) / 2 + (0.5 if f.unit == "Wh" else 0) + 1e-6
            assert abs(float(got[f.name]) - want[f.name]) <= tol, (f.name, got[f.name])
            if f.unit == "Wh":
                assert isinstance(got[f.name], int)  # energy is an integer


@pytest.mark.parametrize("name", PROFILES)
def test_every_did_decodes_what_the_simulator_encodes(name: str) -> None:
    profile = uds.load_profile(name)
    values = sim_uds.physical(DrivingProfile().state(T))
    got: dict[str, float | int | str] = {}
    for d in profile.dids:
        decoded = d.decode(sim_uds.answer(d, values))
        assert not isinstance(decoded, NegativeResponse)
        got.update({n: v for n, _, v in decoded})
    check_values(profile, got)


def test_did_answers_that_do_not_fit() -> None:
    d = uds.load_profile("hyundai-egmp").dids[0]
    with pytest.raises(DecodeError) as err:
        d.decode(b"\x62\x01\x01" + bytes(10))
    assert err.value.reason == "wrong-length"
    with pytest.raises(DecodeError) as err:
        d.decode(b"\x62\x01\x05" + bytes(60))
    assert err.value.reason == "unexpected-did"
    assert d.decode(b"\x7f\x22\x31") == NegativeResponse(0x22, 0x31)


@given(st.sampled_from([d for n in PROFILES for d in uds.load_profile(n).dids]),
       st.binary(max_size=80))
def test_random_answers_raise_only_decode_error(d: uds.Did, data: bytes) -> None:
    for payload in (data, d.request.replace(b"\x22", b"\x62", 1) + data):
        try:
            out = d.decode(payload)
        except DecodeError:
            continue
        if not isinstance(out, NegativeResponse):
            assert all(isinstance(r, tuple) and len(r) == 3 for r in out)


@pytest.mark.parametrize(("change", "key"), [
    ({"ecus": {}}, "ecus"),
    ({"nope": 1}, "profile.nope"),
    ({"dids": [{"ecu": "x", "did": 1, "min_length": 1, "fields": []}]}, "dids[0].ecu"),
])
def test_profile_errors_name_the_key(change: dict[str, object], key: str) -> None:
    base: dict[str, object] = {"name": "t", "title": "t", "source": "s",
                               "ecus": {"bms": {"request": 0x7E4, "response": 0x7EC}},
                               "dids": [{"ecu": "bms", "did": 1, "min_length": 1, "fields": [
                                   {"name": "Vehicle.Speed", "offset": 0, "length": 1}]}]}
    with pytest.raises(ConfigError) as err:
        uds.parse_profile({**base, **change}, "p.toml")
    assert err.value.key == key


def test_unknown_signal_and_field_outside_min_length_are_config_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "b"\ntitle = "b"\nsource = "s"\n[ecus]\nbms = { request = 0x7E4, '
                   'response = 0x7EC }\n[[dids]]\necu = "bms"\ndid = 1\nmin_length = 1\n'
                   'fields = [{ name = "Vehicle.Speed", offset = 1, length = 2 }]\n')
    with pytest.raises(ConfigError) as err:
        uds.load_profile(str(bad))
    assert err.value.key == "dids[0].min_length"
    with pytest.raises(ConfigError) as err:
        ObdCanSource.from_options("c", {"interface": "virtual", "channel": "x",
                                        "profile": "no-such-car"}, "car.toml")
    assert err.value.file == "car.toml" and "hyundai-egmp" in (err.value.expected or "")


def test_docs_list_every_profile() -> None:
    doc = (Path(__file__).parents[3] / "docs" / "vehicle.md").read_text()
    assert uds.markdown_profiles() in doc


def items_by_name(items: list[object]) -> dict[str, float | int | str]:
    return {i.name: i.value for i in items if isinstance(i, Reading)}


def run_can(profile_name: str, **core: object) -> tuple[dict[str, float | int | str],
                                                        ObdCanSource]:
    profile = uds.load_profile(profile_name)
    channel = f"uds-{uuid.uuid4().hex}"
    bus = can.Bus(interface="virtual", channel=channel)
    sim = EcuSimulator(bus, EcuSimCore(uds=profile, **core),  # type: ignore[arg-type]
                       clock=lambda: 0.0, start_s=T).start()  # frozen at T: exact values
    try:
        src = ObdCanSource.from_options("can0", {
            "interface": "virtual", "channel": channel, "profile": profile_name,
            "pids": {"SPEED": 0.5}, "read_vin": False, "dtc_period_s": 0,
            "response_timeout_ms": 200, "profile_period_s": 0.05}, "t.toml")
        items = asyncio.run(collect(src, lambda xs: profile.signals <= items_by_name(
            xs).keys(), 60))  # type: ignore[arg-type]
    finally:
        sim.stop()
        bus.shutdown()
    return items_by_name(items), src  # type: ignore[arg-type]


@pytest.mark.parametrize("name", PROFILES)
def test_every_profile_through_the_can_path(name: str) -> None:
    got, src = run_can(name)
    check_values(uds.load_profile(name), got)
    assert src.requests["did"] >= len(uds.load_profile(name).dids)


def test_response_pending_is_waited_for_on_every_service() -> None:
    # Each answer (service 01, 09, 03, 22) comes after two "7F <sid> 78" frames (ISO 14229-1)
    got, src = run_can("renault-zoe-ph2", response_pending=2)
    check_values(uds.load_profile("renault-zoe-ph2"), got)
    assert "Vehicle.Speed" in got
    assert src.counters["rx-duplicate"] == 0 and src.counters["nrc-response-pending"] == 0


@pytest.mark.parametrize("name", PROFILES)
def test_every_profile_through_the_elm327_emulator(name: str, tmp_path: Path) -> None:
    proc, out = start_emulator(tmp_path, module=("hil.sim.elm_profile", "--profile", name,
                                                 "--time", str(T), "--"))
    profile = uds.load_profile(name)
    try:
        port = emulator_pty(out)
        src = Elm327Source.from_options("elm", {"port": port, "profile": name,
                                                "pids": {"SPEED": 1.0}, "read_vin": False,
                                                "dtc_period_s": 0, "profile_period_s": 0.05},
                                        "t.toml")
        items = asyncio.run(collect(src, lambda xs: profile.signals <= items_by_name(
            xs).keys(), 90))  # type: ignore[arg-type]
    finally:
        _stop(proc)
    check_values(profile, items_by_name(items))  # type: ignore[arg-type]
    assert (tmp_path / "elm.log").exists()  # the emulator's log stays in the test's folder
