"""Steady-state cost on a Pi: CPU, wakeups and memory of an idle-rate agent, beside a naive one.

Two set-ups, each run for ``--seconds`` (60 by default) with our agent and then with a naive
agent measured in the same run, each against its own simulator in ANOTHER process and the
same mosquitto:

* vehicle: ``edge-agent run`` with an ``elm327`` source polling 4 PIDs at 1 Hz from the
  ELM327-emulator on a pty, against a naive loop: python-OBD asks the same 4 PIDs once a
  second and publishes them as one JSON message with paho (QoS 1).
* station: ``edge-agent run`` with a ``modbus-tcp`` source reading one SDM630 simulator
  (``python -m hil.sim.meter``) once a second, against a naive loop: a pymodbus client reads
  the same register blocks once a second, decodes them as float32 and publishes JSON.

Fair by construction: the same PIDs and registers at the same rate, one QoS 1 message a
second each (ours: one envelope per poll cycle, ``[batch] max_age_ms = 900``: with the
default 1000 a cycle's readings arrive about when the last batch is due, and half the
envelopes carry two cycles, fewer messages than the naive agent sends), the same
broker. Ours signs, chains and spools every batch (SQLite, WAL, ``synchronous=FULL``: an
fsync per commit) before publishing; the naive ones do none of that. Ours writes its
status file every 2 s (the default) to a tmpfs ``$RUNTIME_DIRECTORY``, as under systemd;
the naive ones report their count only when the bench asks (SIGUSR1), so the bench adds
nothing to their cost.

Figures per agent process over the window (after a warm-up), from /proc: CPU % of one
core (all threads, and any child processes), wakeups per second (voluntary context
switches of ALL its threads, /proc/<pid>/task/*/status: each is a thread going to sleep
to be woken again; the process-level figure psutil gives counts the main thread only),
involuntary switches per second (preemption: the machine's load, not the agent), RSS,
readings and QoS 1 messages per second (from the agents' own counts and timestamps) and
CPU microseconds per reading. Goal (issue 18): ours at most the naive agent's CPU per reading.

The station round also measures the register reads alone, at the same one cycle a second
(``reads_alone_pymodbus_sync``: the naive agent's client; ``..._async``: ours), so the
share of each agent's CPU that pymodbus takes is seen beside the rest.

``--baseline DIR`` also measures our agent run from another checkout (e.g. a worktree of
the previous commit) in the same run: before/after on the same machine and load.

    .venv/bin/python bench/steady.py [--seconds 60] [--warmup 10] [--rounds N] [--baseline DIR]

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
EDGE_AGENT = str(Path(sys.executable).parent / "edge-agent")
PIDS = ("SPEED", "RPM", "COOLANT_TEMP", "ENGINE_LOAD")


# --- the naive agents (run as `bench/steady.py --naive-vehicle PORT URL COUNTFILE`) -------

class _Count:
    """The naive agent's reading count, written to a file only when the bench asks
    (SIGUSR1): "<count> <time.time()>" (temp file and rename: never read half-written)."""

    def __init__(self, path: Path) -> None:
        self.path, self.readings, self.messages = path, 0, 0
        signal.signal(signal.SIGUSR1, self._report)
        self._report(signal.SIGUSR1, None)  # "0 0 <now>": the handler is in place

    def _report(self, signum: int, frame: object) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(f"{self.readings} {self.messages} {time.time()}")
        tmp.replace(self.path)


def naive_vehicle(port: str, url: str, count_file: Path) -> None:
    count = _Count(count_file)  # first: SIGUSR1 would end a process without the handler
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent]
    import obd

    client = _paho(url, "naive-vehicle")
    conn = obd.OBD(port, fast=False, timeout=5)
    commands = [obd.commands[name] for name in PIDS]
    while True:
        started = time.monotonic()
        values = {}
        for command in commands:
            answer = conn.query(command)
            if answer.value is not None:
                values[command.name] = float(getattr(answer.value, "magnitude", answer.value))
        if values:  # one message a second, as ours sends one envelope a second
            client.publish("naive/vehicle", json.dumps({"ts": time.time(), **values}), qos=1)
            count.readings += len(values)
            count.messages += 1
        time.sleep(max(0.0, 1.0 - (time.monotonic() - started)))


def naive_station(port: int, url: str, count_file: Path) -> None:
    count = _Count(count_file)  # first: SIGUSR1 would end a process without the handler
    from pymodbus.client import ModbusTcpClient

    from firmware_adapters.modbus.mapfile import load_map
    from firmware_adapters.modbus.registers import plan_blocks

    client = _paho(url, "naive-station")
    meter = ModbusTcpClient("127.0.0.1", port=port, timeout=2)
    meter.connect()
    blocks = plan_blocks(load_map("sdm630"))
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
        count.readings += len(values)
        count.messages += 1
        time.sleep(max(0.0, 1.0 - (time.monotonic() - started)))


def pymodbus_floor(port: int, seconds: float) -> None:
    """The register reads alone, the values not even decoded, at the agents' rate (one poll
    cycle a second: every block of the SDM630 map once): CPU per cycle and per reading (a
    cycle gives one reading per register of the map, as the naive agent counts them)
    through pymodbus's blocking client (the naive agent's) for ``seconds``, then its asyncio
    client (ours) for as long, against the same simulator. At one cycle a second the code
    runs with cold caches and costs several times what it does back to back, so only a
    paced figure compares with the agents'. Prints one JSON object: the share of each
    agent's CPU that its reads alone take."""
    import asyncio

    from pymodbus.client import AsyncModbusTcpClient, ModbusTcpClient

    from firmware_adapters.modbus.mapfile import load_map
    from firmware_adapters.modbus.registers import plan_blocks

    blocks = plan_blocks(load_map("sdm630"))
    readings = sum(len(block.specs) for block in blocks)
    cycles = max(1, int(seconds))

    def figures(started: float) -> dict[str, float]:
        per_cycle = (time.process_time() - started) / cycles * 1e6
        return {"cpu_us_per_cycle": round(per_cycle, 1),
                "cpu_us_per_reading": round(per_cycle / readings, 1)}

    def reads(client):  # type: ignore[no-untyped-def]
        """One call per block, the same for both clients (the async ones return awaitables)."""
        return [functools.partial(client.read_input_registers if block.function == 4 else
                                  client.read_holding_registers, block.address,
                                  count=block.count, device_id=1) for block in blocks]

    sync = ModbusTcpClient("127.0.0.1", port=port, timeout=2)
    sync.connect()
    cycle = reads(sync)
    started = time.process_time()
    for _ in range(cycles):
        begun = time.monotonic()
        for read in cycle:
            read()
        time.sleep(max(0.0, 1.0 - (time.monotonic() - begun)))
    blocking = figures(started)
    sync.close()

    async def run_async() -> dict[str, float]:
        client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=2)
        await client.connect()
        cycle = reads(client)
        started = time.process_time()
        for _ in range(cycles):
            begun = time.monotonic()
            for read in cycle:
                await read()
            await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - begun)))
        out = figures(started)
        client.close()
        return out

    print(json.dumps({"reads_alone_pymodbus_sync": blocking,
                      "reads_alone_pymodbus_async": asyncio.run(run_async())}))


