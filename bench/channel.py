"""Benchmark: co-signed channel updates over a real mosquitto on loopback.

One update = the station's METER (+10 Wh), the vehicle's PAY (state + its secp256k1
signature, Ed25519 on the message, fsync'd before sending) and the station's ACK
(countersignature, fsync'd before sending); the next METER goes out when the station has
co-signed. ``p50_ms`` / ``p99_ms`` are PAY -> ACK round trips measured at the vehicle.
Both parties run in one process and one event loop, each with its own MQTT connection
(agent.uplink.Uplink), so every message crosses the broker.

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
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.channel.messages import MsgType, Tariff, decode, sign_tariff  # noqa: E402
from agent.channel.protocol import Paid, StationChannel, VehicleChannel  # noqa: E402
from agent.channel.records import Party  # noqa: E402
from agent.channel.session import run_station, run_vehicle, tcp_nodelay  # noqa: E402
from agent.channel.store import ChannelStore  # noqa: E402
from agent.keys import IdentityKey, SettlementKey  # noqa: E402
from agent.uplink import MqttConfig, Uplink  # noqa: E402
from hil.broker import Mosquitto  # noqa: E402

CONTRACT = bytes.fromhex("5fbdb2315678afecb367f032d93f642f64180aa3")


class Timed:
    """Wraps an Uplink: time each PAY publish and the ACK of the same nonce."""

    def __init__(self, uplink: Uplink) -> None:
        self.uplink = uplink
        self.sent_at: dict[int, float] = {}
        self.rtts: list[float] = []

    def publish_nowait(self, topic: str, payload: bytes) -> asyncio.Future[None]:
        if payload[1] == MsgType.PAY:
            state = decode(payload).body[0]
            self.sent_at[state[4]] = time.perf_counter()  # type: ignore[index]
        return self.uplink.publish_nowait(topic, payload)

    async def subscribe(self, topic: str) -> None:
        await self.uplink.subscribe(topic)

    async def wait_connected(self) -> int:
        return await self.uplink.wait_connected()

    async def messages(self):  # type: ignore[no-untyped-def]
        async for message in self.uplink.messages():
            if message.payload[1] == MsgType.ACK:
                sent = self.sent_at.pop(decode(message.payload).body[0], None)  # type: ignore[arg-type]
                if sent is not None:
                    self.rtts.append(time.perf_counter() - sent)
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
        tcp_nodelay(a)  # same socket tuning as the channel session
        tcp_nodelay(b)
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


async def channel_run(port: int, workdir: Path, updates: int, sync: bool, window: int
                      ) -> tuple[float, list[float], int]:
    ev_id, cs_id = IdentityKey.generate(), IdentityKey.generate()
    ev_key, cs_key = SettlementKey.generate(), SettlementKey.generate()
    salt = os.urandom(32)
    tariff = Tariff(price_per_kwh=300, export_price_per_kwh=100)
    station = StationChannel(cs_id, cs_key, Party(ev_id.public, ev_key.address),
                             chain_id=31337, contract=CONTRACT, salt=salt, tariff=tariff,
                             tariff_sig=sign_tariff(tariff, cs_id), deposit_ev=10**12,
                             deposit_cs=10**9, dispute_window_s=3600,
                             credit_window_wh=10 * (window + 1), pay_step_wh=10)
    vehicle = VehicleChannel(ev_id, ev_key, Party(cs_id.public, cs_key.address),
                             chain_id=31337, contract=CONTRACT, salt=salt,
                             max_price_per_kwh=1000, max_deposit_ev=10**12, window=window)
    cs_up = Uplink(MqttConfig(host="127.0.0.1", port=port, client_id="bench-cs"))
    ev_up = Uplink(MqttConfig(host="127.0.0.1", port=port, client_id="bench-ev"))
    delivering = asyncio.Event()
    timed = Timed(ev_up)
    paid_at: list[float] = []

    def charger(allowed: bool) -> None:  # the credit window gates the meter
        delivering.set() if allowed else delivering.clear()

    async def meter():  # type: ignore[no-untyped-def]
        wh = 1_000_000
        yield wh, 0
        for _ in range(updates):
            await delivering.wait()
            wh += 10
            yield wh, 0

    original = station.receive

    def receive(data: bytes, now: float):  # type: ignore[no-untyped-def]
        actions = original(data, now)
        if any(isinstance(a, Paid) for a in actions):
            paid_at.append(time.perf_counter())
        return actions

    station.receive = receive  # type: ignore[method-assign]
    with ChannelStore(workdir / "cs.log", sync=sync) as cs_store, \
            ChannelStore(workdir / "ev.log", sync=sync) as ev_store:
        async with cs_up, ev_up:
            result = await asyncio.gather(
                run_station(cs_up, station, cs_store, meter(), charger=charger, linger_s=0.2),
                run_vehicle(timed, vehicle, ev_store))  # type: ignore[arg-type]
    closed = result[0]
    assert closed.state.t_ev == updates * 10 * 300 // 1000, closed.state
    elapsed = paid_at[-1] - paid_at[0]
    return (len(paid_at) - 1) / elapsed, timed.rtts, closed.state.nonce


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--updates", type=int, default=3000)
    parser.add_argument("--no-fsync", action="store_true")
    parser.add_argument("--window", type=int, default=8, help="PAYs in flight (1: stop-and-wait)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        broker = Mosquitto(Path(tmp) / "broker").start()
        try:
            ref = await reference_rtt(f"127.0.0.1:{broker.port}", 330, 2000)
            rate, rtts, nonce = await channel_run(broker.port, Path(tmp), args.updates,
                                                  not args.no_fsync, args.window)
        finally:
            broker.stop()
    ed, secp = sign_rates()
    print(json.dumps({
        "bench": "channel", "updates": args.updates, "final_nonce": nonce,
        "fsync": not args.no_fsync, "window": args.window,
        "updates_per_s": round(rate, 1),
        "p50_ms": round(statistics.median(rtts) * 1e3, 3),
        "p99_ms": round(percentile(rtts, 0.99) * 1e3, 3),
        "ref_mqtt_rtt_p50_ms": round(statistics.median(ref) * 1e3, 3),
        "ref_mqtt_rtt_p99_ms": round(percentile(ref, 0.99) * 1e3, 3),
        "ref_ed25519_sign_per_s": round(ed), "ref_secp256k1_sign_per_s": round(secp),
        "ref_raiden_light_client_s_per_transfer": 2.1,
    }))


if __name__ == "__main__":
    asyncio.run(main())
