"""OBD-II PIDs/s for one 6-PID set: python-OBD vs our ELM327 path vs our CAN path, one run.

Prints one JSON line. python-OBD and our ``elm327`` source each talk to their own
ELM327-emulator process (scenario ``car``) on a pty (the emulator drops its pty once a client
closes it, so one process cannot serve both in turn). python-OBD asks for the six PIDs one per
request (it has no multi-PID request); ours asks for all six in one (SAE J1979 allows six on
CAN). The two are measured in interleaved windows (ours is paused meanwhile by holding its
``emit``: backpressure), ``--rounds`` times, and the best window of each is kept, so background
load hits both alike. The CAN figure is our ``obd-can`` source against the in-process ECU
simulator on a python-can virtual bus. Counted: decoded PID values per second.

``emulator_ceiling_ratio`` is the most any client can gain from multi-PID requests against this
emulator (a bare blocking loop, 6-PID vs 1-PID requests, best of the rounds): the emulator
answers a 6-PID request by running its single-PID pipeline six times, so its CPU, not the
round trip, bounds the ratio. ``elm327_client_pids_per_s`` is our ELM327 path against an
instant scripted adapter (canned answers, no emulator): what our client alone sustains.

The UDS path (``uds_*``): UDS ReadDataByIdentifier DIDs of the ``hyundai-egmp`` profile
(multi-frame answers of up to 62 bytes) per second, our ``elm327`` source against
ELM327-emulator serving the profile (``hil.sim.elm_profile``) and our ``obd-can`` source
against the simulator on a virtual bus; the reference is a bare blocking loop sending the
same ATSH + 22 DID commands to the same emulator (``uds_emulator_ceiling_dids_per_s``).

    .venv/bin/python bench/obd.py [--seconds 0.5] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import can
import serial

# This file is bench/obd.py: drop its folder from the path so ``import obd`` is python-OBD.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent.resolve()]
import obd  # noqa: E402

from firmware_adapters.base import Source  # noqa: E402
from firmware_adapters.obd.can_driver import ObdCanSource  # noqa: E402
from firmware_adapters.obd.pids import PIDS_BY_KEY  # noqa: E402
from firmware_adapters.obd.serial_driver import Elm327Source  # noqa: E402
from firmware_adapters.obd.uds import load_profile  # noqa: E402
from hil.sim.ecu import EcuSimCore, EcuSimulator  # noqa: E402

SIX = ("ENGINE_LOAD", "COOLANT_TEMP", "RPM", "SPEED", "INTAKE_TEMP", "THROTTLE_POS")
NAMES = {PIDS_BY_KEY[k].name for k in SIX}


def start_emulator(tmp: Path, module: tuple[str, ...] = ("elm", "-s", "car")
                   ) -> tuple[subprocess.Popen[bytes], str]:
    tmp.mkdir()
    out = tmp / "elm.txt"
    root = str(Path(__file__).resolve().parents[1])
    proc = subprocess.Popen([sys.executable, "-m", *module, "-b", str(out)],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, cwd=tmp,
                            env={**os.environ, "PYTHONPATH": root})
    deadline = time.monotonic() + 20
    while not (out.exists() and out.read_text().strip()):
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("ELM327-emulator did not start")
        time.sleep(0.05)
    return proc, out.read_text().split()[0]


class Paced:
    """Runs one of our sources in a thread's event loop; counts its values per window."""

    def __init__(self, source: Source, names: set[str] | None = None) -> None:
        self.source = source
        self.names = NAMES if names is None else names
        self.count = 0
        self.go = threading.Event()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _main(self) -> None:
        async def emit(item: object) -> None:
            while not self.go.is_set():  # paused: hold the source right here
                if self.stop.is_set():
                    raise asyncio.CancelledError
                await asyncio.sleep(0.001)
            if getattr(item, "name", "") in self.names:
                self.count += 1

        task = asyncio.create_task(self.source.run(emit))
        while not self.stop.is_set():
            await asyncio.sleep(0.05)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass

    def start(self) -> None:
        self.go.set()
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.count:  # initialised and polling
            if time.monotonic() > deadline:
                raise SystemExit(f"{self.source.kind}: no values; {self.source.counters}")
            time.sleep(0.01)
        self.go.clear()
        time.sleep(0.05)

    def window(self, seconds: float) -> float:
        before, start = self.count, time.perf_counter()
        self.go.set()
        time.sleep(seconds)
        self.go.clear()
        return (self.count - before) / (time.perf_counter() - start)

    def close(self) -> None:
        self.stop.set()
        self.go.set()
        self.thread.join(5)