def _paho(url: str, client_id: str):  # type: ignore[no-untyped-def]
    import paho.mqtt.client as paho

    host, port = url.removeprefix("mqtt://").rsplit(":", 1)
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id)
    client.connect(host, int(port))
    client.loop_start()
    return client


# --- measuring ------------------------------------------------------------------------------

Count = Callable[[], tuple[int, int, float]]  # (readings, messages published, time.time())


def measure(pid: int, readings: Count, warmup_s: float, seconds: float) -> dict[str, float]:
    """CPU, context switches and readings of process ``pid`` over a window after a warm-up.
    The reading rate comes from the agent's own counts and their timestamps, so a count
    that is a little stale (a status file written every 2 s) does not skew it."""
    proc = psutil.Process(pid)
    time.sleep(warmup_s)
    cpu0, (vol0, inv0), (n0, m0, at0), t0 = (_cpu(proc), _switches(pid), readings(),
                                             time.monotonic())
    time.sleep(seconds)
    cpu1, (vol1, inv1), (n1, m1, at1), t1 = (_cpu(proc), _switches(pid), readings(),
                                             time.monotonic())
    elapsed, cpu = t1 - t0, cpu1 - cpu0
    rate = (n1 - n0) / (at1 - at0) if at1 > at0 else 0.0
    messages = (m1 - m0) / (at1 - at0) if at1 > at0 else 0.0
    return {"cpu_pct": round(100 * cpu / elapsed, 2),
            "wakeups_per_s": round((vol1 - vol0) / elapsed, 1),
            "preempted_per_s": round((inv1 - inv0) / elapsed, 1),
            "threads": proc.num_threads(),
            "rss_mb": round(proc.memory_info().rss / 2**20, 1),
            "readings_per_s": round(rate, 2),
            "messages_per_s": round(messages, 2),  # QoS 1 publishes (ours: envelopes)
            "cpu_us_per_reading": round(1e6 * cpu / elapsed / rate, 1) if rate else None}


