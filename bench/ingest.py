"""Benchmark: verified fleet ingest against a naive subscriber, SQLite and PostgreSQL.

    .venv/bin/python bench/ingest.py [--devices 1000] [--per-device 10] [--readings 5]
                                     [--skip-postgres]

In ONE run, each case with a fresh mosquitto (loopback, no queue limit) and a fresh database:

- a load generator (its own process) publishes real signed envelopes (``--readings`` per
  envelope) of D simulated devices, as fast as QoS 1 goes;
- ``ingest-1w`` / ``ingest-2w``: one or two ``agent.fleet.ingest`` workers (each its own
  process, one shared subscription group): verify (Ed25519, deterministic CBOR, schema,
  registry), store envelope + raw bytes + readings in one transaction per batch, move the
  chain heads in the database, acknowledge after commit, publish commit marks;
- ``naive``: what one would write without us, the reference: a paho subscriber that
  inserts the same payloads (raw, unverified, no readings) with the same driver and the
  SAME transaction policy as the ingest: one transaction per batch of at most BATCH_MAX
  messages, closed when BATCH_AGE_S has passed since its first message (before, the naive
  took everything that had arrived, thousands of rows per transaction, while the ingest
  committed at most 400: that compared batch sizes, not the work per envelope).

Figures per case: envelopes/s and readings/s from the first arrival to the last commit,
p99 arrival-to-commit (ms), and the ratios the issue asks for (verified 1 worker / naive,
and the second worker's gain / the first's). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BATCH_MAX, BATCH_AGE_S = 400, 0.01   # both the ingest's and the naive's transaction policy


# ----------------------------------------------------------------------------- load


def make_load(devices: int, per_device: int, readings: int) -> tuple[list, list]:
    """(records, [(topic, envelope bytes)]) interleaved across devices, as a fleet sends."""
    from agent.envelope import Sealer
    from agent.keys import IdentityKey, SettlementKey, provisioning_record
    from agent.readings import Reading
    from agent.topics import telemetry_topic

    records, sealers = [], []
    settlement = SettlementKey(bytes(31) + b"\x01")
    for d in range(devices):
        key = IdentityKey(d.to_bytes(4, "big") * 8)
        name = f"bench-{d:05d}"
        records.append(provisioning_record(name, key, settlement, 1))
        sealers.append((name, Sealer(key, name, bytes(16))))
    messages = []
    t0 = time.time_ns()
    for i in range(per_device):
        for name, sealer in sealers:
            batch = [Reading("1-0:1.8.0", 1000 * i + r, "Wh", t0 + i * 1000 + r, source="m0")
                     for r in range(readings)]
            messages.append((telemetry_topic(name), sealer.seal_readings(batch).data))
    return records, messages


def publish(url: str, messages: list) -> None:
    """The load generator (child process): publish everything, wait for every PUBACK."""
    import paho.mqtt.client as mqtt

    host, port = url.removeprefix("mqtt://").split(":")
    done, acked = threading.Event(), [0]

    def on_publish(client, userdata, mid, reason_code, properties) -> None:
        acked[0] += 1
        if acked[0] == len(messages):
            done.set()

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-load",
                         protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(500)
    client.max_queued_messages_set(0)
    client.on_publish = on_publish
    client.connect(host, int(port))
    client.loop_start()
    for topic, data in messages:
        client.publish(topic, data, qos=1)
    done.wait(600)
    client.disconnect()
    client.loop_stop()


# ----------------------------------------------------------------------------- workers


def ingest_worker(url: str, db_url: str, name: str, ready, stop, out) -> None:
    from agent.fleet.ingest import Ingest, IngestConfig
    from agent.fleet.mqtt import BrokerConfig
    from agent.keys import IdentityKey

    async def main() -> None:
        done = asyncio.Event()
        ingest = Ingest(IngestConfig(BrokerConfig(url, name, max_in_flight=512), db_url,
                                     batch_max=BATCH_MAX, batch_age_s=BATCH_AGE_S,
                                     progress_s=3600),
                        IdentityKey(bytes([5]) * 32))
        task = asyncio.create_task(ingest.run(done))
        await ingest.ready.wait()
        await asyncio.sleep(0.3)  # SUBACK
        cpu0 = time.process_time()
        ready.set()
        while not stop.is_set():
            await asyncio.sleep(0.05)
        done.set()
        await task
        out.put({"cpu_s": time.process_time() - cpu0, **ingest.counters})

    asyncio.run(main())


def naive_worker(url: str, db_url: str, total: int, ready, out) -> None:
    """The reference: subscribe, insert raw payloads in batches, no verification."""
    import paho.mqtt.client as mqtt

    from agent.fleet.db import open_database

    db = open_database(db_url)
    db.transaction(lambda d: d.execute(
        "CREATE TABLE IF NOT EXISTS naive (topic TEXT, payload "
        f"{'BYTEA' if d.postgres else 'BLOB'}, received_ns BIGINT, stored_ns BIGINT)"))
    host, port = url.removeprefix("mqtt://").split(":")
    arrived: list[tuple[str, bytes, int]] = []
    lock = threading.Condition()

    def on_message(client, userdata, message) -> None:
        with lock:
            arrived.append((message.topic, bytes(message.payload), time.time_ns()))
            lock.notify()

    def on_connect(client, userdata, flags, reason_code, properties) -> None:
        client.subscribe("evedge/v1/+/telemetry", qos=1)

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-naive",
                         protocol=mqtt.MQTTv5)
    client.on_message, client.on_connect = on_message, on_connect
    client.connect(host, int(port))
    client.loop_start()
    time.sleep(0.5)
    cpu0 = time.process_time()
    ready.set()
    stored = 0
    while stored < total:
        with lock:  # the ingest's policy: up to BATCH_MAX, or BATCH_AGE_S after the first
            lock.wait_for(lambda: arrived)
            deadline = time.monotonic() + BATCH_AGE_S
            while len(arrived) < BATCH_MAX and lock.wait(max(0.0, deadline - time.monotonic())):
                pass
            batch, arrived[:] = arrived[:BATCH_MAX], arrived[BATCH_MAX:]
        now = time.time_ns()
        db.transaction(lambda d, rows=batch, now=now: d.executemany(
            "INSERT INTO naive (topic, payload, received_ns, stored_ns) VALUES (?, ?, ?, ?)",
            [(t, p, r, now) for t, p, r in rows]))
        stored += len(batch)
    client.loop_stop()
    db.close()
    out.put({"stored": stored, "cpu_s": time.process_time() - cpu0})


# ----------------------------------------------------------------------------- cases


def run_case(kind: str, workers: int, db_url: str, records: list, messages: list,
             readings: int) -> dict[str, float]:
    from agent.fleet import registry
    from agent.fleet.db import open_database
    from hil.broker import BrokerOptions, Mosquitto

    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        broker = Mosquitto(Path(tmp) / "mq", BrokerOptions(persistence=False,
                                                         max_inflight_messages=0)).start()
        db = open_database(db_url)
        registry.add_records(db, records)
        ctx = mp.get_context("spawn")
        out, stop = ctx.Queue(), ctx.Event()
        readies, procs = [], []
        for i in range(workers):
            ready = ctx.Event()
            target, args = ((ingest_worker, (broker.url, db_url, f"ingest-{i}", ready, stop, out))
                            if kind == "ingest" else
                            (naive_worker, (broker.url, db_url, len(messages), ready, out)))
            procs.append(ctx.Process(target=target, args=args))
            readies.append(ready)
        for proc in procs:
            proc.start()
        for ready in readies:
            ready.wait(60)
        loader = ctx.Process(target=publish, args=(broker.url, messages))
        loader.start()
        table = "envelopes" if kind == "ingest" else "naive"
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if db.query(f"SELECT COUNT(*) FROM {table}")[0][0] >= len(messages):
                break
            time.sleep(0.1)
        stop.set()
        loader.join(60)
        reports = [out.get(timeout=60) for _ in procs]
        for proc in procs:
            proc.join(60)
        lat = [int(s) - int(r) for r, s in db.query(f"SELECT received_ns, stored_ns FROM {table}")]
        first, last = db.query(f"SELECT MIN(received_ns), MAX(stored_ns) FROM {table}")[0]
        count = len(lat)
        db.close()
        broker.kill()
    elapsed = (int(last) - int(first)) / 1e9
    rate = count / elapsed
    p99 = statistics.quantiles(lat, n=100)[98] / 1e6 if len(lat) > 100 else max(lat) / 1e6
    # CPU time of the subscriber processes (all their threads, from ready to stop) per
    # envelope: the figure the machine's other load changes least
    cpu_us = sum(r["cpu_s"] for r in reports) / count * 1e6
    return {"envelopes": count, "envelopes_per_s": round(rate),
            "readings_per_s": round(rate * readings) if kind == "ingest" else None,
            "p99_ms": round(p99, 1), "seconds": round(elapsed, 2),
            "cpu_us_per_envelope": round(cpu_us, 1)}


def sqlite_url(tmp: str, name: str) -> str:
    return f"sqlite:///{Path(tmp) / name}.db"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--per-device", type=int, default=10)
    parser.add_argument("--readings", type=int, default=5)
    parser.add_argument("--skip-postgres", action="store_true")
    parser.add_argument("--cases", default="naive,ingest_1w,ingest_2w",
                        help="comma-separated subset (the ratios need all three)")
    args = parser.parse_args()
    records, messages = make_load(args.devices, args.per_device, args.readings)
    results: dict[str, object] = {"devices": args.devices, "envelopes": len(messages),
                                  "readings_per_envelope": args.readings, "cpus": os.cpu_count(),
                                  "batch_max": BATCH_MAX, "batch_age_ms": BATCH_AGE_S * 1000}
    backends = ["sqlite"] + ([] if args.skip_postgres else ["postgresql"])
    with tempfile.TemporaryDirectory(prefix="bench-ingest-db-") as tmp:
        for backend in backends:
            server = None
            if backend == "postgresql":
                from hil.postgres import Postgres

                server = Postgres(fsync=True).start()
            try:
                for case, kind, workers in (("naive", "naive", 1), ("ingest_1w", "ingest", 1),
                                            ("ingest_2w", "ingest", 2)):
                    if case not in args.cases.split(","):
                        continue
                    if server is not None:
                        url = _pg_database(server.url, f"{case}")
                    else:
                        url = sqlite_url(tmp, case)
                    print(f"bench/ingest: {backend} {case} ...", file=sys.stderr)
                    results[f"{backend}_{case}"] = run_case(kind, workers, url, records,
                                                            messages, args.readings)
            finally:
                if server is not None:
                    server.stop()
            if not all(f"{backend}_{case}" in results
                       for case in ("naive", "ingest_1w", "ingest_2w")):
                continue
            naive = results[f"{backend}_naive"]["envelopes_per_s"]  # type: ignore[index]
            one = results[f"{backend}_ingest_1w"]["envelopes_per_s"]  # type: ignore[index]
            two = results[f"{backend}_ingest_2w"]["envelopes_per_s"]  # type: ignore[index]
            results[f"{backend}_verified_vs_naive"] = round(one / naive, 2)
            results[f"{backend}_cpu_naive_vs_verified"] = round(
                results[f"{backend}_naive"]["cpu_us_per_envelope"]  # type: ignore[index]
                / results[f"{backend}_ingest_1w"]["cpu_us_per_envelope"], 2)  # type: ignore[index]
            results[f"{backend}_second_worker_gain"] = round((two - one) / one, 2)
    print(json.dumps(results))


def _pg_database(server_url: str, name: str) -> str:
    import psycopg

    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name}")
        conn.execute(f"CREATE DATABASE {name}")
    return server_url.rsplit("/", 1)[0] + f"/{name}"


if __name__ == "__main__":
    main()
