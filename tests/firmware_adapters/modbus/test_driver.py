"""The RTU and TCP sources against the meter simulator (pymodbus server) over real
transports: a socat pty pair and loopback TCP. No mocks."""

from __future__ import annotations

import asyncio
import contextlib
import tomllib
from pathlib import Path

import pytest

from agent.errors import AdapterUnavailable, ConfigError
from agent.readings import METER_SIGNALS, Event, Reading
from firmware_adapters.modbus.driver import ModbusRtuSource, ModbusTcpSource
from firmware_adapters.modbus.mapfile import builtin_maps, load_map
from firmware_adapters.modbus.registers import Order, raw_for_value, raw_to_registers
from firmware_adapters.modbus.rtu import LineFormat
from firmware_adapters.registry import source_class
from hil.sim.line import LineSimulator
from hil.sim.meter import ChargingProfile, Fault, ManualClock, MeterSimulator
from tests.firmware_adapters.modbus.support import Sink, SocatPair

MAPS = list(builtin_maps())
POWER = {"sdm120": 7_360, "sdm230": 7_360, "abb_b23": 22_000}  # others: 11 kW
FAST = {"timeout_s": 0.15, "retries": 0, "interval_s": 0.05, "backoff_initial_s": 0.05,
        "backoff_max_s": 0.2}


