"""Steady-state cost on a Pi: CPU, wakeups and memory of an idle-rate agent, beside a naive one.

Two set-ups, each run for ``--seconds`` (60 by default) with our agent and then with a naive
agent measured in the same run, each against its own simulator in ANOTHER process and the
same mosquitto:

* vehicle: ``edge-agent run`` with an ``elm327`` source polling 4 PIDs at 1 Hz from the
  ELM327-emulator on a pty, against a naive loop: python-OBD asks the same 4 PIDs once a
  second and publishes each as JSON with paho (QoS 1).
* station: ``edge-agent run`` with a ``modbus-tcp`` source reading one SDM630 simulator
  (``python -m hil.sim.meter``) once a second, against a naive loop: a pymodbus client reads
  the same register blocks once a second, decodes them as float32 and publishes JSON.

Ours signs, chains and spools every batch (SQLite, WAL) before publishing; the naive ones
do none of that. Figures per agent process, from /proc through psutil over the window
(after a warm-up): CPU % of one core, wakeups per second (voluntary + involuntary context
switches of all its threads: each is the process waking up or being preempted), RSS, and
CPU microseconds per reading. Goal (issue 18): ours at most the naive agent's CPU per reading.

    .venv/bin/python bench/steady.py [--seconds 60] [--warmup 10]

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
EDGE_AGENT = str(Path(sys.executable).parent / "edge-agent")
PIDS = ("SPEED", "RPM", "COOLANT_TEMP", "ENGINE_LOAD")


# --- the naive agents (run as `bench/steady.py --naive-vehicle PORT URL COUNTFILE`) -------

def naive_vehicle(port: str, url: str, count_file: Path) -> None:
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent]
    import obd
    import paho.mqtt.client as paho

    client = _paho(url, "naive-vehicle")
    conn = obd.OBD(port, fast=False, timeout=5)
    commands = [obd.commands[name] for name in PIDS]
    readings = 0
    while True:
        started = time.monotonic()
        for command in commands:
            answer = conn.query(command)
            if answer.value is not None:
                value = getattr(answer.value, "magnitude", answer.value)
                client.publish("naive/vehicle", json.dumps(
                    {"name": command.name, "value": float(value), "ts": time.time()}), qos=1)
                readings += 1
        count_file.write_text(str(readings))
        time.sleep(max(0.0, 1.0 - (time.monotonic() - started)))
    del paho


def naive_station(port: int, url: str, count_file: Path) -> None:
    from pymodbus.client import ModbusTcpClient

    from firmware_adapters.modbus.mapfile import load_map
    from firmware_adapters.modbus.registers import plan_blocks

    client = _paho(url, "naive-station")
    meter = ModbusTcpClient("127.0.0.1", port=port, timeout=2)
    meter.connect()
    blocks = plan_blocks(load_map("sdm630"))
    readings = 0
    while True:
        started = time.monotonic()
        values: dict[str, float] = {}
        for block in blocks:
            read = meter.read_input_registers if block.function == 4 else \
                meter.read_holding_registers
            reply = read(block.address, count=block.count, device_id=1)
            if reply.isError():
                continue
            for spec in block.specs:
                offset = spec.address - block.address
                words = reply.registers[offset:offset + 2]
                if len(words) == 2:
                    values[spec.name] = struct.unpack(">f", struct.pack(">HH", *words))[0]
        client.publish("naive/station", json.dumps({"ts": time.time(), **values}), qos=1)
        readings += len(values)
        count_file.write_text(str(readings))
        time.sleep(max(0.0, 1.0 - (time.monotonic() - started)))


def _paho(url: str, client_id: str):  # type: ignore[no-untyped-def]
    import paho.mqtt.client as paho

    host, port = url.removeprefix("mqtt://").rsplit(":", 1)
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id)
    client.connect(host, int(port))
    client.loop_start()
    return client


# --- measuring ------------------------------------------------------------------------------

def measure(pid: int, readings, warmup_s: float, seconds: float) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """CPU, context switches and readings of process ``pid`` over a window after a warm-up."""
    proc = psutil.Process(pid)
    time.sleep(warmup_s)
    cpu0, ctx0, n0, t0 = _cpu(proc), _ctx(proc), readings(), time.monotonic()
    time.sleep(seconds)
    cpu1, ctx1, n1, t1 = _cpu(proc), _ctx(proc), readings(), time.monotonic()
    elapsed, cpu, count = t1 - t0, cpu1 - cpu0, max(n1 - n0, 1)
    return {"cpu_pct": round(100 * cpu / elapsed, 2),
            "wakeups_per_s": round((ctx1 - ctx0) / elapsed, 1),
            "rss_mb": round(proc.memory_info().rss / 2**20, 1),
            "readings_per_s": round((n1 - n0) / elapsed, 2),
            "cpu_us_per_reading": round(1e6 * cpu / count, 1)}


def _cpu(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return times.user + times.system


def _ctx(proc: psutil.Process) -> int:
    switches = proc.num_ctx_switches()
    return switches.voluntary + switches.involuntary


def _status_readings(path: Path) -> int:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return 0
    return sum(source["readings"] for source in data.get("sources", []))


def _file_count(path: Path) -> int:
    try:
        return int(path.read_text() or 0)
    except (OSError, ValueError):
        return 0


def _wait(predicate, what: str, timeout_s: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"steady.py: {what} did not happen in {timeout_s:g} s")
        time.sleep(0.1)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _emulator(folder: Path) -> tuple[subprocess.Popen[bytes], str]:
    folder.mkdir()
    out = folder / "elm.txt"
    proc = subprocess.Popen([sys.executable, "-m", "elm", "-s", "car", "-b", str(out)],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, cwd=folder)
    _wait(lambda: out.exists() and out.read_text().strip(), "ELM327-emulator start")
    return proc, out.read_text().split()[0]


def _meter() -> tuple[subprocess.Popen[bytes], int]:
    proc = subprocess.Popen([sys.executable, "-m", "hil.sim.meter", "--map", "sdm630",
                             "--tcp", "127.0.0.1:0", "--profile", "0:7000"],
                            stdout=subprocess.PIPE, cwd=ROOT)
    assert proc.stdout is not None
    line = proc.stdout.readline().decode().strip()
    if not line.startswith("meter simulator on tcp"):
        proc.kill()
        raise SystemExit(f"meter simulator did not start: {line!r}")
    return proc, int(line.rsplit(":", 1)[1])


def _our_agent(folder: Path, role: str, source: str, url: str,
               warmup_s: float, seconds: float) -> dict[str, float]:
    state = folder / "state"
    subprocess.run([EDGE_AGENT, "keys", "init", "--state-dir", str(state), "--device-id",
                    f"bench-{role}", "--no-qr"], check=True, capture_output=True)
    config = folder / "agent.toml"
    config.write_text(f"""[device]
