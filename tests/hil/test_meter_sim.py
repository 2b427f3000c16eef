"""The meter simulator: exact physics with a manual clock, and a real pymodbus server."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest
from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient

from firmware_adapters.modbus.mapfile import load_map
from firmware_adapters.modbus.registers import decode_snapshot, plan_blocks
from hil.sim.meter import ChargingProfile, Fault, ManualClock, MeterModel, MeterSimulator
from tests.firmware_adapters.modbus.support import SocatPair


def run(coro, timeout: float = 30.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def test_profile_energy_is_exact_across_steps() -> None:
    profile = ChargingProfile.from_pairs([(0, 11_000), (1800, 0), (2700, -4_000)])
    assert profile.power_at(0) == 11_000 and profile.power_at(1799.9) == 11_000
    assert profile.power_at(2000) == 0 and profile.power_at(10_000) == -4_000
    imported, exported = profile.energy_between(0, 3600)
    assert imported == 5_500 and exported == 1_000
    assert profile.energy_between(900, 900) == (0, 0)
    assert profile.energy_between(0, 1) == (Fraction(11_000, 3600), 0)


@pytest.mark.parametrize("steps", [[], [(1, 100)], [(0, 1), (5, 2), (5, 3)],
                                   [(0, 1), (9, 2), (3, 1)]])
def test_bad_profiles(steps) -> None:
    with pytest.raises(ValueError):
        ChargingProfile.from_pairs(steps)


def test_model_integrates_and_switches_profiles() -> None:
    clock = ManualClock()
    model = MeterModel(load_map("sdm630"), ChargingProfile.constant(11_000), clock,
                       import_wh=1_000, export_wh=0)
    clock.advance(3600)
    assert model.energy_wh() == (12_000, 0)
    model.set_power(-7_200)
    clock.advance(1800)
    assert model.energy_wh() == (12_000, 3_600)
    values = model.values()
    assert values["1-0:16.7.0"] == -7_200
    assert sum(values[n] for n in ("1-0:21.7.0", "1-0:41.7.0", "1-0:61.7.0")) == -7_200
    assert values["1-0:31.7.0"] == 2_400 * 1_000_000 // 230_100
    with pytest.raises(ValueError):
        clock.advance(-1)


def test_simulator_advance_needs_a_manual_clock() -> None:
    sim = MeterSimulator({1: "sdm630"}, ChargingProfile.constant(3_600), clock=ManualClock(),
                         import_wh=0, export_wh=0)
    sim.advance(10)
    assert sim.energy_wh() == (10, 0)
    with pytest.raises(TypeError):
        MeterSimulator({1: "sdm630"}).advance(1)


def test_single_phase_model() -> None:
    model = MeterModel(load_map("sdm120"), ChargingProfile.constant(3_680), ManualClock())
    assert model.phases == 1
    assert model.values()["1-0:31.7.0"] == 3_680 * 1_000_000 // 230_100


def test_served_values_follow_register_resolution() -> None:
    clock = ManualClock()
    sim = MeterSimulator({1: "em340"}, ChargingProfile.constant(11_000), clock=clock,
                         import_wh=1_000_049)
    assert sim.served_values()["1-0:1.8.0"] == 1_000_000  # 0.1 kWh steps on the EM340
    clock.advance(36)  # +110 Wh
    assert sim.energy_wh() == (1_000_159, 1_234_500)
    assert sim.served_values()["1-0:1.8.0"] == 1_000_200


async def read_all(client, unit: int, map_name: str) -> dict[str, int]:
    words: dict[tuple[int, int], int] = {}
    meter_map = load_map(map_name)
    for block in plan_blocks(meter_map):
        call = client.read_input_registers if block.function == 4 \
            else client.read_holding_registers
        reply = await call(block.address, count=block.count, device_id=unit)
        assert not reply.isError(), reply
        words.update(block.decode(reply.registers))
    snapshot = decode_snapshot(meter_map, words)
    assert snapshot.unavailable == {}
    return snapshot.values


def test_tcp_server_serves_every_map_and_rejects_bad_requests() -> None:
    async def main():
        sim = MeterSimulator({1: "sdm630", 2: "sdm120", 3: "abb_b23", 4: "em340"},
                             ChargingProfile.constant(3_000), clock=ManualClock())
        port = await sim.start_tcp()
        client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=1, retries=0)
        try:
            assert await client.connect()
            for unit, name in ((1, "sdm630"), (2, "sdm120"), (3, "abb_b23"), (4, "em340")):
                assert await read_all(client, unit, name) == sim.served_values(unit)
            outside = await client.read_input_registers(0x0100, count=2, device_id=1)
            write = await client.write_register(0x5000, 1, device_id=3)
            sim.inject(1, Fault.EXCEPTION, times=2)
            failing = [await client.read_input_registers(0, count=2, device_id=1)
                       for _ in range(3)]
        finally:
            client.close()
            await sim.stop()
        return outside, write, failing, sim

    outside, write, failing, sim = run(main())
    assert outside.isError() and outside.exception_code == 2   # illegal data address
    assert write.isError() and write.exception_code == 1        # measurements are read-only
    assert [r.isError() for r in failing] == [True, True, False]
    assert sim.requests[1] == 2 + 3  # two blocks, three reads; the bad address never reached the meter


@pytest.mark.parametrize(("map_name", "limit"), [("em340", 50), ("eem350", 11)])
def test_the_simulator_enforces_the_documented_per_request_limit(map_name, limit) -> None:
    """The meter answers a read of ``limit`` registers and refuses one more with exception
    03 (illegal data value), as the real meter does (issue 16: em340 never read)."""
    async def main():
        sim = MeterSimulator({1: map_name}, ChargingProfile.constant(1_000), clock=ManualClock())
        port = await sim.start_tcp()
        client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=1, retries=0)
        try:
            assert await client.connect()
            fine = await client.read_input_registers(0, count=limit, device_id=1)
            too_many = await client.read_input_registers(0, count=limit + 1, device_id=1)
        finally:
            client.close()
            await sim.stop()
        return fine, too_many, sim.refused[1]

    fine, too_many, refused = run(main())
    assert not fine.isError() and len(fine.registers) == limit
    assert too_many.isError() and too_many.exception_code == 3 and refused == 1


def test_identity_and_raw_overrides_are_served() -> None:
    async def main():
        sim = MeterSimulator({2: "abb_b23"}, ChargingProfile.constant(1_000), clock=ManualClock(),
                             serial="12345678")
        sim.set_raw(2, "1-0:1.8.0", [0xFFFF] * 4)
        port = await sim.start_tcp()
        client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=1, retries=0)
        try:
            assert await client.connect()
            serial = await client.read_holding_registers(0x8900, count=2, device_id=2)
            model = await client.read_holding_registers(0x8960, count=6, device_id=2)
            energy = await client.read_holding_registers(0x5000, count=4, device_id=2)
        finally:
            client.close()
            await sim.stop()
        return serial.registers, model.registers, energy.registers

    serial, model, energy = run(main())
    assert (serial[0] << 16) | serial[1] == 12_345_678
    assert b"".join(w.to_bytes(2, "big") for w in model).rstrip(b"\0") == b"B23"
    assert energy == [0xFFFF] * 4


def test_serial_server_reattaches_after_the_cable_is_replugged(tmp_path: Path) -> None:
    pair = SocatPair(tmp_path).start()

    async def main():
        sim = MeterSimulator({9: "em340"}, ChargingProfile.constant(1_000), clock=ManualClock())
        await sim.start_serial(pair.meter)
        try:
            first = await read_once(pair.agent, 9)
            pair.kill()
            pair.start()
            for _ in range(100):  # the simulator notices the new pty within ~50 ms
                try:
                    second = await read_once(pair.agent, 9)
                    break
                except AssertionError:
                    await asyncio.sleep(0.05)
            else:
                raise AssertionError("the simulator never came back")
        finally:
            await sim.stop()
        return first, second, sim.served_values(9)

    try:
        first, second, served = run(main())
    finally:
        pair.kill()
    assert first == second == served


async def read_once(port: str, unit: int) -> dict[str, int]:
    client = AsyncModbusSerialClient(port, baudrate=9600, timeout=0.3, retries=0,
                                     reconnect_delay=0)
    try:
        assert await client.connect()
        try:
            return await read_all(client, unit, "em340")
        except Exception as exc:
            raise AssertionError(str(exc)) from exc
    finally:
        client.close()


def test_runs_as_a_process() -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "hil.sim.meter", "--map", "abb_b23", "--tcp", "127.0.0.1:0",
         "--profile", "0:5000,10:-2000"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert process.stdout is not None
        line = process.stdout.readline().decode()
        assert line.startswith("meter simulator on tcp 127.0.0.1:"), line
        port = int(line.rsplit(":", 1)[1])

        async def main():
            client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=1, retries=0)
            try:
                assert await client.connect()
                return await read_all(client, 1, "abb_b23")
            finally:
                client.close()

        values = run(main())
    finally:
        process.terminate()
        process.wait(timeout=10)
    assert values["1-0:16.7.0"] in (5_000, -2_000)
    assert values["1-0:1.8.0"] >= 12_345_600