def python_obd_window(conn: obd.OBD, seconds: float) -> float:
    cmds = [getattr(obd.commands, k) for k in SIX]
    values, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for cmd in cmds:
            values += not conn.query(cmd, force=True).is_null()
    return values / (time.perf_counter() - start)


def ask(ser: serial.Serial, cmd: str) -> None:
    """One command, blocking until the prompt: the simplest possible client."""
    ser.write(cmd.encode() + b"\r")
    buf = b""
    while not buf.endswith(b">"):
        chunk = ser.read(ser.in_waiting or 1)
        if not chunk:
            raise SystemExit(f"emulator silent after {cmd!r}")
        buf += chunk


def ceiling_window(ser: serial.Serial, seconds: float) -> float:
    rates = []
    for cmd, pids in (("010D", 1), ("0104050C0D0F11", 6)):
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 2:
            ask(ser, cmd)
            n += pids
        rates.append(n / (time.perf_counter() - start))
    return rates[1] / rates[0]


def instant_adapter() -> None:
    """``--instant-adapter``: an ELM327 stand-in on a pty that answers at once with canned
    frames (the 6-PID answer of the emulator's first round). It measures our client alone."""
    import os
    import tty
    master, slave = os.openpty()
    tty.setraw(slave)
    print(os.ttyname(slave), flush=True)
    canned = {b"ATZ": b"ELM327 v1.5\r\r>", b"ATDPN": b"A6\r\r>",
              b"0100": b"7E8064100BE3FA813\r\r>",
              b"0104050C0D0F11": b"7E8100E4104FF055F0C\r7E821145F0D0A0F3911\r7E8222B\r\r>"}
    buf = b""
    while True:
        buf += os.read(master, 1024)
        while b"\r" in buf:
            line, _, buf = buf.partition(b"\r")
            if line in canned:
                os.write(master, canned[line])
            elif line.startswith(b"AT"):
                os.write(master, b"OK\r\r>")
            elif line.startswith(b"01") and line[2:4] in (b"20", b"40", b"60", b"80", b"A0"):
                os.write(master, b"7E80641" + line[2:4] + b"00000000\r\r>")
            else:
                os.write(master, b"NO DATA\r\r>")