role = "{role}"
state_dir = "{state}"

[batch]
max_readings = 50
max_age_ms = 1000

{source}

[mqtt]
url = "{url}"

[status]
interval_s = 2.0
""")
    status = state / "status.json"
    proc = subprocess.Popen([EDGE_AGENT, "run", "--config", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait(lambda: _status_readings(status) > 0, f"our {role} agent's first readings")
        return measure(proc.pid, lambda: _status_readings(status), warmup_s, seconds)
    finally:
        _stop(proc)


def _naive_agent(flag: str, args: list[str], count: Path,
                 warmup_s: float, seconds: float) -> dict[str, float]:
    proc = subprocess.Popen([sys.executable, __file__, flag, *args, str(count)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    try:
        _wait(lambda: _file_count(count) > 0, f"the naive agent ({flag}) first readings")
        return measure(proc.pid, lambda: _file_count(count), warmup_s, seconds)
    finally:
        _stop(proc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--warmup", type=float, default=10.0)
    parser.add_argument("--naive-vehicle", nargs=3, metavar=("PORT", "URL", "COUNT"))
    parser.add_argument("--naive-station", nargs=3, metavar=("PORT", "URL", "COUNT"))
    args = parser.parse_args()
    if args.naive_vehicle:
        naive_vehicle(args.naive_vehicle[0], args.naive_vehicle[1], Path(args.naive_vehicle[2]))
        return
    if args.naive_station:
        naive_station(int(args.naive_station[0]), args.naive_station[1],
                      Path(args.naive_station[2]))
        return

    sys.path.insert(0, str(ROOT))
    from hil.broker import Mosquitto

    figures: dict[str, object] = {"seconds": args.seconds, "pids": len(PIDS), "rate_hz": 1}
    with tempfile.TemporaryDirectory(prefix="steady-") as tmp:
        folder = Path(tmp)
        broker = Mosquitto(folder / "broker").start()
        try:
            pids = ", ".join(f"{name} = 1.0" for name in PIDS)
            emulator, port = _emulator(folder / "elm-ours")
            try:
                ours = _our_agent(folder / "vehicle", "vehicle", f"""[[sources]]
id = "obd0"
kind = "elm327"
port = "{port}"
pids = {{ {pids} }}
dtc_period_s = 0
read_vin = false
""", broker.url, args.warmup, args.seconds)
            finally:
                _stop(emulator)
            emulator, port = _emulator(folder / "elm-naive")
            try:
                naive = _naive_agent("--naive-vehicle", [port, broker.url],
                                     folder / "naive-vehicle.count", args.warmup, args.seconds)
            finally:
                _stop(emulator)
            figures["vehicle"] = {"ours": ours, "naive_python_obd_paho": naive,
                                  "cpu_per_reading_ratio": round(
                                      ours["cpu_us_per_reading"] / naive["cpu_us_per_reading"], 2)}
            meter, meter_port = _meter()
            try:
                ours = _our_agent(folder / "station", "station", f"""[[sources]]
id = "meter0"
kind = "modbus-tcp"
host = "127.0.0.1"
port = {meter_port}
map = "sdm630"
interval_s = 1.0
""", broker.url, args.warmup, args.seconds)
                naive = _naive_agent("--naive-station", [str(meter_port), broker.url],
                                     folder / "naive-station.count", args.warmup, args.seconds)
            finally:
                _stop(meter)
            figures["station"] = {"ours": ours, "naive_pymodbus_paho": naive,
                                  "cpu_per_reading_ratio": round(
                                      ours["cpu_us_per_reading"] / naive["cpu_us_per_reading"], 2)}
        finally:
            broker.kill()
    figures["cores"] = os.cpu_count()
    figures["load_1min"] = round(os.getloadavg()[0], 2)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
