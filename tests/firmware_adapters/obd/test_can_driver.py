"""``obd-can`` source: against ELM327-emulator as an SLCAN adapter (python-can ``slcan`` on a
socat pty pair), and against our ECU simulator on a python-can virtual bus (11/29-bit, two
ECUs, a rogue node sending hostile frames, ignition off/on)."""

from __future__ import annotations

import asyncio
import threading
import uuid

import can
import pytest
from elm.obd_message import ObdMessage

from firmware_adapters.obd.can_driver import ObdCanSource
from hil.sim.ecu import EcuSimCore, EcuSimulator
from tests.firmware_adapters.obd.peers import FREEZE, collect, emulator_values, events, named

SIX = ("SPEED", "RPM", "COOLANT_TEMP", "ENGINE_LOAD", "INTAKE_TEMP", "THROTTLE_POS")


def test_slcan_values_equal_what_the_emulator_defines(slcan_port: str) -> None:
    src = ObdCanSource.from_options("can0", {
        "interface": "slcan", "channel": slcan_port, "bitrate": 500000,
        "bus_options": {"tty_baudrate": 115200}, "response_timeout_ms": 200,
        "pids": {key: 0.05 for key in SIX}}, "t.toml")
    items = asyncio.run(collect(src, lambda xs: len(named(xs, "Vehicle.Speed")) >= 5, 60))

    def merged(k: int) -> bool:  # see test_serial_driver: two-ECU entries do not parse
        rs = [ObdMessage["car"][key]["Response"] for key in SIX]
        return any(r[k % len(r)].count("<header>") > 1 for r in rs)

    expect = {
        "Vehicle.Speed": [v[0] for v in emulator_values("SPEED")],
        "Vehicle.OBD.EngineSpeed": [(256 * v[0] + v[1]) / 4 for v in emulator_values("RPM")],
        "Vehicle.OBD.CoolantTemperature": [v[0] - 40 for v in emulator_values("COOLANT_TEMP")],
    }
    for name, values in expect.items():
        got = [r.value for r in named(items, name)]
        want = [values[k % len(values)] for k in range(40) if not merged(k)][:len(got)]
        assert len(got) >= 5 and got == pytest.approx(want), name
    (vin,) = named(items, "Vehicle.VehicleIdentification.VIN")  # multi-frame: FF, FC, CFs
    assert vin.value == "WP0ZZZ99ZTS390000"


def sim_bus(core: EcuSimCore) -> tuple[str, can.BusABC, EcuSimulator]:
    channel = f"obd-test-{uuid.uuid4().hex}"
    bus = can.Bus(interface="virtual", channel=channel)
    return channel, bus, EcuSimulator(bus, core).start()


@pytest.mark.parametrize("bits", [11, 29])
def test_two_ecus_answer_one_functional_request(bits: int) -> None:
    core = EcuSimCore(addressing=bits, ecus=2, vin="SB1ZS3JE60E282102")
    channel, bus, sim = sim_bus(core)
    try:
        src = ObdCanSource.from_options("can0", {
            "interface": "virtual", "channel": channel, "addressing": bits,
            "pids": {"SPEED": 0.05, "ODOMETER": 0.05, "HYBRID_BATTERY_REMAINING": 0.05,
                     "AMBIANT_AIR_TEMP": 0.05}}, "t.toml")
        items = asyncio.run(collect(src, lambda xs: len(named(xs, "Vehicle.Speed")) >= 4, 30))
    finally:
        sim.stop()
        bus.shutdown()
    assert src.poller.supported[0x0D] == {0, 1} if bits == 11 else {0x10, 0x11}
    assert src.counters["duplicate-value"] >= 1
    assert named(items, "Vehicle.VehicleIdentification.VIN")[0].value == "SB1ZS3JE60E282102"
    assert named(items, "Vehicle.OBD.DTCList")[0].value == "P0A80"
    odo = [r.value for r in named(items, "Vehicle.TraveledDistance")]
    assert odo and all(12345.6 <= v < 12346.0 for v in odo)
    soc = named(items, "Vehicle.Powertrain.TractionBattery.StateOfCharge.Current")
    assert soc and abs(soc[0].value - 60.0) < 0.5
    (freeze,) = events(items)  # the stored DTC brought its freeze frame (service 02)
    assert freeze.code == "obd-freeze-frame" and dict(freeze.details)["dtc"] == "P0A80"
    assert 0 <= int(dict(freeze.details)["SPEED"]) <= 50


