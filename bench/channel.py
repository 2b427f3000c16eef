"""Benchmark: co-signed channel updates over a real mosquitto on loopback.

One update = the station's METER (+10 Wh), the vehicle's PAY (state + its secp256k1
signature, Ed25519 on the message; its nonce covered by a synced reservation, one fsync per
64 updates) and the station's ACK (countersignature, fsync'd before sending); the next METER
goes out when the station has co-signed. The durability rules are those of the product
(docs/channel.md "Persist before signing out"); ``--no-fsync`` only measures their cost. ``p50_ms`` / ``p99_ms`` are PAY -> ACK round trips measured at the vehicle.
The station runs in a child process (two devices, two cores; ``--one-process`` puts both in
one event loop), each party with its own MQTT connection (agent.uplink.Uplink), so every
message crosses the broker. ``updates_per_s`` is the rate of ACKs at the vehicle.
``--window N`` lets the vehicle have N proposals in flight (1: stop-and-wait).

Reference figures measured in the same run: ``ref_mqtt_rtt_p50_ms`` / ``ref_mqtt_rtt_p99_ms``
(a bare echo of a same-sized payload through the same broker and clients: the transport
floor), ``ref_ed25519_sign_per_s`` and ``ref_secp256k1_sign_per_s``.

    .venv/bin/python bench/channel.py [--updates 3000] [--no-fsync]

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cbor2

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.channel.messages import MsgType, Tariff, sign_tariff  # noqa: E402
from agent.channel.mux import Route, serving  # noqa: E402
from agent.channel.records import Party  # noqa: E402
from agent.channel.session import run_station, run_vehicle  # noqa: E402
from agent.channel.station import StationChannel  # noqa: E402
from agent.channel.store import ChannelStore  # noqa: E402
from agent.channel.vehicle import VehicleChannel  # noqa: E402
from agent.keys import IdentityKey, SettlementKey  # noqa: E402
from agent.uplink import MqttConfig, Uplink  # noqa: E402
from hil.broker import Mosquitto  # noqa: E402

CONTRACT = bytes.fromhex("5fbdb2315678afecb367f032d93f642f64180aa3")


class Timed:
    """Wraps an Uplink: time each PAY publish and the ACK of the same nonce."""

    def __init__(self, uplink: Route) -> None:
        self.uplink = uplink
        self.sent_at: dict[int, float] = {}
        self.rtts: list[float] = []
        self.ack_times: list[float] = []

    def publish_nowait(self, topic: str, payload: bytes) -> asyncio.Future[None]:
        if payload[1] == MsgType.PAY:
            state = cbor2.loads(payload)[3][0]  # C decoder: keep the probe cheap
            self.sent_at[state[4]] = time.perf_counter()
        return self.uplink.publish_nowait(topic, payload)

    async def subscribe(self, topic: str) -> None:
        await self.uplink.subscribe(topic)

    async def wait_connected(self) -> int:
        return await self.uplink.wait_connected()

    async def next_epoch(self, seen: int | None) -> int:
        return await self.uplink.next_epoch(seen)

    async def messages(self):  # type: ignore[no-untyped-def]
        async for message in self.uplink.messages():
            if message.payload[1] == MsgType.ACK:
                now = time.perf_counter()
                sent = self.sent_at.pop(cbor2.loads(message.payload)[3][0], None)
                if sent is not None:
                    self.rtts.append(now - sent)
                    self.ack_times.append(now)
            yield message


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def reference_rtt(url: str, size: int, count: int) -> list[float]:
    host, port = url.rsplit(":", 1)
    a = Uplink(MqttConfig(host="127.0.0.1", port=int(port), client_id="ref-a"))
    b = Uplink(MqttConfig(host="127.0.0.1", port=int(port), client_id="ref-b"))
    rtts: list[float] = []
    async with a, b:
        await a.wait_connected()
        await b.wait_connected()
        await a.subscribe("bench/pong")
        await b.subscribe("bench/ping")

        async def echo() -> None:
            async for message in b.messages():
                b.publish_nowait("bench/pong", message.payload)

        task = asyncio.create_task(echo())
        payload = os.urandom(size)
        incoming = a.messages()
        for _ in range(count):
            start = time.perf_counter()
            a.publish_nowait("bench/ping", payload)
            await anext(incoming)
            rtts.append(time.perf_counter() - start)
        task.cancel()
    return rtts


def sign_rates() -> tuple[float, float]:
    identity, settlement = IdentityKey.generate(), SettlementKey.generate()
    message, digest = os.urandom(200), os.urandom(32)
    start = time.perf_counter()
    for _ in range(2000):
        identity.sign(message)
    ed = 2000 / (time.perf_counter() - start)
    start = time.perf_counter()
    for _ in range(2000):
        settlement.sign_digest(digest)
    return ed, 2000 / (time.perf_counter() - start)


def make_parties(updates: int, window: int, keys: dict[str, str] | None = None
                 ) -> tuple[StationChannel, VehicleChannel, dict[str, str]]:
    """Both channel parties from one set of (throw-away) keys."""
    keys = keys or {"ev_id": os.urandom(32).hex(), "cs_id": os.urandom(32).hex(),
                    "ev_key": SettlementKey.generate().secret().hex(),
                    "cs_key": SettlementKey.generate().secret().hex(),
                    "salt": os.urandom(32).hex()}
    ev_id, cs_id = IdentityKey(bytes.fromhex(keys["ev_id"])), IdentityKey(bytes.fromhex(keys["cs_id"]))
    ev_key = SettlementKey(bytes.fromhex(keys["ev_key"]))
    cs_key = SettlementKey(bytes.fromhex(keys["cs_key"]))
    salt = bytes.fromhex(keys["salt"])
    tariff = Tariff(price_per_kwh=300, export_price_per_kwh=100)
    station = StationChannel(cs_id, cs_key, Party(ev_id.public, ev_key.address),
                             chain_id=31337, contract=CONTRACT, salt=salt, tariff=tariff,
                             tariff_sig=sign_tariff(tariff, cs_id), deposit_ev=10**12,
                             deposit_cs=10**9, dispute_window_s=3600,
                             credit_window_wh=10 * (window + 1), pay_step_wh=10,
                             require_funding_check=False)   # no ledger in this bench
    vehicle = VehicleChannel(ev_id, ev_key, Party(cs_id.public, cs_key.address),
                             chain_id=31337, contract=CONTRACT, salt=salt,
                             max_price_per_kwh=1000, max_deposit_ev=10**12, window=window)
    return station, vehicle, keys


async def station_side(station: StationChannel, port: int, store: ChannelStore,
                       updates: int) -> object:
    """The station: a meter that steps 10 Wh whenever the credit window allows."""
    delivering = asyncio.Event()

    def charger(allowed: bool) -> None:
        delivering.set() if allowed else delivering.clear()

    async def meter():  # type: ignore[no-untyped-def]
        wh = 1_000_000
        yield wh, 0
        for _ in range(updates):
            await delivering.wait()
            wh += 10
            yield wh, 0

    async with Uplink(MqttConfig(host="127.0.0.1", port=port, client_id="bench-cs")) as up, \
            serving(up) as mux:
        return await run_station(mux.transport(), station, store, meter(), charger=charger,
                                 linger_s=0.3)


def station_child(config_path: str) -> None:
    """``--station-child CONFIG``: the station in its own process (own core)."""
    cfg = json.loads(Path(config_path).read_text())
    station, _, _ = make_parties(cfg["updates"], cfg["window"], cfg["keys"])
    with ChannelStore(cfg["store"], sync=cfg["sync"]) as store:
        asyncio.run(station_side(station, cfg["port"], store, cfg["updates"]))


async def channel_run(port: int, workdir: Path, updates: int, sync: bool, window: int,
                      processes: bool) -> tuple[float, list[float], int]:
    station, vehicle, keys = make_parties(updates, window)
    ev_up = Uplink(MqttConfig(host="127.0.0.1", port=port, client_id="bench-ev"))
    child = None
    with ChannelStore(workdir / "ev.log", sync=sync) as ev_store:
        async with ev_up, serving(ev_up) as mux:
            timed = Timed(mux.transport())
            if processes:
                config = workdir / "station.json"
                config.write_text(json.dumps({"keys": keys, "updates": updates,
                                              "window": window, "port": port, "sync": sync,
                                              "store": str(workdir / "cs.log")}))
                os.chmod(config, 0o600)
                child = subprocess.Popen([sys.executable, __file__, "--station-child",
                                          str(config)], stdin=subprocess.DEVNULL)
                try:
                    closed = await run_vehicle(timed, vehicle, ev_store)  # type: ignore[arg-type]
                    await asyncio.to_thread(child.wait, 30)
                finally:
                    if child.poll() is None:
                        os.kill(child.pid, signal.SIGKILL)
                        child.wait(5)
            else:
                with ChannelStore(workdir / "cs.log", sync=sync) as cs_store:
                    closed, _ = await asyncio.gather(
                        run_vehicle(timed, vehicle, ev_store),  # type: ignore[arg-type]
                        station_side(station, port, cs_store, updates))
    assert closed.state.t_ev == updates * 10 * 300 // 1000, closed.state
    acks = timed.ack_times
    return (len(acks) - 1) / (acks[-1] - acks[0]), timed.rtts, closed.state.nonce


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--updates", type=int, default=3000)
    parser.add_argument("--no-fsync", action="store_true")
    parser.add_argument("--window", type=int, default=2, help="PAYs in flight (1: stop-and-wait)")
    parser.add_argument("--one-process", action="store_true",
                        help="both parties in this process (default: station in a child)")
    parser.add_argument("--station-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        broker = Mosquitto(Path(tmp) / "broker").start()
        try:
            ref = await reference_rtt(f"127.0.0.1:{broker.port}", 330, 2000)
            rate, rtts, nonce = await channel_run(broker.port, Path(tmp), args.updates,
                                                  not args.no_fsync, args.window,
                                                  not args.one_process)
        finally:
            broker.stop()
    ed, secp = sign_rates()
    print(json.dumps({
        "bench": "channel", "updates": args.updates, "final_nonce": nonce,
        "fsync": not args.no_fsync, "window": args.window,
        "processes": 1 if args.one_process else 2,
        "updates_per_s": round(rate, 1),
        "p50_ms": round(statistics.median(rtts) * 1e3, 3),
        "p99_ms": round(percentile(rtts, 0.99) * 1e3, 3),
        "ref_mqtt_rtt_p50_ms": round(statistics.median(ref) * 1e3, 3),
        "ref_mqtt_rtt_p99_ms": round(percentile(ref, 0.99) * 1e3, 3),
        "ref_ed25519_sign_per_s": round(ed), "ref_secp256k1_sign_per_s": round(secp),
        "ref_raiden_light_client_s_per_transfer": 2.1,
    }))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--station-child":
        station_child(sys.argv[2])
    else:
        asyncio.run(main())
