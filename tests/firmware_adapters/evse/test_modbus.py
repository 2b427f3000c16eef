"""modbus-evse against a pymodbus server implementing each shipped map's registers.

The server (hil.sim.evse.WallboxServer) enforces what the controllers document: their
function codes, read sizes, whole-value writes, current ranges and (Alfen) the set-point
validity time; faults are injected per unit (silent, exception reply).
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from pymodbus.client import AsyncModbusTcpClient

from agent.readings import Event
from firmware_adapters.evse.base import ChargerStatus, CpState
from firmware_adapters.evse.maps import load_map
from firmware_adapters.evse.modbus import ModbusEvseCharger
from firmware_adapters.registry import charger_class
from hil.sim.evse import Fault, WallboxModel, WallboxServer
from hil.sim.meter import ManualClock

MAPS = ["phoenix-ev-eth", "alfen-ng9xx", "bender-cc612"]


def run(name: str, body: Callable[[WallboxServer, ModbusEvseCharger, int],
                                  Awaitable[None]], clock: ManualClock | None = None,
        **options: object) -> None:
    async def main() -> None:
        m = load_map(name)
        server = WallboxServer(m, WallboxModel(m.max_connectors),
                               **({"clock": clock} if clock else {}))
        port = await server.start_tcp()
        charger = charger_class("modbus-evse").from_options(
            "wb0", {"map": name, "host": "127.0.0.1", "port": port, "timeout_s": 0.3,
                    "retries": 0, **options}, "station.toml")
        assert isinstance(charger, ModbusEvseCharger)
        try:
            await body(server, charger, port)
        finally:
            charger.close()
            await server.stop()
    asyncio.run(main())


class Seen:
    def __init__(self) -> None:
        self.statuses: list[ChargerStatus] = []
        self.events: list[Event] = []

    async def poll(self, charger: ModbusEvseCharger) -> bool:
        return await charger.poll_once(self.statuses.append, self.events.append)


@pytest.mark.parametrize("name", MAPS)
def test_plug_enable_limit_disable_through_the_documented_registers(name: str) -> None:
    async def body(server: WallboxServer, charger: ModbusEvseCharger, port: int) -> None:
        seen = Seen()
        assert await seen.poll(charger)
        server.wallbox.plug(1)
        await charger.set_enabled(1, True)          # no limit told yet: the minimum
        await charger.set_current_limit(1, 13.0)
        await seen.poll(charger)
        await charger.set_enabled(1, False)
        await seen.poll(charger)
        last = seen.statuses[-3:]
        assert [s.state for s in last] == [CpState.A, CpState.C, CpState.B]
        assert last[1].enabled and last[1].current_limit_a == 13.0
        assert last[1].power_w == round(13.0 * 230 * 3)
        assert not last[2].enabled and last[2].power_w == 0
        assert seen.events == []
        writes = [w for _, w in server.writes]
        coil = load_map(name).enable_coil
        if coil is not None:   # Phoenix: FC 5 on coil 400, FC 6 on 528
            assert [(w.function, w.address) for w in writes] == [(5, 400), (6, 528), (5, 400)]
        else:                  # Alfen/Bender: FC 16 on the current register, 0 A = off
            assert {w.function for w in writes} == {16}
            assert writes[-1].values == (0,) * len(writes[-1].values)
    run(name, body)


def test_phoenix_register_layout_seen_by_a_raw_client() -> None:
    """Word order and encodings on the wire, read with pymodbus directly (not our codec)."""
    async def body(server: WallboxServer, charger: ModbusEvseCharger, port: int) -> None:
        server.wallbox.plug(1)
        await charger.open()
        await charger.set_current_limit(1, 16.0)
        await charger.set_enabled(1, True)
        client = AsyncModbusTcpClient("127.0.0.1", port=port)
        await client.connect()
        try:
            status = await client.read_input_registers(100, count=1, device_id=255)
            power = await client.read_input_registers(120, count=2, device_id=255)
            coil = await client.read_coils(400, count=1, device_id=255)
            fc2 = await client.read_discrete_inputs(0, count=1, device_id=255)
        finally:
            client.close()
        assert status.registers == [ord("C")]
        low, high = power.registers
        assert low | high << 16 == 11040            # least significant word first
        assert coil.bits[0] is True
        assert fc2.isError() and fc2.exception_code == 1   # FC 2 is not in the device
    run("phoenix-ev-eth", body)


def test_alfen_refuses_what_its_document_refuses() -> None:
    async def body(server: WallboxServer, charger: ModbusEvseCharger, port: int) -> None:
        client = AsyncModbusTcpClient("127.0.0.1", port=port)
        await client.connect()
        try:
            half = await client.write_register(1210, 0x4180, device_id=1)  # s1.3: FC 6
            fc4 = await client.read_input_registers(1200, count=2, device_id=1)  # s1.1
            read_only = await client.write_registers(1206, [0, 0], device_id=1)
            low = await client.write_registers(1210, list(struct.unpack(
                ">2H", struct.pack(">f", 4.0))), device_id=1)      # below 6 A
        finally:
            client.close()
        assert (half.exception_code, fc4.exception_code, read_only.exception_code,
                low.exception_code) == (3, 1, 2, 3)
    run("alfen-ng9xx", body)


def test_the_server_enforces_a_maps_read_limit(tmp_path: Path) -> None:
    """A controller that answers at most N registers per request (max_read) refuses more
    with exception 03, and the driver's plan never asks for more."""
    text = (Path(__file__).parents[3] / "firmware_adapters/evse/maps/phoenix-ev-eth.toml"
            ).read_text().replace("word_order = ", "max_read = 2\nword_order = ", 1)
    path = tmp_path / "small.toml"
    path.write_text(text)

    async def main() -> None:
        m = load_map(str(path))
        server = WallboxServer(m, WallboxModel(1))
        port = await server.start_tcp()
        client = AsyncModbusTcpClient("127.0.0.1", port=port)
        await client.connect()
        try:
            refused = await client.read_input_registers(100, count=3, device_id=255)
            charger = ModbusEvseCharger("wb0", (1,), m, "127.0.0.1", port)
            status = await charger.read_status(1) if await charger.open() is None else None
            charger.close()
        finally:
            client.close()
            await server.stop()
        assert refused.isError() and refused.exception_code == 3
        assert status is not None and status.state is CpState.A
        assert all(r.count <= 2 for r in m.reads)
    asyncio.run(main())