def test_hostile_frames_on_the_bus_are_counted_and_polling_goes_on() -> None:
    core = EcuSimCore()
    channel, bus, sim = sim_bus(core)
    rogue = can.Bus(interface="virtual", channel=channel)
    stop = threading.Event()
    junk = [bytes.fromhex(h) for h in ("2141", "0941", "1FFF414243444546", "4000", "00",
                                       "1014490201575030", "2541", "7F01", "03410D")]

    def spam() -> None:
        while not stop.wait(0.003):
            for data in junk:
                rogue.send(can.Message(arbitration_id=0x7E9, data=data, is_extended_id=False))

    thread = threading.Thread(target=spam, daemon=True)
    thread.start()
    try:
        src = ObdCanSource.from_options("can0", {"interface": "virtual", "channel": channel,
                                                 "pids": {"SPEED": 0.05}, "read_vin": False,
                                                 "sleep_after": 100}, "t.toml")
        items = asyncio.run(collect(src, lambda xs: len(named(xs, "Vehicle.Speed")) >= 5, 30))
    finally:
        stop.set()
        thread.join(2)
        sim.stop()
        rogue.shutdown()
        bus.shutdown()
    bad = {k: v for k, v in src.counters.items() if k.startswith(("rx-isotp", "decode-"))}
    assert len(bad) >= 3, src.counters
    assert any(e.code == "obd-bad-answer" for e in events(items))
    assert len(named(items, "Vehicle.Speed")) >= 5


def test_silent_ecu_sleep_probe_and_resume() -> None:
    core = EcuSimCore()
    channel, bus, sim = sim_bus(core)

    async def scenario() -> tuple[list[object], ObdCanSource]:
        src = ObdCanSource.from_options("can0", {
            "interface": "virtual", "channel": channel, "pids": {"SPEED": 0.05},
            "read_vin": False, "sleep_after": 3, "probe_interval_s": 0.2, "sleep_hold_s": 0.2,
            "response_timeout_ms": 30}, "t.toml")
        seen: list[object] = []

        async def emit(item: object) -> None:
            seen.append(item)
            if getattr(item, "code", "") == "vehicle-asleep":
                sim.ignition = True  # the driver comes back
            if getattr(item, "name", "") == "Vehicle.Speed" and \
                    len(named(seen, "Vehicle.Speed")) == 3:  # type: ignore[arg-type]
                sim.ignition = False  # the driver leaves the car

        task = asyncio.create_task(src.run(emit))
        try:
            async def awake_again() -> None:
                while not any(getattr(i, "code", "") == "vehicle-awake" for i in seen) or \
                        named(seen, "Vehicle.Speed")[-1] is named(seen, "Vehicle.Speed")[2]:
                    await asyncio.sleep(0.02)
            await asyncio.wait_for(awake_again(), 20)
        finally:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        return seen, src

    try:
        seen, src = asyncio.run(scenario())
    finally:
        sim.stop()
        bus.shutdown()
    codes = [e.code for e in events(seen, but=FREEZE)]  # type: ignore[arg-type]
    assert codes[:2] == ["vehicle-asleep", "vehicle-awake"]
    assert src.counters["no-answer"] >= 3 and src.requests["probe"] >= 1
    assert len(named(seen, "Vehicle.Speed")) >= 4  # type: ignore[arg-type]
