"""Full-meter snapshots per second over Modbus RTU (paced line) and TCP, beside the wire limit.

A snapshot is every register of the map, read with the blocks the planner makes, decoded,
plausibility-checked and emitted as readings: the whole ModbusRtuSource/ModbusTcpSource
path against the pymodbus meter simulator.

The meter simulator (``python -m hil.sim.meter``) runs in its own process, as a meter is its
own device. RTU runs over ``hil.sim.line`` (its own process too, so its pacing thread does
not share the measured process's GIL), which delivers bytes no faster than the line and keeps the
3.5-character silence between frames. The wire limit is computed for the same frames:
per block, 8 request bytes + 5 + 2N reply bytes at ``bits_per_char / baud`` each, plus two
silent intervals (``rtu.LineFormat.transaction_time_s``). The same run also measures a bare
socat pty pair (no pacing) to show how far from a real line an unpaced pty is.

Usage: ``python bench/modbus.py [--map sdm630] [--seconds 4]``; prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from firmware_adapters.modbus.driver import ModbusRtuSource, ModbusSource, ModbusTcpSource
from firmware_adapters.modbus.mapfile import load_map
from firmware_adapters.modbus.registers import plan_blocks
from firmware_adapters.modbus.rtu import LineFormat


async def _discard(_item: object) -> None:
    return None


async def _rate(source: ModbusSource, seconds: float) -> float:
    if not await source.ensure_line(_discard):
        raise RuntimeError("the meter line did not open")
    await source.poll_once(_discard)  # warm-up: connection, first frames
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        done += await source.poll_once(_discard)
    elapsed = time.perf_counter() - start
    if source.counters:
        raise RuntimeError(f"faults during the benchmark: {dict(source.counters)}")
    return done / elapsed


def _wait_for(*paths: str) -> None:
    deadline = time.monotonic() + 10
    while not all(os.path.exists(p) for p in paths):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{paths} did not appear")
        time.sleep(0.01)


def _start_meter(map_name: str, *where: str) -> tuple[subprocess.Popen[bytes], str]:
    """The meter simulator in its own process, as a real meter is its own device."""
    process = subprocess.Popen([sys.executable, "-m", "hil.sim.meter", "--map", map_name,
                                "--profile", "0:7000", *where], stdout=subprocess.PIPE)
    assert process.stdout is not None
    line = process.stdout.readline().decode().strip()
    if not line.startswith("meter simulator on"):
        process.kill()
        raise RuntimeError(f"meter simulator did not start: {line!r}")
    return process, line


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    process.wait(timeout=10)


async def _rtu(map_name: str, agent: str, baud: int, seconds: float) -> float:
    source = ModbusRtuSource.from_options("bench", {
        "port": agent, "baudrate": baud, "map": map_name, "timeout_s": 1.0, "retries": 0,
        "interval_s": 0}, "bench")
    try:
        return await _rate(source, seconds)
    finally:
        source.link.close()


def _rtu_with_meter(map_name: str, agent: str, meter: str, baud: int, seconds: float) -> float:
    process, _ = _start_meter(map_name, "--serial", meter, "--baudrate", str(baud))
    try:
        return asyncio.run(_rtu(map_name, agent, baud, seconds))
    finally:
        _stop(process)


def rtu_paced(map_name: str, baud: int, seconds: float, folder: Path) -> float:
    agent, meter = str(folder / f"agent{baud}"), str(folder / f"meter{baud}")
    relay = subprocess.Popen([sys.executable, "-m", "hil.sim.line", "--baudrate", str(baud),
                              agent, meter], stdout=subprocess.DEVNULL)
    try:
        _wait_for(agent, meter)
        return _rtu_with_meter(map_name, agent, meter, baud, seconds)
    finally:
        relay.terminate()
        relay.wait(timeout=10)


def rtu_bare_pty(map_name: str, seconds: float, folder: Path) -> float:
    socat = shutil.which("socat")
    if socat is None:
        raise RuntimeError("socat is required")
    agent, meter = str(folder / "agent-bare"), str(folder / "meter-bare")
    pair = subprocess.Popen([socat, f"pty,raw,echo=0,link={meter}",
                             f"pty,raw,echo=0,link={agent}"], stderr=subprocess.DEVNULL)
    try:
        _wait_for(agent, meter)
        return _rtu_with_meter(map_name, agent, meter, 9600, seconds)
    finally:
        pair.terminate()
        pair.wait(timeout=10)


async def _tcp(port: int, map_name: str, seconds: float) -> float:
    source = ModbusTcpSource.from_options("bench", {
        "host": "127.0.0.1", "port": port, "map": map_name, "timeout_s": 1.0, "retries": 0,
        "interval_s": 0}, "bench")
    try:
        return await _rate(source, seconds)
    finally:
        source.link.close()


def tcp(map_name: str, seconds: float) -> float:
    process, line = _start_meter(map_name, "--tcp", "127.0.0.1:0")
    try:
        return asyncio.run(_tcp(int(line.rsplit(":", 1)[1]), map_name, seconds))
    finally:
        _stop(process)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--map", default="sdm630")
    parser.add_argument("--seconds", type=float, default=4.0)
    args = parser.parse_args()
    blocks = plan_blocks(load_map(args.map))
    figures: dict[str, object] = {
        "map": args.map, "transactions_per_snapshot": len(blocks),
        "registers_per_snapshot": sum(b.count for b in blocks)}
    with tempfile.TemporaryDirectory(prefix="bench-modbus-") as tmp:
        for baud in (9600, 115200):
            line = LineFormat(baud)
            limit = 1 / sum(line.transaction_time_s(b.count) for b in blocks)
            rate = rtu_paced(args.map, baud, args.seconds, Path(tmp))
            figures[f"rtu_{baud}_snapshots_per_s"] = round(rate, 2)
            figures[f"rtu_{baud}_wire_limit"] = round(limit, 2)
            figures[f"rtu_{baud}_ratio_to_wire_limit"] = round(rate / limit, 3)
        figures["rtu_bare_pty_snapshots_per_s"] = round(
            rtu_bare_pty(args.map, args.seconds / 2, Path(tmp)), 1)
    figures["tcp_snapshots_per_s"] = round(tcp(args.map, args.seconds / 2), 1)
    print(json.dumps(figures, sort_keys=True))


if __name__ == "__main__":
    main()