def _cpu(proc: psutil.Process) -> float:
    """CPU seconds of every thread of ``proc`` and of its children, read from the kernel's
    per-process CPU clock (clock_gettime of the clock id clock_getcpuclockid(3) returns:
    ``(~pid << 3) | CPUCLOCK_SCHED``, nanoseconds; Python has no clock_getcpuclockid).
    psutil's cpu_times counts clock ticks (10 ms): too coarse for an agent that needs a
    few ms a second."""
    total = 0.0
    for each in (proc, *proc.children(recursive=True)):
        with contextlib.suppress(OSError):
            total += time.clock_gettime(((~each.pid) << 3) | 2)
    return total


def _switches(pid: int) -> tuple[int, int]:
    """Voluntary and involuntary context switches summed over every thread of ``pid``."""
    voluntary = involuntary = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            for line in (task / "status").read_text().splitlines():
                if line.startswith("voluntary_ctxt_switches:"):
                    voluntary += int(line.split()[1])
                elif line.startswith("nonvoluntary_ctxt_switches:"):
                    involuntary += int(line.split()[1])
    return voluntary, involuntary


def _status_readings(path: Path) -> tuple[int, int, float]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return 0, 0, 0.0
    return (sum(source["readings"] for source in data.get("sources", [])),
            (data.get("uplink") or {}).get("published", 0), data.get("updated_ns", 0) / 1e9)


