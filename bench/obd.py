"""OBD-II PIDs/s for one 6-PID set: python-OBD vs our ELM327 path vs our CAN path, one run.

Prints one JSON line. Both ELM327 clients talk to ELM327-emulator (scenario ``car``) on a pty,
one after the other, each to a fresh emulator process (the emulator drops its pty once a client
closes it, so one process cannot serve both in turn); python-OBD queries the six PIDs one at a time (it has
no multi-PID request), ours asks for all six in one request (SAE J1979 allows six on CAN).
The CAN figure is our ``obd-can`` source against the in-process ECU simulator on a python-can
virtual bus. Counted: decoded PID values per second of wall time after initialisation.

    .venv/bin/python bench/obd.py [--seconds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import can

# This file is bench/obd.py: drop its folder from the path so ``import obd`` is python-OBD.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent.resolve()]
import obd  # noqa: E402

from firmware_adapters.base import Source  # noqa: E402
from firmware_adapters.obd.can_driver import ObdCanSource  # noqa: E402
from firmware_adapters.obd.pids import PIDS_BY_KEY  # noqa: E402
from firmware_adapters.obd.serial_driver import Elm327Source  # noqa: E402
from hil.ecu_sim import EcuSimCore, EcuSimulator  # noqa: E402

SIX = ("ENGINE_LOAD", "COOLANT_TEMP", "RPM", "SPEED", "INTAKE_TEMP", "THROTTLE_POS")
NAMES = {PIDS_BY_KEY[k].name for k in SIX}


def start_emulator(tmp: Path) -> tuple[subprocess.Popen[bytes], str]:
    tmp.mkdir()
    out = tmp / "elm.txt"
    proc = subprocess.Popen([sys.executable, "-m", "elm", "-s", "car", "-b", str(out)],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while not (out.exists() and out.read_text().strip()):
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("ELM327-emulator did not start")
        time.sleep(0.05)
    return proc, out.read_text().split()[0]


def python_obd_rate(port: str, seconds: float) -> float:
    logging.getLogger("obd").setLevel(logging.CRITICAL)
    conn = obd.OBD(port, fast=True, check_voltage=False)
    if not conn.is_connected():
        raise SystemExit("python-OBD could not connect to the emulator")
    cmds = [getattr(obd.commands, k) for k in SIX]
    values, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for cmd in cmds:
            values += not conn.query(cmd, force=True).is_null()
    elapsed = time.perf_counter() - start
    conn.close()
    return values / elapsed


async def our_rate(source: Source, seconds: float) -> float:
    """Decoded values of the six PIDs per second, from the first one on."""
    count, first = 0, 0.0

    async def emit(item: object) -> None:
        nonlocal count, first
        if getattr(item, "name", "") in NAMES:
            if not count:
                first = time.perf_counter()
            count += 1

    task = asyncio.create_task(source.run(emit))
    deadline = time.monotonic() + 30
    while not count:
        if time.monotonic() > deadline:
            task.cancel()
            raise SystemExit(f"{source.kind}: no PID values in 30 s; counters {source.counters}")
        await asyncio.sleep(0.01)
    await asyncio.sleep(seconds)
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    return count / (time.perf_counter() - first)


def poll_all_the_time() -> dict[str, object]:
    return {"periods_ns": {PIDS_BY_KEY[k].pid: 1 for k in SIX}, "read_vin": False,
            "dtc_period_ns": None, "sleep_after": 1000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        emulator, port = start_emulator(Path(tmp) / "a")
        try:
            python_obd = python_obd_rate(port, args.seconds)
        finally:
            emulator.kill()
            emulator.wait()
        emulator, port = start_emulator(Path(tmp) / "b")
        try:
            elm = asyncio.run(our_rate(Elm327Source("bench", port, poll_all_the_time()),
                                       args.seconds))
        finally:
            emulator.kill()
            emulator.wait()
    channel = f"bench-{uuid.uuid4().hex}"
    sim_bus = can.Bus(interface="virtual", channel=channel)
    sim = EcuSimulator(sim_bus, EcuSimCore()).start()
    try:
        can_rate = asyncio.run(our_rate(ObdCanSource(
            "bench", {"interface": "virtual", "channel": channel}, poll_all_the_time()),
            args.seconds))
    finally:
        sim.stop()
        sim_bus.shutdown()
    print(json.dumps({
        "pids": list(SIX),
        "seconds": args.seconds,
        "python_obd_pids_per_s": round(python_obd, 1),
        "elm327_pids_per_s": round(elm, 1),
        "elm327_ratio": round(elm / python_obd, 2),
        "can_pids_per_s": round(can_rate, 1),
        "python_obd_version": obd.__version__,
    }))


if __name__ == "__main__":
    main()