def test_alfen_falls_back_to_safe_current_unless_the_driver_keeps_it_alive() -> None:
    clock = ManualClock(1000.0)

    async def body(server: WallboxServer, charger: ModbusEvseCharger, port: int) -> None:
        seen = Seen()
        server.wallbox.plug(1)
        await seen.poll(charger)   # first cycle: the keep-alive writes "off" (0 A)
        assert seen.statuses[-1].enabled is True   # it read before the write: safe current
        await seen.poll(charger)
        assert (seen.statuses[-1].state, seen.statuses[-1].enabled) == (CpState.B, False)
        clock.advance(61)                 # validity time over without a rewrite ...
        charger._written_at.clear()       # ... as if this driver had died meanwhile
        before = len(server.writes)
        statuses = await charger.read_status(1)
        assert (statuses.state, statuses.enabled, statuses.current_limit_a) == \
            (CpState.C, True, 6.0)        # s1.3.1: the station falls back on its own
        await seen.poll(charger)          # a healthy driver rewrites its set-point
        assert len(server.writes) == before + 1
        assert (await charger.read_status(1)).enabled is False
    run("alfen-ng9xx", body, clock=clock, connectors=[1])


def test_a_charger_that_stops_answering_is_silent_not_invented() -> None:
    async def body(server: WallboxServer, charger: ModbusEvseCharger, port: int) -> None:
        seen = Seen()
        server.wallbox.plug(1)
        assert await seen.poll(charger)
        assert charger.status(1) is not None
        server.inject(255, Fault.SILENT)
        for _ in range(4):
            await seen.poll(charger)
        codes = [e.code for e in seen.events]
        assert codes[:3] == ["charger-read-failed", "charger-read-failed", "charger-silent"]
        assert codes.count("charger-silent") == 1    # said once, not every poll
        assert charger.status(1) is None and charger.is_silent(1)
        assert charger.counters["silent"] == 1
        assert sum(charger.counters[r] for r in ("no-response", "line-down")) >= 4
        reported = len(seen.statuses)
        server.clear()
        for _ in range(3):   # a lost TCP link reconnects on the next cycles
            await seen.poll(charger)
        assert seen.events[-1].code == "charger-recovered" or \
            "charger-recovered" in [e.code for e in seen.events]
        assert charger.status(1) is not None and not charger.is_silent(1)
        assert len(seen.statuses) == reported + 1    # the first status after it, again
    run("phoenix-ev-eth", body, silent_after=3)


def test_exception_replies_and_a_vanished_server_are_counted() -> None:
    async def body(server: WallboxServer, charger: ModbusEvseCharger, port: int) -> None:
        seen = Seen()
        server.inject(255, Fault.EXCEPTION, times=1)
        await seen.poll(charger)
        assert charger.counters["exception"] == 1
        assert seen.events[0].code == "charger-read-failed"
        await server.stop()
        assert not await seen.poll(charger) or not await seen.poll(charger)
        assert "charger-line-down" in [e.code for e in seen.events]
        port2 = await server.start_tcp(port=port)
        assert port2 == port
        assert await seen.poll(charger)
        assert "charger-line-up" in [e.code for e in seen.events]
    run("bender-cc612", body)


def test_watch_reports_changes_and_stops_on_cancel() -> None:
    async def body(server: WallboxServer, charger: ModbusEvseCharger, port: int) -> None:
        changed = asyncio.Event()
        statuses: list[ChargerStatus] = []

        def on_status(status: ChargerStatus) -> None:
            statuses.append(status)
            if status.state is CpState.B:
                changed.set()

        task = asyncio.create_task(charger.watch(on_status, 0.05))
        while not statuses:
            await asyncio.sleep(0.01)
        server.wallbox.plug(1)
        await asyncio.wait_for(changed.wait(), 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert [s.state for s in statuses][:2] == [CpState.A, CpState.B]
        assert charger.client is None
    run("phoenix-ev-eth", body)


@pytest.mark.parametrize(("options", "message"), [
    ({}, r"chargers\.wb0\.map: expected a value"),
    ({"map": "phoenix-ev-eth"}, r"chargers\.wb0\.host: expected a value"),
    ({"map": "phoenix-ev-eth", "host": "h", "connectors": [1, 2]},
     r"chargers\.wb0\.connectors: expected connector numbers 1\.\.1"),
    ({"map": "alfen-ng9xx", "host": "h", "max_current_a": 40},
     r"chargers\.wb0\.max_current_a: expected a number in \[6\.0, 32\.0\]"),
    ({"map": "bender-cc612", "host": "h", "prot": 502},
     r"chargers\.wb0\.prot: .*did you mean \"port\""),
])
def test_modbus_evse_options_errors(options: dict[str, object], message: str) -> None:
    from agent.errors import ConfigError
    with pytest.raises(ConfigError, match=r"^station\.toml: " + message):
        charger_class("modbus-evse").from_options("wb0", options, "station.toml")