def run(coro, timeout: float = 60.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def rtu(port: str, meters: list[dict], **extra) -> ModbusRtuSource:
    return ModbusRtuSource.from_options("meter0", {"port": port, "meters": meters, **FAST,
                                                   **extra}, "station.toml")


def tcp(port: int, meters: list[dict], **extra) -> ModbusTcpSource:
    return ModbusTcpSource.from_options("meter0", {"host": "127.0.0.1", "port": port,
                                                   "meters": meters, **FAST, **extra},
                                        "station.toml")


async def snapshot(source, sink) -> int:
    assert await source.ensure_line(sink)
    return await source.poll_once(sink)


def by_name(readings: list[Reading]) -> dict[str, int]:
    return {r.name: r.value for r in readings}


def assert_trap_present(map_name: str, served: dict[str, int]) -> None:
    """At least one served value has registers that differ, so a word-order mistake would
    change the decoded value (the trap is armed)."""
    meter_map = load_map(map_name)
    armed = []
    for spec in meter_map.registers:
        if spec.count < 2:
            continue
        raw = raw_to_registers(spec, raw_for_value(spec, served[spec.name]))
        if len(set(raw)) > 1 and raw != raw[::-1]:
            armed.append(spec.name)
    assert "1-0:1.8.0" in armed, armed


@pytest.mark.parametrize("map_name", MAPS)
def test_tcp_decodes_exactly_what_the_simulator_serves(map_name) -> None:
    async def main():
        sim = MeterSimulator({7: map_name}, ChargingProfile.constant(POWER.get(map_name, 11_000)),
                             clock=ManualClock(), serial="31415926")
        port = await sim.start_tcp()
        source, sink = tcp(port, [{"unit": 7, "map": map_name}]), Sink()
        try:
            assert await snapshot(source, sink) == 1
            served = sim.served_values(7)
        finally:
            source.link.close()
            await sim.stop()
        return sink, served

    sink, served = run(main())
    assert by_name(sink.readings) == served
    assert_trap_present(map_name, served)
    for reading in sink.readings:
        assert reading.unit == METER_SIGNALS[reading.name].unit
        assert isinstance(reading.value, int) and reading.flags == ()
        assert reading.source == "meter0"
        # the serial from the meter's identity registers, where its map documents them
        # (a Carlo Gavazzi holds 7 letters, one per register: it shows "3141592")
        field = load_map(map_name).serial
        width = None if field is None or field.kind not in ("ascii", "char") else \
            field.count * (1 if field.kind == "char" else 2)
        assert reading.meter == (f"7/{'31415926'[:width]}" if field else "7")
    assert sink.codes() == ["meter-identified"]


@pytest.fixture(params=["socat", "paced-19200"])
def serial_line(request, tmp_path):
    """(agent path, meter path, serial options): a bare socat pty pair, or the paced line
    simulator at 19200 baud, 8N2 (a pty rejects a parity setting, so parity is covered by
    the line simulator's own timing tests)."""
    if request.param == "socat":
        pair = SocatPair(tmp_path).start()
        yield pair.agent, pair.meter, {}
        pair.kill()
        return
    line = LineFormat(19200, stopbits=2)
    with LineSimulator(line, str(tmp_path / "agent"), str(tmp_path / "meter")) as sim:
        yield sim.paths[0], sim.paths[1], {"baudrate": 19200, "stopbits": 2}


@pytest.mark.parametrize("map_name", MAPS)
def test_serial_decodes_exactly_what_the_simulator_serves(map_name, serial_line, sink) -> None:
    agent, meter, options = serial_line

    async def main():
        clock = ManualClock()
        sim = MeterSimulator({3: map_name}, ChargingProfile.constant(POWER.get(map_name, 11_000)),
                             clock=clock)
        await sim.start_serial(meter, **options)
        source = rtu(agent, [{"unit": 3, "map": map_name}], timeout_s=1.0, **options)
        try:
            assert await snapshot(source, sink) == 1
            first = sim.served_values(3)
            # V2G: the car feeds back for an hour of simulated time.
            sim.set_power(-3_000)
            clock.advance(3600)
            assert await snapshot(source, sink) == 1
            second = sim.served_values(3)
        finally:
            source.link.close()
            await sim.stop()
        return first, second

    first, second = run(main())
    readings = sink.readings
    half = len(readings) // 2
    assert by_name(readings[:half]) == first
    assert by_name(readings[half:]) == second
    assert second["1-0:2.8.0"] - first["1-0:2.8.0"] == pytest.approx(3_000, abs=100)
    assert second["1-0:16.7.0"] == -3_000
    assert_trap_present(map_name, first)


def test_em340_word_order_is_lsw_first() -> None:
    spec = load_map("em340").spec("1-0:1.8.0")
    assert spec.word_order is Order.LITTLE
    assert raw_to_registers(spec, 123_456) == [0xE240, 0x0001]


def test_several_meters_share_one_rs485_line(socat_pair, sink) -> None:
    """Two sources (two config entries) and three unit ids on one port, polling at once:
    one client, one lock, no collisions, every value exact."""
    async def main():
        sim = MeterSimulator({1: "sdm630", 2: "em340", 5: "abb_b23"},
                             ChargingProfile.constant(7_000), clock=ManualClock())
        await sim.start_serial(socat_pair.meter)
        a = rtu(socat_pair.agent, [{"unit": 1, "map": "sdm630"}, {"unit": 2, "map": "em340"}])
        b = rtu(socat_pair.agent, [{"unit": 5, "map": "abb_b23"}])
        sink_b = Sink()
        try:
            assert await a.ensure_line(sink) and await b.ensure_line(sink_b)
            assert a.link.shared is b.link.shared
            for _ in range(3):
                done = await asyncio.gather(a.poll_once(sink), b.poll_once(sink_b))
                assert done == [2, 1]
        finally:
            a.link.close()
            b.link.close()
            await sim.stop()
        return sim, sink_b, a, b

    sim, sink_b, a, b = run(main())
    assert a.counters == {} and b.counters == {}
    assert sink.problems() == [] and sink_b.problems() == []
    sdm = [r for r in sink.readings if r.name == "1-0:14.7.0"]
    assert len(sdm) == 6  # both meters of source a carry a frequency, three cycles
    assert by_name(sink_b.readings) == sim.served_values(5)


@pytest.mark.parametrize(("fault", "reason"), [
    (Fault.CRC, "crc-error"), (Fault.SHORT, "short-frame"), (Fault.WRONG_UNIT, "wrong-unit"),
    (Fault.SILENT, "no-response"), (Fault.EXCEPTION, "exception")])
def test_bad_input_is_an_event_and_a_counter_and_polling_goes_on(fault, reason, socat_pair,
                                                                  sink) -> None:
    async def main():
        sim = MeterSimulator({1: "sdm630", 2: "sdm120"}, ChargingProfile.constant(3_000),
                             clock=ManualClock())
        await sim.start_serial(socat_pair.meter)
        source = rtu(socat_pair.agent, [{"unit": 1, "map": "sdm630"},
                                        {"unit": 2, "map": "sdm120"}])
        try:
            sim.inject(1, fault, times=1)
            assert await snapshot(source, sink) == 1        # unit 2 still read
            faulty = list(sink.items)
            assert await source.poll_once(sink) == 2        # unit 1 is back
        finally:
            source.link.close()
            await sim.stop()
        return faulty, sim, source

    faulty, sim, source = run(main())
    events = [i for i in faulty if isinstance(i, Event) and i.code != "meter-identified"]
    assert [(e.code, dict(e.details)) for e in events] == [
        ("meter-read-failed", {"unit": 1, "reason": reason})]
    assert source.counters[reason] == 1
    assert sum(source.counters.values()) == 1
    # Nothing invented for unit 1 in the faulty cycle: only unit 2's quantities.
    assert {r.name for r in faulty if isinstance(r, Reading)} == \
        {s.name for s in load_map("sdm120").registers}
    assert len(sink.readings) == sum(isinstance(i, Reading) for i in faulty) + 16 + 9


def test_tcp_exception_and_silence_are_events(sink) -> None:
    async def main():
        sim = MeterSimulator({1: "sdm630"}, ChargingProfile.constant(0), clock=ManualClock())
        port = await sim.start_tcp()
        source = tcp(port, [{"unit": 1, "map": "sdm630"}])
        try:
            sim.inject(1, Fault.EXCEPTION, times=1)
            assert await snapshot(source, sink) == 0
            sim.inject(1, Fault.SILENT, times=1)
            assert await source.poll_once(sink) == 0
            assert await source.poll_once(sink) == 1
        finally:
            source.link.close()
            await sim.stop()
        return source

    source = run(main())
    assert [dict(e.details)["reason"] for e in sink.problems()] == ["exception", "no-response"]
    assert source.counters == {"exception": 1, "no-response": 1}


def test_silent_meter_is_reported_once_and_recovers_on_its_own(socat_pair, sink) -> None:
    async def main():
        sim = MeterSimulator({1: "sdm630"}, ChargingProfile.constant(7_000))
        await sim.start_serial(socat_pair.meter)
        source = rtu(socat_pair.agent, [{"unit": 1, "map": "sdm630"}], silent_after=2)
        task = asyncio.create_task(source.run(sink))
        try:
            await sink.wait(lambda: len(sink.readings) >= 16)
            sim.inject(1, Fault.SILENT)
            await sink.wait(lambda: "meter-silent" in sink.codes())
            silent_at = len(sink.items)
            await sink.wait(lambda: source.counters["no-response"] >= 5)
            quiet = list(sink.items[silent_at:])
            sim.clear(1)
            await sink.wait(lambda: "meter-recovered" in sink.codes())
            await sink.wait(lambda: isinstance(sink.items[-1], Reading))
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await sim.stop()
        return quiet

    quiet = run(main())
    assert quiet == []  # no reading invented, no event flood while silent
    codes = sink.codes()
    assert codes.count("meter-silent") == 1 and codes.count("meter-recovered") == 1
    assert codes.index("meter-read-failed") < codes.index("meter-silent")
    recovered = next(e for e in sink.events if e.code == "meter-recovered")
    assert dict(recovered.details)["failed_reads"] >= 5
    assert all(r.flags == () for r in sink.readings)


def test_line_pulled_and_plugged_back(socat_pair, sink) -> None:
    """socat killed (the pty pair vanishes), then started again: the source reports the
    outage, invents nothing, and resumes on its own."""
    async def main():
        sim = MeterSimulator({1: "sdm630"}, ChargingProfile.constant(7_000))
        await sim.start_serial(socat_pair.meter)
        source = rtu(socat_pair.agent, [{"unit": 1, "map": "sdm630"}])
        task = asyncio.create_task(source.run(sink))
        try:
            await sink.wait(lambda: len(sink.readings) >= 32)
            socat_pair.kill()
            await sink.wait(lambda: "meter-line-down" in sink.codes())
            await sink.wait(lambda: source.counters["line-down"] >= 3)
            socat_pair.start()
            await sink.wait(lambda: "meter-line-up" in sink.codes())
            up_at = len(sink.items)
            await sink.wait(lambda: len(sink.readings) >= 32 + 16
                            and len(sink.items) > up_at + 16)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await sim.stop()

    run(main())
    codes = sink.codes()
    assert codes.count("meter-line-down") == 1 and codes.count("meter-line-up") == 1
    down = codes.index("meter-line-down")
    items = sink.items
    down_at = items.index(next(e for e in sink.events if e.code == "meter-line-down"))
    up_at = items.index(next(e for e in sink.events if e.code == "meter-line-up"))
    assert all(isinstance(i, Event) for i in items[down_at:up_at + 1])  # nothing invented
    assert isinstance(items[-1], Reading) and down >= 0
    up = next(e for e in sink.events if e.code == "meter-line-up")
    assert dict(up.details)["down_ms"] > 0
    # Energy stays plausible across the outage (no step check over the gap is violated).
    assert all(r.flags == () for r in sink.readings)


def test_tcp_server_restart_is_a_line_outage(sink) -> None:
    async def main():
        sim = MeterSimulator({1: "sdm630"}, ChargingProfile.constant(0))
        port = await sim.start_tcp()
        source = tcp(port, [{"unit": 1, "map": "sdm630"}])
        task = asyncio.create_task(source.run(sink))
        try:
            await sink.wait(lambda: len(sink.readings) >= 16)
            await sim.stop()
            await sink.wait(lambda: "meter-line-down" in sink.codes())
            await sim.start_tcp(port=port)
            await sink.wait(lambda: "meter-line-up" in sink.codes())
            await sink.wait(lambda: isinstance(sink.items[-1], Reading))
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await sim.stop()

    run(main())
    assert sink.codes().count("meter-line-down") == 1


def test_implausible_counter_is_flagged_and_reported(sink) -> None:
    async def main():
        clock = ManualClock()
        sim = MeterSimulator({1: "abb_b23"}, ChargingProfile.constant(0), clock=clock)
        port = await sim.start_tcp()
        source = tcp(port, [{"unit": 1, "map": "abb_b23"}])
        try:
            assert await snapshot(source, sink) == 1
            sim.set_energy_wh(12_000_000, 1_234_500)  # import went backwards
            assert await source.poll_once(sink) == 1
        finally:
            source.link.close()
            await sim.stop()
        return source

    source = run(main())
    event = next(e for e in sink.events if e.code == "meter-energy-decreased")
    assert dict(event.details)["value_wh"] == 12_000_000
    flagged = [r for r in sink.readings if r.flags]
    assert [(r.name, r.value, r.flags) for r in flagged] == [
        ("1-0:1.8.0", 12_000_000, ("implausible",))]
    assert source.counters["meter-energy-decreased"] == 1


def test_registry_resolves_the_kinds() -> None:
    assert source_class("modbus-rtu") is ModbusRtuSource
    assert source_class("modbus-tcp") is ModbusTcpSource


def test_inline_custom_map_in_config() -> None:
    source = ModbusTcpSource.from_options("m", {
        "host": "127.0.0.1", "unit": 4,
        "map": {"model": "my meter", "rated_power_w": 3680, "function": 3,
                "register": [{"name": "1-0:1.8.0", "address": 0, "type": "uint32",
                              "scale": "10"}]}}, "station.toml")
    assert source.meters[0].config.unit == 4
    assert source.meters[0].config.meter_map.model == "my meter"


@pytest.mark.parametrize(("options", "key"), [
    ({"map": "sdm630"}, "sources.m.port"),
    ({"port": "/dev/ttyUSB0", "map": "sdm630", "baudrate": 12}, "sources.m.baudrate"),
    ({"port": "/dev/ttyUSB0", "map": "sdm630", "parity": "X"}, "sources.m.parity"),
    ({"port": "/dev/ttyUSB0", "map": "sdm630", "speed": 1}, "sources.m.speed"),
    ({"port": "/dev/ttyUSB0", "meters": []}, "sources.m.meters"),
    ({"port": "/dev/ttyUSB0", "meters": [{"unit": 1, "map": "sdm630"},
                                         {"unit": 1, "map": "em340"}]}, "sources.m.meters"),
    ({"port": "/dev/ttyUSB0", "meters": [{"unit": 0, "map": "sdm630"}]},
     "sources.m.meters[0].unit"),
    ({"port": "/dev/ttyUSB0", "meters": [{"unit": 1, "map": 5}]}, "sources.m.meters[0].map"),
    ({"port": "/dev/ttyUSB0", "meters": [{"unit": 1, "map": "sdm630", "x": 1}]},
     "sources.m.meters[0].x"),
    ({"port": "/dev/ttyUSB0", "map": "sdm630", "timeout_s": 0}, "sources.m.timeout_s"),
])
def test_config_errors_name_file_and_key(options, key) -> None:
    with pytest.raises(ConfigError) as info:
        ModbusRtuSource.from_options("m", options, "station.toml")
    assert info.value.file == "station.toml"
    assert info.value.key == key


def test_the_documented_config_is_valid() -> None:
    """docs/station.md's example config builds sources (docs generated from use)."""
    text = (Path(__file__).parents[3] / "docs" / "station.md").read_text(encoding="utf-8")
    block = text.split("```toml\n", 1)[1].split("```", 1)[0]
    sources = tomllib.loads(block.replace("/etc/edge-agent/maps/my-meter.toml", "em340"))
    built = [source_class(entry["kind"]).from_options(
        entry["id"], {k: v for k, v in entry.items() if k not in ("id", "kind")}, "station.md")
        for entry in sources["sources"]]
    assert [type(s).__name__ for s in built] == ["ModbusRtuSource", "ModbusTcpSource"]
    assert [m.config.unit for m in built[0].meters] == [1, 2]


def test_one_port_with_two_line_formats_is_refused(socat_pair, sink) -> None:
    async def main():
        a = rtu(socat_pair.agent, [{"unit": 1, "map": "sdm630"}])
        b = rtu(socat_pair.agent, [{"unit": 2, "map": "sdm630"}], baudrate=19200)
        try:
            assert await a.ensure_line(sink)
            with pytest.raises(AdapterUnavailable) as info:
                await b.ensure_line(sink)
            return info.value.reason
        finally:
            a.link.close()
            b.link.close()

    assert run(main()) == "line-conflict"