def _signalled_count(pid: int, path: Path) -> tuple[int, int, float]:
    """Ask the naive agent for its count (SIGUSR1) and wait for the answer."""
    path.unlink(missing_ok=True)
    os.kill(pid, signal.SIGUSR1)
    _wait(path.exists, "the naive agent's count", 10.0)
    count, messages, at = path.read_text().split()
    return int(count), int(messages), float(at)


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
               warmup_s: float, seconds: float, tree: Path | None = None) -> dict[str, float]:
    """``edge-agent run`` of this checkout, or of the checkout ``tree`` (--baseline)."""
    folder.mkdir(parents=True)
    state = folder / "state"
    env = dict(os.environ)
    command = [EDGE_AGENT]
    if tree is not None:  # its agent and adapters first on the path, our venv's libraries
        # (run in it: "" comes first on the path; our editable install's hook comes last)
        env["PYTHONPATH"] = str(tree)
        command = [sys.executable, "-c", "import sys; from agent.cli import main; "
                   "sys.argv[0] = 'edge-agent'; sys.exit(main())"]
    subprocess.run([*command, "keys", "init", "--state-dir", str(state), "--device-id",
                    f"bench-{role}", "--no-qr"], check=True, capture_output=True, env=env,
                   cwd=tree)
    config = folder / "agent.toml"
    config.write_text(f"""[device]
role = "{role}"
state_dir = "{state}"

[batch]
max_readings = 50
max_age_ms = 900

{source}

[mqtt]
url = "{url}"

[status]
interval_s = 2.0
""")
    # The status file on tmpfs, as under systemd (RuntimeDirectory=, agent/status.py).
    run_dir = Path(tempfile.mkdtemp(prefix="steady-run-", dir=_tmpfs()))
    env["RUNTIME_DIRECTORY"] = str(run_dir)
    status = run_dir / "status.json"
    proc = subprocess.Popen([*command, "run", "--config", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            cwd=tree)
    try:
        _wait(lambda: _status_readings(status)[0] > 0, f"our {role} agent's first readings")
        return measure(proc.pid, lambda: _status_readings(status), warmup_s, seconds)
    finally:
        _stop(proc)
        for leftover in run_dir.iterdir():
            leftover.unlink()
        run_dir.rmdir()


def _tmpfs() -> str | None:
    return "/dev/shm" if os.path.isdir("/dev/shm") else None


def _naive_agent(flag: str, args: list[str], count: Path,
                 warmup_s: float, seconds: float) -> dict[str, float]:
    proc = subprocess.Popen([sys.executable, __file__, flag, *args, str(count)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    try:
        _wait(count.exists, f"the naive agent ({flag}) start")
        _wait(lambda: _signalled_count(proc.pid, count)[0] > 0,
              f"the naive agent ({flag}) first readings")
        return measure(proc.pid, lambda: _signalled_count(proc.pid, count), warmup_s, seconds)
    finally:
        _stop(proc)


VEHICLE_SOURCE = """[[sources]]
id = "obd0"
kind = "elm327"
port = "{port}"
pids = {{ {pids} }}
dtc_period_s = 0
read_vin = false
"""
STATION_SOURCE = """[[sources]]
id = "meter0"
kind = "modbus-tcp"
host = "127.0.0.1"
port = {port}
map = "sdm630"
interval_s = 1.0
"""


def _progress(text: str) -> None:
    print(f"steady.py: {text}", file=sys.stderr, flush=True)


def _ratio(ours: dict[str, float], naive: dict[str, float]) -> float | None:
    if not ours["cpu_us_per_reading"] or not naive["cpu_us_per_reading"]:
        return None
    return round(ours["cpu_us_per_reading"] / naive["cpu_us_per_reading"], 2)


def _vehicle_round(folder: Path, url: str, args: argparse.Namespace, tag: str
                   ) -> dict[str, dict[str, float]]:
    pids = ", ".join(f"{name} = 1.0" for name in PIDS)
    runs: dict[str, dict[str, float]] = {}
    for name, tree in _trees(args):
        emulator, port = _emulator(folder / f"elm-{name}{tag}")
        try:
            _progress(f"vehicle{tag}, {name}: {args.warmup + args.seconds:g} s")
            runs[name] = _our_agent(folder / f"vehicle-{name}{tag}", "vehicle",
                                    VEHICLE_SOURCE.format(port=port, pids=pids), url,
                                    args.warmup, args.seconds, tree)
        finally:
            _stop(emulator)
    emulator, port = _emulator(folder / f"elm-naive{tag}")
    try:
        _progress(f"vehicle{tag}, naive: {args.warmup + args.seconds:g} s")
        runs[NAIVE["vehicle"]] = _naive_agent("--naive-vehicle", [port, url],
                                              folder / f"naive-vehicle{tag}.count",
                                              args.warmup, args.seconds)
    finally:
        _stop(emulator)
    return runs


def _station_round(folder: Path, url: str, args: argparse.Namespace, tag: str
                   ) -> dict[str, dict[str, float]]:
    runs: dict[str, dict[str, float]] = {}
    meter, port = _meter()
    try:
        for name, tree in _trees(args):
            _progress(f"station{tag}, {name}: {args.warmup + args.seconds:g} s")
            runs[name] = _our_agent(folder / f"station-{name}{tag}", "station",
                                    STATION_SOURCE.format(port=port), url,
                                    args.warmup, args.seconds, tree)
        _progress(f"station{tag}, naive: {args.warmup + args.seconds:g} s")
        runs[NAIVE["station"]] = _naive_agent("--naive-station", [str(port), url],
                                              folder / f"naive-station{tag}.count",
                                              args.warmup, args.seconds)
        _progress(f"station{tag}, register reads alone: {2 * args.floor_seconds:g} s")
        floor = subprocess.run([sys.executable, __file__, "--pymodbus-floor", str(port),
                                "--floor-seconds", str(args.floor_seconds)],
                               check=True, capture_output=True, cwd=ROOT)
        runs.update(json.loads(floor.stdout))
    finally:
        _stop(meter)
    return runs


NAIVE = {"vehicle": "naive_python_obd_paho", "station": "naive_pymodbus_paho"}


def _trees(args: argparse.Namespace) -> list[tuple[str, Path | None]]:
    return [("ours", None)] + ([("baseline", args.baseline)] if args.baseline else [])


def _setup(role: str, folder: Path, url: str, args: argparse.Namespace) -> dict[str, object]:
    """``--rounds`` rounds of (ours, baseline, naive), each agent's figures from its median
    round by CPU per reading, and every round's CPU per reading: the load on a shared
    machine moves between measurements, the rounds show by how much."""
    run = _vehicle_round if role == "vehicle" else _station_round
    rounds = [run(folder, url, args, f"#{n}" if args.rounds > 1 else "")
              for n in range(args.rounds)]
    out: dict[str, object] = {}
    for name in rounds[0]:
        ordered = sorted((r[name] for r in rounds), key=lambda f: f["cpu_us_per_reading"] or 0)
        out[name] = {**ordered[len(ordered) // 2],
                     "cpu_us_per_reading_rounds": [r[name]["cpu_us_per_reading"]
                                                   for r in rounds]}
    naive = out[NAIVE[role]]
    assert isinstance(naive, dict)
    for name, _ in _trees(args):
        figures = out[name]
        assert isinstance(figures, dict)
        out["cpu_per_reading_ratio" if name == "ours" else f"{name}_ratio"] = \
            _ratio(figures, naive)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--warmup", type=float, default=10.0)
    parser.add_argument("--baseline", type=Path, metavar="DIR",
                        help="also measure the agent of this checkout (before/after)")
    parser.add_argument("--only", choices=("vehicle", "station"))
    parser.add_argument("--rounds", type=int, default=1, metavar="N",
                        help="repeat each set-up N times, report the median round")
    parser.add_argument("--naive-vehicle", nargs=3, metavar=("PORT", "URL", "COUNT"))
    parser.add_argument("--naive-station", nargs=3, metavar=("PORT", "URL", "COUNT"))
    parser.add_argument("--floor-seconds", type=float, default=20.0,
                        help="how long the station's register reads alone are measured, "
                        "with each client")
    parser.add_argument("--pymodbus-floor", type=int, metavar="PORT")
    args = parser.parse_args()
    if args.pymodbus_floor:
        pymodbus_floor(args.pymodbus_floor, args.floor_seconds)
        return
    if args.naive_vehicle:
        naive_vehicle(args.naive_vehicle[0], args.naive_vehicle[1], Path(args.naive_vehicle[2]))
        return
    if args.naive_station:
        naive_station(int(args.naive_station[0]), args.naive_station[1],
                      Path(args.naive_station[2]))
        return
    if args.baseline is not None and not (args.baseline / "agent" / "cli.py").is_file():
        raise SystemExit(f"steady.py: --baseline {args.baseline}: not a checkout of this "
                         "project (no agent/cli.py)")

    sys.path.insert(0, str(ROOT))
    from hil.broker import Mosquitto

    figures: dict[str, object] = {"seconds": args.seconds, "pids": len(PIDS), "rate_hz": 1}
    if args.baseline is not None:
        figures["baseline"] = str(args.baseline)
    load = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory(prefix="steady-") as tmp:
        folder = Path(tmp)
        broker = Mosquitto(folder / "broker").start()
        try:
            if args.only in (None, "vehicle"):
                figures["vehicle"] = _setup("vehicle", folder, broker.url, args)
            load.append(os.getloadavg()[0])
            if args.only in (None, "station"):
                figures["station"] = _setup("station", folder, broker.url, args)
        finally:
            broker.kill()
    load.append(os.getloadavg()[0])
    figures["cores"] = os.cpu_count()
    figures["load_1min"] = [round(x, 2) for x in load]  # at the start, between, at the end
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
