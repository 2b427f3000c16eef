"""Benchmark: one station agent process serving K concurrent charging sessions.

The system under test is one ``edge-agent run`` station process, configured as a user
would configure a site of K single-connector wallboxes: K kWh meters (``modbus-tcp``,
SDM630, polled every second), K chargers (``modbus-evse``, Phoenix EV-CC), K connectors
([[channel.connectors]] ``charger_connector = 1``), open policy, pay step 10 Wh, credit
window 100 Wh, fsync on (the product always syncs a co-signed state before it acts on it),
anvil as the settlement node, mosquitto as the broker. Around it, in their own processes:

- the plants (one process, K ``hil/sim/plant.py`` plants in one event loop): each serves
  its meter and wallbox on Modbus TCP; each car draws 22 kW (32 A x 3 x 230 V), so every
  session pays every 10 Wh, about every 1.6 s;
- the cars (one process, K vehicle agents, each a ``Runtime`` from its own config file, no
  sources: the simulated cars pay without an energy audit), each starting its session the
  way ``edge-agent charge start`` does, through its control socket; each funds its channel
  on anvil.

Measured, in a steady window of ``--seconds`` after every session's first ACK:

- ``updates_per_s``: co-signed updates (ACKs) per second, all sessions;
- ``p50_ms`` / ``p99_ms``: PAY -> ACK, timed by an observer subscribed to every channel
  topic on the same broker (the time from the PAY passing the broker to the station's ACK
  passing it: broker -> station -> broker, the station's whole handling including its
  fsync; the car's own two hops to the broker are not in it);
- ``station_cpu_pct``: the station process's CPU time over the window (100 = one core);
  also for the cars' and plants' processes, which share the same two cores;
- ``max_unpaid_wh``: the most energy any session had metered (METER) beyond its latest
  co-signed state; ``within_credit_window``: sessions whose unpaid energy never exceeded
  the credit window (the station would have paused their delivery).

Reference, in the same run, single core: ``crypto_floor_updates_per_s`` = 1 / (secp256k1
sign + recover + Ed25519 sign + verify), the signature work one update needs at least once;
``ref_fsync_p50_ms`` / ``ref_fsync_p99_ms``: one 200-byte append + fdatasync on the same
disk (the station syncs each co-signed state before its ACK leaves).

    .venv/bin/python bench/station_load.py [--sessions 1,10,50] [--seconds 20]

Prints one JSON line: the reference and one row per K.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import cbor2
import psutil
import requests
import tomli_w

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.channel.messages import MsgType, verify_ed25519  # noqa: E402
from agent.channel.state import recover_signer  # noqa: E402
from agent.keys import IdentityKey, KeyStore, SettlementKey  # noqa: E402

EDGE_AGENT = str(Path(sys.executable).with_name("edge-agent"))
PRICE, DEPOSIT, PAY_STEP_WH, CREDIT_WH = 300_000, 5_000_000, 10, 100
ETHER = 10**18


def say(text: str) -> None:
    print(f"station_load: {text}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- children


def plants_child(count: int) -> None:
    """K plants in one event loop; prints their ports, runs until stdin closes."""
    from hil.sim.plant import CarSpec, Plant, PlantConfig

    async def main() -> None:
        plants = [Plant(PlantConfig(cars=(CarSpec(obc_max_current_a=32.0, seed=n),),
                                    tick_s=0.2)) for n in range(count)]
        ports = [await plant.start() for plant in plants]
        print(json.dumps({"ports": [[p["meter"], p["wallbox"]] for p in ports]}), flush=True)
        await asyncio.to_thread(sys.stdin.read)
        for plant in plants:
            await plant.stop()
    asyncio.run(main())


def cars_child(configs: list[str], station: str) -> None:
    """K vehicle agents (Runtimes from their config files) in one event loop; each starts
    its session through its control socket; runs until stdin closes."""
    import logging

    from agent.channel import control
    from agent.config import load_config
    from agent.runtime import Runtime

    logging.basicConfig(level=logging.WARNING)

    async def main() -> None:
        stop = asyncio.Event()
        runtimes = []
        for path in configs:
            config = load_config(Path(path))
            keys = KeyStore(config.device.state_dir).load()
            runtimes.append(Runtime(config, keys))
        async with asyncio.TaskGroup() as tg:
            for n, runtime in enumerate(runtimes):
                tg.create_task(runtime.run(stop), name=f"car{n}")
            for runtime in runtimes:
                await runtime.ready.wait()
                assert runtime.channel is not None
                await runtime.channel.ready.wait()

            def start(n: int) -> dict[str, object]:
                socket = Path(configs[n]).parent / "control.sock"
                return control.request(socket, {"op": "start", "station": station,
                                                 "connector": n + 1}, 120.0)
            answers = await asyncio.gather(*(asyncio.to_thread(start, n)
                                             for n in range(len(runtimes))))
            refused = [a for a in answers if not a.get("ok")]
            print(json.dumps({"started": len(answers) - len(refused),
                              "refused": refused[:3]}), flush=True)
            await asyncio.to_thread(sys.stdin.read)
            stop.set()
    asyncio.run(main())


# --------------------------------------------------------------------------- the run


class Observer:
    """Every channel message as it passes the broker: PAY -> ACK latency per nonce, ACKs
    per second, unpaid energy per session."""

    def __init__(self) -> None:
        self.pay_at: dict[tuple[bytes, int], tuple[float, int]] = {}   # -> (t, wh)
        self.latencies: list[float] = []
        self.acks: list[float] = []
        self.cosigned_wh: dict[bytes, int] = {}
        self.max_unpaid: dict[bytes, int] = {}
        self.first_ack: dict[bytes, float] = {}
        self.measuring = False

    def on_message(self, payload: bytes) -> None:
        now = time.perf_counter()
        kind = payload[1]
        if kind not in (MsgType.PAY, MsgType.ACK, MsgType.METER):
            return
        item = cbor2.loads(payload)
        channel, body = item[1], item[3]
        if kind == MsgType.PAY:
            state = body[0]
            self.pay_at[(channel, state[4])] = (now, state[7])
        elif kind == MsgType.ACK:
            sent = self.pay_at.pop((channel, body[0]), None)
            self.first_ack.setdefault(channel, now)
            if sent is None:
                return
            self.cosigned_wh[channel] = max(self.cosigned_wh.get(channel, 0), sent[1])
            if self.measuring:
                self.latencies.append(now - sent[0])
                self.acks.append(now)
        elif self.measuring:   # METER: energy since the channel opened
            unpaid = body[1] - self.cosigned_wh.get(channel, 0)
            self.max_unpaid[channel] = max(self.max_unpaid.get(channel, 0), unpaid)


def observe(url: str, observer: Observer, ready: threading.Event,
            done: threading.Event) -> None:
    import paho.mqtt.client as mqtt

    host, port = url.removeprefix("mqtt://").rsplit(":", 1)
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="station-load-observer",
                         protocol=mqtt.MQTTv5)
    client.on_message = lambda _c, _u, message: observer.on_message(message.payload)
    client.on_subscribe = lambda *_args: ready.set()
    client.on_connect = lambda c, *_args: c.subscribe("evedge/v1/channel/+/+", qos=1)
    client.connect(host, int(port))
    client.loop_start()
    done.wait()
    client.loop_stop()
    client.disconnect()


def find_anvil() -> str:
    explicit = os.environ.get("EVEDGE_ANVIL")
    for candidate in (explicit, str(ROOT / ".venv/npm/node_modules/@foundry-rs/"
                                     "anvil-linux-amd64/bin/anvil"), shutil.which("anvil")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise SystemExit("station_load: anvil not found (npm install --prefix .venv/npm "
                     "@foundry-rs/anvil-linux-amd64, or EVEDGE_ANVIL=/path/to/anvil)")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_toml(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(tomli_w.dumps(data).encode())
    return path


def station_config(work: Path, k: int, ports: list[list[int]], broker: str,
                   settlement: dict[str, Any]) -> Path:
    data: dict[str, Any] = {
        "device": {"id": f"cs-load-{k}", "role": "station", "state_dir": str(work / "cs")},
        "mqtt": {"url": broker}, "status": {"path": str(work / "cs" / "status.json"),
                                             "interval_s": 1.0},
        "sources": [{"id": f"m{n}", "kind": "modbus-tcp", "host": "127.0.0.1",
                     "port": meter, "unit": 1, "map": "sdm630", "interval_s": 1.0}
                    for n, (meter, _) in enumerate(ports)],
        "chargers": [{"id": f"wb{n}", "kind": "modbus-evse", "map": "phoenix-ev-eth",
                      "host": "127.0.0.1", "port": wallbox, "connectors": [1]}
                     for n, (_, wallbox) in enumerate(ports)],
        "channel": {"policy": "open", "price_per_kwh": PRICE, "deposit_ev": DEPOSIT,
                    "pay_step_wh": PAY_STEP_WH, "credit_window_wh": CREDIT_WH,
                    "offer_interval_s": 600.0, "funding_timeout_s": 120.0,
                    "connectors": [{"id": n + 1, "charger": f"wb{n}", "meter": f"m{n}",
                                    "charger_connector": 1, "max_current_a": 32.0}
                                   for n in range(k)]},
        "settlement": settlement}
    return write_toml(work / "station.toml", data)


def car_configs(work: Path, k: int, broker: str, settlement: dict[str, Any],
                fund: Any) -> list[str]:
    paths = []
    for n in range(k):
        state = work / f"ev{n}"
        keys, _ = KeyStore(state).init(f"ev-load-{k}-{n}")
        fund(keys.settlement.address)
        paths.append(str(write_toml(state / "vehicle.toml", {
            "device": {"id": f"ev-load-{k}-{n}", "role": "vehicle", "state_dir": str(state)},
            "mqtt": {"url": broker}, "status": {"path": str(state / "status.json"),
                                                 "interval_s": 30.0},
            "channel": {"max_price_per_kwh": PRICE, "max_deposit_ev": DEPOSIT,
                        "answer_timeout_s": 60.0},
            "settlement": settlement})))
    return paths


def cpu_s(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return float(times.user + times.system)


def run_k(k: int, seconds: float, broker: str, node: str, chain: dict[str, Any]) -> dict[str, Any]:
    from web3 import Web3

    from agent.settlement.chain import mint
    from agent.settlement.rpc import connect

    work = Path(tempfile.mkdtemp(prefix=f"station-load-{k}-"))
    w3 = connect(node)
    procs: list[subprocess.Popen[bytes]] = []
    done = threading.Event()
    failed = True
    try:
        plants = subprocess.Popen([sys.executable, __file__, "--plants", str(k)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT)
        procs.append(plants)
        assert plants.stdout is not None
        ports = json.loads(plants.stdout.readline())["ports"]

        def fund(address: bytes) -> None:
            w3.provider.make_request("anvil_setBalance",  # type: ignore[arg-type]
                                     [Web3.to_checksum_address(address), hex(10 * ETHER)])

        def fund_car(address: bytes) -> None:
            fund(address)
            mint(w3, chain["deployer"], chain["token"], address, 2 * DEPOSIT)

        settlement = {"node": node, "contract": "0x" + chain["channel"].hex(),
                      "from_block": chain["block"], "poll_s": 1.0}
        # a station id of its own per run: the broker still holds the retained offers of
        # the previous run's station (another key), which no car must take
        cs_keys, _ = KeyStore(work / "cs").init(f"cs-load-{k}")
        fund(cs_keys.settlement.address)
        config = station_config(work, k, ports, broker, settlement)
        cars = car_configs(work, k, broker, settlement, fund_car)
        station = subprocess.Popen([EDGE_AGENT, "run", "--config", str(config)],
                                   stdout=(work / "station.log").open("wb"),
                                   stderr=subprocess.STDOUT, cwd=ROOT)
        procs.append(station)
        wait_for(lambda: _status(work / "cs" / "status.json").get("pid") == station.pid
                 and _status(work / "cs" / "status.json").get("state") == "running", 120,
                 "station running")
        observer = Observer()
        subscribed = threading.Event()
        watcher = threading.Thread(target=observe, args=(broker, observer, subscribed, done),
                                   daemon=True)
        watcher.start()
        subscribed.wait(30)
        car_proc = subprocess.Popen([sys.executable, __file__, "--cars", json.dumps(cars),
                                     "--station", f"cs-load-{k}"],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=(work / "cars.log").open("wb"), cwd=ROOT)
        procs.append(car_proc)
        assert car_proc.stdout is not None
        started = json.loads(car_proc.stdout.readline() or b"{}")
        if started.get("started") != k:
            raise SystemExit(f"station_load: only {started} of {k} sessions started")
        wait_for(lambda: len(observer.first_ack) >= k, 120, "every session's first ACK")
        watched = {name: psutil.Process(p.pid) for name, p in
                   (("station", station), ("cars", car_proc), ("plants", plants))}
        cpu0 = {name: cpu_s(p) for name, p in watched.items()}
        t0 = time.perf_counter()
        observer.measuring = True
        time.sleep(seconds)
        observer.measuring = False
        elapsed = time.perf_counter() - t0
        cpu = {name: round(100 * (cpu_s(p) - cpu0[name]) / elapsed, 1)
               for name, p in watched.items()}
        lat = sorted(observer.latencies)
        unpaid = [observer.max_unpaid.get(c, 0) for c in observer.first_ack]
        failed = False
        return {
            "sessions": k, "window_s": round(elapsed, 1), "updates": len(observer.acks),
            "updates_per_s": round(len(observer.acks) / elapsed, 1),
            "p50_ms": round(1000 * statistics.median(lat), 2) if lat else None,
            "p99_ms": round(1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], 2)
            if lat else None,
            "max_ms": round(1000 * lat[-1], 2) if lat else None,
            "station_cpu_pct": cpu["station"], "cars_cpu_pct": cpu["cars"],
            "plants_cpu_pct": cpu["plants"],
            "max_unpaid_wh": max(unpaid, default=0),
            "within_credit_window": sum(u <= CREDIT_WH for u in unpaid),
        }
    finally:
        done.set()
        for proc in reversed(procs):
            if proc.stdin is not None:
                with contextlib.suppress(BrokenPipeError, OSError):
                    proc.stdin.close()
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        if failed:
            say(f"K = {k} failed: logs and state kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def _status(path: Path) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads(path.read_text())
        return data
    except (OSError, ValueError):
        return {}


def wait_for(done: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() > deadline:
            raise SystemExit(f"station_load: timed out waiting for {what}")
        time.sleep(0.1)


def crypto_floor(rounds: int = 2000) -> dict[str, float]:
    """One update's signature work, single core: secp256k1 sign + recover (the state),
    Ed25519 sign + verify (the transport)."""
    identity, settlement = IdentityKey.generate(), SettlementKey.generate()
    message, digest = os.urandom(200), os.urandom(32)
    start = time.perf_counter()
    for _ in range(rounds):
        signature = settlement.sign_digest(digest)
        recover_signer(digest, signature)
        sig = identity.sign(message)
        verify_ed25519(identity.public, message, sig)
    per_update = (time.perf_counter() - start) / rounds
    return {"crypto_floor_updates_per_s": round(1 / per_update),
            "crypto_floor_us_per_update": round(per_update * 1e6, 1)}


def fsync_floor(directory: Path, rounds: int = 200) -> dict[str, float]:
    """What one durable write costs on this disk (a 200-byte append + fdatasync, as the
    channel store does per co-signed state): the floor under PAY -> ACK."""
    path = directory / "fsync-probe"
    times = []
    with path.open("ab") as f:
        for _ in range(rounds):
            start = time.perf_counter()
            f.write(os.urandom(200))
            f.flush()
            os.fdatasync(f.fileno())
            times.append(time.perf_counter() - start)
    path.unlink()
    times.sort()
    return {"ref_fsync_p50_ms": round(1000 * times[len(times) // 2], 2),
            "ref_fsync_p99_ms": round(1000 * times[int(0.99 * len(times))], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", default="1,10,50", help="K values, comma separated")
    parser.add_argument("--seconds", type=float, default=20.0, help="steady window per K")
    parser.add_argument("--plants", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--cars", help=argparse.SUPPRESS)
    parser.add_argument("--station", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plants is not None:
        plants_child(args.plants)
        return
    if args.cars is not None:
        cars_child(json.loads(args.cars), args.station)
        return
    from agent.settlement.chain import deploy_contracts
    from agent.settlement.rpc import connect
    from hil.broker import BrokerOptions, Mosquitto

    work = Path(tempfile.mkdtemp(prefix="station-load-"))
    broker = Mosquitto(work / "broker", BrokerOptions()).start()
    port = free_port()
    anvil = subprocess.Popen([find_anvil(), "--host", "127.0.0.1", "--port", str(port),
                              "--silent", "--accounts", "1"], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    node = f"http://127.0.0.1:{port}"
    rows = []
    try:
        wait_for(lambda: _rpc_up(node), 30, "anvil")
        w3 = connect(node)
        deployer = SettlementKey.generate()
        w3.provider.make_request("anvil_setBalance",  # type: ignore[arg-type]
                                 ["0x" + deployer.address.hex(), hex(100 * ETHER)])
        deployment = deploy_contracts(w3, deployer, min_window_s=1)
        chain = {"deployer": deployer, "token": deployment.token,
                 "channel": deployment.channel, "block": deployment.block}
        for k in (int(x) for x in args.sessions.split(",")):
            say(f"K = {k}: starting")
            rows.append(run_k(k, args.seconds, broker.url, node, chain))
            say(f"K = {k}: {json.dumps(rows[-1])}")
        reference = {**crypto_floor(), **fsync_floor(work)}
    finally:
        anvil.terminate()
        anvil.wait(10)
        broker.kill()
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"bench": "station_load", "cpus": os.cpu_count(), "fsync": True,
                      "pay_step_wh": PAY_STEP_WH, "credit_window_wh": CREDIT_WH,
                      "power_w": 22_080, **reference, "runs": rows}))


def _rpc_up(url: str) -> bool:
    try:
        requests.post(url, json={"jsonrpc": "2.0", "id": 1, "method": "eth_chainId",
                                 "params": []}, timeout=1).raise_for_status()
        return True
    except requests.RequestException:
        return False


if __name__ == "__main__":
    main()
