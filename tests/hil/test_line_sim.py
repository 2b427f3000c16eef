"""The paced line simulator: bytes intact, delivered no faster than the line allows."""

from __future__ import annotations

import asyncio
import os
import select
import subprocess
import sys
import time
import tty
from pathlib import Path

import pytest

from firmware_adapters.modbus.driver import ModbusRtuSource
from firmware_adapters.modbus.mapfile import load_map
from firmware_adapters.modbus.registers import plan_blocks
from firmware_adapters.modbus.rtu import LineFormat
from hil.sim.line import LineSimulator
from hil.sim.meter import ChargingProfile, MeterSimulator


def open_port(path: str) -> int:
    fd = os.open(path, os.O_RDWR | os.O_NOCTTY)
    tty.setraw(fd)
    return fd


def read_exactly(fd: int, count: int, timeout: float = 5.0) -> tuple[bytes, float]:
    """Bytes and the time the last one arrived."""
    data, deadline = b"", time.monotonic() + timeout
    while len(data) < count:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        assert ready, f"only {len(data)} of {count} bytes arrived"
        data += os.read(fd, count - len(data))
    return data, time.perf_counter()


@pytest.fixture
def line(tmp_path: Path, request: pytest.FixtureRequest):
    fmt = getattr(request, "param", LineFormat(9600))
    sim = LineSimulator(fmt, str(tmp_path / "a"), str(tmp_path / "b")).start()
    ports = open_port(sim.paths[0]), open_port(sim.paths[1])
    yield fmt, sim, ports
    for fd in ports:
        os.close(fd)
    sim.stop()


@pytest.mark.parametrize("line", [LineFormat(9600), LineFormat(9600, parity="E"),
                                  LineFormat(19200, stopbits=2)], indirect=True)
def test_bytes_arrive_intact_at_line_speed(line) -> None:
    fmt, sim, (a, b) = line
    payload = bytes(range(256))[:192]
    start = time.perf_counter()
    os.write(a, payload)
    got, end = read_exactly(b, len(payload))
    assert got == payload
    wire = len(payload) * fmt.char_time_s
    assert wire * 0.95 <= end - start <= wire * 3 + 0.3  # upper bound: not stuck (shared CPU)
    assert sim.bytes_relayed == len(payload)


def test_half_duplex_both_directions_share_the_wire(line) -> None:
    fmt, _, (a, b) = line
    start = time.perf_counter()
    os.write(a, b"\x01" * 96)
    os.write(b, b"\x02" * 96)
    got_b, end_b = read_exactly(b, 96)
    got_a, end_a = read_exactly(a, 96)
    assert got_b == b"\x01" * 96 and got_a == b"\x02" * 96
    # 192 characters on one wire plus one inter-frame silence.
    assert max(end_a, end_b) - start >= 192 * fmt.char_time_s * 0.95


def test_a_modbus_read_takes_its_wire_time(tmp_path: Path) -> None:
    """A full SDM630 snapshot over the paced line takes at least the frames' wire time;
    over a bare pty it would take well under a millisecond."""
    fmt = LineFormat(9600)

    async def main(sim: LineSimulator) -> tuple[float, int]:
        meter = MeterSimulator({1: "sdm630"}, ChargingProfile.constant(7_000))
        await meter.start_serial(sim.paths[1], baudrate=fmt.baudrate)
        source = ModbusRtuSource.from_options(
            "m", {"port": sim.paths[0], "map": "sdm630", "timeout_s": 1.0, "retries": 0},
            "test")
        emitted = []

        async def emit(item) -> None:
            emitted.append(item)

        try:
            assert await source.ensure_line(emit)
            start = time.perf_counter()
            done = await source.poll_once(emit)
            return time.perf_counter() - start, done
        finally:
            source.link.close()
            await meter.stop()

    with LineSimulator(fmt, str(tmp_path / "agent"), str(tmp_path / "meter")) as sim:
        elapsed, done = asyncio.run(asyncio.wait_for(main(sim), 30))
    wire = sum(fmt.transaction_time_s(b.count) for b in plan_blocks(load_map("sdm630")))
    assert done == 1
    assert wire * 0.95 <= elapsed <= wire * 3 + 0.3


def test_runs_as_a_process(tmp_path: Path) -> None:
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    process = subprocess.Popen([sys.executable, "-m", "hil.sim.line", "--baudrate", "19200",
                                a, b], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert process.stdout is not None
        assert b"line simulator 19200" in process.stdout.readline()
        fa, fb = open_port(a), open_port(b)
        os.write(fb, b"hello meter")
        assert read_exactly(fa, 11)[0] == b"hello meter"
        os.close(fa)
        os.close(fb)
    finally:
        process.terminate()
        process.wait(timeout=10)
    assert process.returncode == 0
    assert not os.path.lexists(a) and not os.path.lexists(b)
