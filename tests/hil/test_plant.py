"""The plant: one physical model served as the station's meter and wallbox (Modbus TCP)
and as the car's own CAN signals, in-process and as its own OS process."""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest

from agent.readings import Event, Reading
from firmware_adapters.evse.base import CpState
from firmware_adapters.registry import charger_class, source_class
from hil.sim.meter import ManualClock
from hil.sim.plant import DBC_PATH, CarModel, CarSpec, Plant, PlantConfig, command

CHARGED = "Vehicle.Powertrain.TractionBattery.AccumulatedChargedEnergy"
CONSUMED = "Vehicle.Powertrain.TractionBattery.AccumulatedConsumedEnergy"
SOC = "Vehicle.Powertrain.TractionBattery.StateOfCharge.Current"


def test_car_physics_losses_and_the_bms_sensor_gain() -> None:
    car = CarModel(CarSpec(battery_wh=60_000, soc_pct=50.0, current_gain=1.01))
    car.ac_power_w = car.ac_power_for(16.0, True)
    assert car.ac_power_w == 3 * 230 * 16
    car.advance(Fraction(3600))                   # one hour at 11.04 kW
    loss = 120 + 0.03 * 11_040
    assert int(car.energy_wh) == 30_000 + int(11_040 - loss)   # battery gets AC - losses
    assert int(car.charged_wh) == int((11_040 - loss) * 1.01)  # its sensor reads 1 % high
    assert car.ac_power_for(32.0, True) == 3 * 230 * 16        # the OBC limits, not the EVSE
    assert car.ac_power_for(32.0, False) == 0
    car.export_w = 5_000
    car.ac_power_w = car.ac_power_for(16.0, True)
    assert car.ac_power_w == -5_000
    before = car.energy_wh
    car.advance(Fraction(360))
    assert before - car.energy_wh == Fraction(5_000 + 120 + 150) / 10   # export + losses


def test_one_model_three_views_meter_wallbox_and_battery_agree() -> None:
    clock = ManualClock(100.0)

    async def main() -> None:
        plant = Plant(PlantConfig(wallbox_map="bender-cc612", connectors=1,
                                  cars=(CarSpec(target_soc_pct=41.0),)), clock=clock)
        ports = await plant.start()
        charger = charger_class("modbus-evse").from_options(
            "wb", {"map": "bender-cc612", "host": "127.0.0.1", "port": ports["wallbox"]},
            "t")
        try:
            await charger.open()
            assert (await charger.read_status(1)).state is CpState.B   # plugged, off
            assert plant.energy(1)["ac_power_w"] == 0
            await charger.set_current_limit(1, 16.0)
            await charger.set_enabled(1, True)
            clock.advance(180)
            status = await charger.read_status(1)
            view = plant.energy(1)
            assert status.state is CpState.C and status.power_w == 11_040
            assert view["meter_import_wh"] - 1_000_000 == pytest.approx(
                11_040 * (180 + 0) / 3600, abs=1)
            dc = view["battery_wh"] - 24_000
            assert dc == pytest.approx((11_040 - 120 - 331.2) * 180 / 3600, abs=1)
            clock.advance(3600)                   # the car reaches its target SoC ...
            plant.update()
            clock.advance(60)
            status = await charger.read_status(1)
            assert status.state is CpState.B and status.power_w == 0   # ... and stops
            assert plant.energy(1)["soc_pct"] >= 41.0
        finally:
            charger.close()
            await plant.stop()
    asyncio.run(main())


def test_the_car_sees_its_own_energy_through_the_dbc_source() -> None:
    """The car path: plant.dbc frames on a CAN bus, decoded by the product's dbc source;
    the meter path: modbus-tcp. Both see the session, each through its own sensors."""
    channel = f"plant-{random.getrandbits(32):08x}"

    async def main() -> None:
        plant = Plant(PlantConfig(time_scale=20.0, tick_s=0.05, cars=(CarSpec(
            bus={"interface": "virtual", "channel": channel}),)))
        ports = await plant.start()
        car = source_class("dbc").from_options("car", {
            "dbc": str(DBC_PATH), "interface": "virtual", "channel": channel,
            "signals": {"BMS_Energy.ChargedEnergy": CHARGED,
                        "BMS_Energy.ConsumedEnergy": CONSUMED, "BMS_HV.SoC": SOC}}, "t")
        meter = source_class("modbus-tcp").from_options("meter", {
            "host": "127.0.0.1", "port": ports["meter"], "map": "sdm630",
            "interval_s": 0.2}, "t")
        charger = charger_class("modbus-evse").from_options(
            "wb", {"map": "phoenix-ev-eth", "host": "127.0.0.1",
                   "port": ports["wallbox"]}, "t")
        readings: dict[str, list[int | float]] = {}
        events: list[Event] = []
        enough = asyncio.Event()

        async def emit(item: Reading | Event) -> None:
            if isinstance(item, Event):
                events.append(item)
                return
            readings.setdefault(item.name, []).append(item.value)  # type: ignore[arg-type]
            if readings.get(CHARGED, [0])[-1] >= 100:  # the 4 % losses well above 1 Wh
                enough.set()

        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(car.run(emit)), tg.create_task(meter.run(emit))]
            await charger.open()
            await charger.set_current_limit(1, 32.0)
            await charger.set_enabled(1, True)
            await asyncio.wait_for(enough.wait(), 30)
            await charger.set_enabled(1, False)
            charger.close()
            for task in tasks:
                task.cancel()
        truth = plant.energy(1)
        await plant.stop()
        car_wh = readings[CHARGED][-1]
        assert car_wh >= 100
        assert readings["1-0:1.8.0"][-1] - 1_000_000 > 0        # the meter saw it too
        ac_wh = truth["meter_import_wh"] - 1_000_000
        assert 0.9 * ac_wh < truth["car_charged_wh"] < ac_wh   # losses: AC > battery side
        assert readings[CONSUMED][-1] == 0
        assert 40.0 <= readings[SOC][-1] < 41.0
    asyncio.run(main())