def client_rate(seconds: float, rounds: int) -> float:
    proc = subprocess.Popen([sys.executable, __file__, "--instant-adapter"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        port = proc.stdout.readline().decode().strip()
        ours = Paced(Elm327Source("bench", port, poll_all_the_time()))
        ours.start()
        rate = max(ours.window(seconds) for _ in range(rounds))
        ours.close()
        return rate
    finally:
        proc.kill()
        proc.wait()


UDS_PROFILE = "hyundai-egmp"


def uds_poll() -> dict[str, object]:
    return {"periods_ns": {}, "read_vin": False, "dtc_period_ns": None, "sleep_after": 1000,
            "profile": load_profile(UDS_PROFILE), "did_period_ns": 1}


def did_window(source: Source, paced: Paced, seconds: float) -> float:
    before, start = source.requests["did"], time.perf_counter()
    paced.window(seconds)
    return (source.requests["did"] - before) / (time.perf_counter() - start)


def uds_rates(tmp: Path, seconds: float, rounds: int) -> dict[str, float]:
    profile = load_profile(UDS_PROFILE)
    names = set(profile.signals)
    proc, port = start_emulator(tmp / "uds", ("hil.sim.elm_profile", "--profile", UDS_PROFILE,
                                              "--"))
    raw_proc, raw_port = start_emulator(tmp / "uds-raw", ("hil.sim.elm_profile", "--profile",
                                                          UDS_PROFILE, "--"))
    try:
        src = Elm327Source("bench", port, uds_poll())
        ours = Paced(src, names)
        ours.start()
        elm = max(did_window(src, ours, seconds) for _ in range(rounds))
        ours.close()
        ser = serial.Serial(raw_port, 38400, timeout=5)
        for cmd in ("ATZ", "ATE0", "ATL0", "ATS0", "ATH1", "ATSP6", "0100"):
            ask(ser, cmd)
        cmds = [(f"ATSH{d.route.request_id:03X}", f"22{d.did:04X}") for d in profile.dids]
        best_raw = 0.0
        for _ in range(rounds):
            n, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                for header, req in cmds:
                    ask(ser, header)
                    ask(ser, req)
                    n += 1
            best_raw = max(best_raw, n / (time.perf_counter() - start))
        ser.close()
    finally:
        for p in (proc, raw_proc):
            p.kill()
            p.wait()
    channel = f"bench-uds-{uuid.uuid4().hex}"
    sim_bus = can.Bus(interface="virtual", channel=channel)
    sim = EcuSimulator(sim_bus, EcuSimCore(uds=profile)).start()
    try:
        can_src = ObdCanSource("bench", {"interface": "virtual", "channel": channel},
                               uds_poll())
        paced = Paced(can_src, names)
        paced.start()
        on_can = max(did_window(can_src, paced, seconds) for _ in range(rounds))
        paced.close()
    finally:
        sim.stop()
        sim_bus.shutdown()
    return {"uds_elm327_dids_per_s": round(elm, 1), "uds_can_dids_per_s": round(on_can, 1),
            "uds_emulator_ceiling_dids_per_s": round(best_raw, 1)}


def poll_all_the_time() -> dict[str, object]:
    return {"periods_ns": {PIDS_BY_KEY[k].pid: 1 for k in SIX}, "read_vin": False,
            "dtc_period_ns": None, "sleep_after": 1000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--instant-adapter", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.instant_adapter:
        instant_adapter()
    logging.getLogger("obd").setLevel(logging.CRITICAL)
    # SIGTERM (timeout, CI) must still run the finally below: emulators are stopped by pid.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    procs: list[subprocess.Popen[bytes]] = []
    best = {"python_obd": 0.0, "elm327": 0.0, "ceiling": 0.0}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            (p1, port1), (p2, port2), (p3, port3) = (start_emulator(Path(tmp) / n)
                                                    for n in "abc")
            procs += [p1, p2, p3]
            conn = obd.OBD(port1, fast=True, check_voltage=False)
            if not conn.is_connected():
                raise SystemExit("python-OBD could not connect to the emulator")
            ours = Paced(Elm327Source("bench", port2, poll_all_the_time()))
            ours.start()
            ser = serial.Serial(port3, 38400, timeout=5)  # the first 0100 searches 1.5 s
            for cmd in ("ATZ", "ATE0", "ATL0", "ATS0", "ATH1", "ATSP6", "0100"):
                ask(ser, cmd)
            for _ in range(args.rounds):
                best["python_obd"] = max(best["python_obd"], python_obd_window(conn, args.seconds))
                best["elm327"] = max(best["elm327"], ours.window(args.seconds))
                best["ceiling"] = max(best["ceiling"], ceiling_window(ser, args.seconds))
            ours.close()
            conn.close()
            ser.close()
        finally:
            for p in procs:
                p.kill()
                p.wait()
    client = client_rate(args.seconds, args.rounds)
    with tempfile.TemporaryDirectory() as tmp:
        uds = uds_rates(Path(tmp), args.seconds, args.rounds)
    channel = f"bench-{uuid.uuid4().hex}"
    sim_bus = can.Bus(interface="virtual", channel=channel)
    sim = EcuSimulator(sim_bus, EcuSimCore()).start()
    try:
        can_path = Paced(ObdCanSource("bench", {"interface": "virtual", "channel": channel},
                                      poll_all_the_time()))
        can_path.start()
        can_rate = max(can_path.window(args.seconds) for _ in range(args.rounds))
        can_path.close()
    finally:
        sim.stop()
        sim_bus.shutdown()
    print(json.dumps({
        "pids": list(SIX),
        "window_s": args.seconds,
        "rounds": args.rounds,
        "python_obd_pids_per_s": round(best["python_obd"], 1),
        "elm327_pids_per_s": round(best["elm327"], 1),
        "elm327_ratio": round(best["elm327"] / best["python_obd"], 2),
        "can_pids_per_s": round(can_rate, 1),
        "emulator_ceiling_ratio": round(best["ceiling"], 2),
        "elm327_client_pids_per_s": round(client, 1),
        **uds,
        "uds_profile": UDS_PROFILE,
        "python_obd_version": obd.__version__,
    }))


if __name__ == "__main__":
    main()
