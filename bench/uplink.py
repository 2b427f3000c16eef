"""Benchmark: readings/s end to end to mosquitto on loopback, against a naive publisher.

    .venv/bin/python bench/uplink.py [--readings 50000] [--batch 50]

In ONE run, against one mosquitto (started here, no queue limit), each in its own process:

- naive: what a user would write without us: paho-mqtt, one unsigned JSON reading per
  message, QoS 1, as fast as paho goes; time until the last PUBACK.
- agent: our pipeline: Reading -> Batcher -> Sealer (COSE_Sign1, Ed25519) -> spool (SQLite
  WAL, synchronous=FULL, on disk) -> publish (window) -> PUBACK -> spool delete; time until
  the spool is empty. Its peak RSS is the child's ru_maxrss.

A subscriber in this process counts what actually arrives: JSON messages for naive, and for
the agent the readings in envelopes that pass agent.verify.Verifier (duplicates removed).
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

NAIVE_TOPIC = "bench/naive/telemetry"
DEVICE = "bench-dev"


# ----------------------------------------------------------------------------- children


def run_naive(url: str, n: int) -> dict[str, float]:
    import paho.mqtt.client as mqtt

    host, port = url.removeprefix("mqtt://").split(":")
    done = threading.Event()
    acked = 0

    def on_publish(client, userdata, mid, reason_code, properties) -> None:
        nonlocal acked
        acked += 1
        if acked == n:
            done.set()

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="naive",
                         protocol=mqtt.MQTTv311)
    client.on_publish = on_publish
    client.max_queued_messages_set(0)
    client.connect(host, int(port))
    client.loop_start()
    start = time.perf_counter()
    for i in range(n):
        payload = json.dumps({"name": "Vehicle.Speed", "value": i % 250, "unit": "km/h",
                              "ts": time.time_ns(), "source": "sim"})
        client.publish(NAIVE_TOPIC, payload, qos=1)
    done.wait(120)
    elapsed = time.perf_counter() - start
    client.disconnect()
    client.loop_stop()
    return {"readings": n, "acked": acked, "seconds": elapsed}


async def run_agent(url: str, n: int, batch: int, seed: bytes, spool_path: Path) -> dict:
    from agent.config import BatchConfig
    from agent.envelope import Sealer
    from agent.keys import IdentityKey
    from agent.readings import Reading
    from agent.spool import Spool, SpoolConfig
    from agent.telemetry import Pipeline, SpoolWorker
    from agent.topics import status_topic
    from agent.uplink import MqttConfig, Uplink

    spool = Spool.open(SpoolConfig(spool_path))
    sealer = Sealer(IdentityKey(seed), DEVICE, os.urandom(16), spool.next_seq, spool.head)
    worker = SpoolWorker(spool)
    config = MqttConfig.from_url(url, DEVICE, status_topic=status_topic(DEVICE), window=32)
    async with Uplink(config) as up:
        await up.wait_connected()
        pipeline = Pipeline(sealer, worker, up, DEVICE,
                            batch=BatchConfig(max_readings=batch, max_age_ms=1000))
        async with asyncio.TaskGroup() as tg:
            seal = tg.create_task(pipeline.run_sealer(), name="telemetry.seal")
            publish = tg.create_task(pipeline.run_publisher(), name="telemetry.publish")
            start = time.perf_counter()
            for i in range(n):  # a source emitting as fast as the pipeline takes it
                await pipeline.emit(Reading("Vehicle.Speed", i % 250, "km/h", time.time_ns(),
                                            source="sim"))
            await pipeline.wait_drained(300)
            elapsed = time.perf_counter() - start
            seal.cancel()
            publish.cancel()
    worker.close()
    return {"readings": n, "envelopes": sealer.next_seq, "seconds": elapsed,
            "acked": pipeline.counters["acked"],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


# ----------------------------------------------------------------------------- parent


class Subscriber:
    """paho subscriber on its own thread: keeps raw payloads per topic kind."""

    def __init__(self, url: str) -> None:
        import paho.mqtt.client as mqtt

        host, port = url.removeprefix("mqtt://").split(":")
        self.naive = 0
        self.envelopes: list[bytes] = []
        self._client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-sub",
                                   protocol=mqtt.MQTTv311)
        self._client.on_message = self._on_message
        subscribed = threading.Event()
        self._client.on_subscribe = lambda *a: subscribed.set()
        self._client.connect(host, int(port))
        self._client.subscribe([(NAIVE_TOPIC, 1), ("evedge/v1/+/telemetry", 1)])
        self._client.loop_start()
        subscribed.wait(10)

    def _on_message(self, client, userdata, message) -> None:
        if message.topic == NAIVE_TOPIC:
            self.naive += 1
        else:
            self.envelopes.append(message.payload)

    def wait_quiet(self, count, expected: int, quiet_s: float = 1.0, limit_s: float = 60) -> None:
        end = time.monotonic() + limit_s
        last, since = count(), time.monotonic()
        while time.monotonic() < end and count() < expected:
            time.sleep(0.05)
            if count() != last:
                last, since = count(), time.monotonic()
            elif time.monotonic() - since > quiet_s:
                return

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


def child(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                         timeout=600)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--readings", type=int, default=50_000)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--child", choices=("naive", "agent"))
    parser.add_argument("--url")
    parser.add_argument("--seed")
    parser.add_argument("--spool")
    args = parser.parse_args()
    if args.child == "naive":
        print(json.dumps(run_naive(args.url, args.readings)))
        return
    if args.child == "agent":
        print(json.dumps(asyncio.run(run_agent(args.url, args.readings, args.batch,
                                               bytes.fromhex(args.seed), Path(args.spool)))))
        return

    from agent.fleet_keys import FleetRegistry
    from agent.keys import IdentityKey, SettlementKey, provisioning_record
    from agent.verify import Verifier
    from hil.broker import BrokerOptions, Mosquitto

    key = IdentityKey.generate()
    registry = FleetRegistry()
    registry.add_record(provisioning_record(DEVICE, key, SettlementKey.generate(), 1))
    with tempfile.TemporaryDirectory() as tmp:
        broker = Mosquitto(Path(tmp) / "broker", BrokerOptions(persistence=False)).start()
        try:
            sub = Subscriber(broker.url)
            naive = child(["--child", "naive", "--url", broker.url,
                           "--readings", str(args.readings)])
            sub.wait_quiet(lambda: sub.naive, args.readings)
            agent = child(["--child", "agent", "--url", broker.url, "--readings",
                           str(args.readings), "--batch", str(args.batch), "--seed",
                           key.seed().hex(), "--spool", str(Path(tmp) / "spool.sqlite")])
            sub.wait_quiet(lambda: len(sub.envelopes), agent["envelopes"])
            sub.close()
        finally:
            broker.stop()
    verifier = Verifier(registry)
    for data in sub.envelopes:
        verifier.add(data)
    report = verifier.report()
    device = report.devices.get(DEVICE)
    naive_rate = naive["readings"] / naive["seconds"]
    agent_rate = agent["readings"] / agent["seconds"]
    print(json.dumps({
        "naive_readings_per_s": round(naive_rate),
        "naive_delivered": sub.naive,
        "agent_readings": agent["readings"],
        "agent_readings_per_s": round(agent_rate),
        "agent_delivered": device.readings if device else 0,
        "agent_envelopes": agent["envelopes"],
        "agent_verified_ok": report.ok,
        "ratio": round(agent_rate / naive_rate, 2),
        "agent_peak_rss_mb": round(agent["peak_rss_mb"], 1),
        "batch": args.batch,
        "readings": args.readings,
    }))


if __name__ == "__main__":
    main()