def test_v2g_export_is_counted_by_the_meter_and_the_car() -> None:
    clock = ManualClock(0.0)

    async def main() -> None:
        plant = Plant(PlantConfig(cars=(CarSpec(soc_pct=80.0),)), clock=clock)
        ports = await plant.start()
        charger = charger_class("modbus-evse").from_options(
            "wb", {"map": "phoenix-ev-eth", "host": "127.0.0.1", "port": ports["wallbox"]},
            "t")
        try:
            await charger.open()
            await charger.set_current_limit(1, 16.0)
            await charger.set_enabled(1, True)
            plant.set_export(1, 7_000)
            clock.advance(360)
            status = await charger.read_status(1)
            view = plant.energy(1)
        finally:
            charger.close()
            await plant.stop()
        assert status.power_w == -7_000
        assert view["meter_export_wh"] == 700 and view["meter_import_wh"] == 1_000_000
        assert view["car_consumed_wh"] == int((7_000 + 120 + 210) / 10 * 1.002)
        assert view["car_charged_wh"] == 0
    asyncio.run(main())


def test_control_commands() -> None:
    plant = Plant(PlantConfig(), clock=ManualClock(0.0))
    assert command(plant, "unplug 1")["ok"] is True
    assert plant.energy(1)["state"] == "A"
    answer = command(plant, "fault 1 contactor fault")
    assert answer["ok"] is True and plant.energy(1)["state"] == "F"
    assert command(plant, "export 1 -5")["ok"] is False
    assert command(plant, "fly 1")["error"] == "unknown command 'fly 1'"
    assert command(plant, "plug 9")["ok"] is False


def test_the_plant_runs_as_its_own_process(tmp_path: Path) -> None:
    """``python -m hil.sim.plant --config``: ports on stdout, control on stdin; a charger
    and a meter in this process talk to it over TCP, the car's frames cross processes on
    udp_multicast."""
    port = 43_000 + random.randrange(1_000)
    group = f"239.74.{random.randrange(1, 250)}.{random.randrange(1, 250)}"
    (tmp_path / "plant.toml").write_text(f"""
time_scale = 1.0
[meter]
map = "sdm630"
[wallbox]
map = "bender-cc612"
[[car]]
connector = 1
soc_pct = 55.0
bus = {{ interface = "udp_multicast", channel = "{group}", port = {port} }}
""")
    proc = subprocess.Popen([sys.executable, "-m", "hil.sim.plant", "--config",
                             str(tmp_path / "plant.toml")], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd=os.getcwd())
    assert proc.stdin is not None and proc.stdout is not None
    try:
        ready = json.loads(proc.stdout.readline())
        assert ready["ready"] is True

        async def main() -> tuple[CpState, CpState, list[float]]:
            charger = charger_class("modbus-evse").from_options(
                "wb", {"map": "bender-cc612", "host": "127.0.0.1",
                       "port": ready["wallbox"]}, "t")
            soc: list[float] = []
            got = asyncio.Event()

            async def emit(item: Reading | Event) -> None:
                if isinstance(item, Reading):
                    soc.append(float(item.value))
                    got.set()

            car = source_class("dbc").from_options("car", {
                "dbc": str(DBC_PATH), "interface": "udp_multicast", "channel": group,
                "bus_options": {"port": port}, "signals": {"BMS_HV.SoC": SOC}}, "t")
            task = asyncio.create_task(car.run(emit))
            try:
                await asyncio.wait_for(got.wait(), 20)
                await charger.open()
                before = (await charger.read_status(1)).state
                proc.stdin.write("unplug 1\n")            # the cable is pulled
                proc.stdin.flush()
                answer = await asyncio.to_thread(proc.stdout.readline)
                assert json.loads(answer)["ok"] is True
                after = (await charger.read_status(1)).state
                charger.close()
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            return before, after, soc

        before, after, soc = asyncio.run(main())
        assert (before, after) == (CpState.B, CpState.A)
        assert soc and 54.5 <= soc[-1] <= 55.5
        proc.stdin.close()                                # stdin closed: the plant ends
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_plant_config_errors_name_file_and_key(tmp_path: Path) -> None:
    bad = tmp_path / "plant.toml"
    bad.write_text("[wallbox]\nmap = 'phoenix-ev-eth'\nconectors = 2\n")
    result = subprocess.run([sys.executable, "-m", "hil.sim.plant", "--config", str(bad)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert f"{bad}: wallbox.conectors: expected one of connectors, map" in result.stderr
    assert 'did you mean "connectors"' in result.stderr
    assert "Traceback" not in result.stderr
