"""The same store and ingest on PostgreSQL (a throwaway server, hil.postgres): two
concurrent writers on one device agree on its head; two ingest workers share a stream."""

import asyncio
import threading

from agent.fleet import queries
from agent.fleet.db import open_database
from agent.fleet.store import store_batch

from .helpers import Device, register, verified
from .test_ingest import wait_for, workers


def test_store_on_postgres_with_concurrent_writers(postgres_url):
    db = open_database(postgres_url)
    car = Device("car-1")
    snap = register(db, car)
    sent = car.envelopes(400)
    evens = verified(snap, [e for e in sent if e.seq % 2 == 0])
    odds = verified(snap, [e for e in sent if e.seq % 2 == 1])
    errors = []

    def writer(items):
        conn = open_database(postgres_url)
        try:
            for start in range(0, len(items), 20):
                store_batch(conn, items[start:start + 20])
        except Exception as exc:  # noqa: BLE001 - reported below, fails the test
            errors.append(exc)
        finally:
            conn.close()

    threads = [threading.Thread(target=writer, args=(part,)) for part in (evens, odds)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    # each writer saw only half the stream; the head they moved together covers all of it
    assert db.query("SELECT head_seq FROM devices")[0][0] == 399
    assert db.query("SELECT COUNT(*) FROM readings")[0][0] == 400
    assert queries.gaps(db) == [] and db.query("SELECT COUNT(*) FROM alarms")[0][0] == 0
    again = store_batch(db, evens[:5])
    assert again.counters["duplicates"] == 5
    db.close()


def test_ingest_workers_on_postgres(postgres_url, mosquitto):
    from agent.topics import telemetry_topic
    from agent.uplink import MqttConfig, Uplink

    db = open_database(postgres_url)
    car = Device("car-9", seed=9)
    register(db, car)
    sent = car.envelopes(100)

    async def main():
        async with workers(mosquitto.url, postgres_url):
            async with Uplink(MqttConfig.from_url(mosquitto.url, "pub")) as up:
                await up.wait_connected()
                for envelope in sent:
                    up.publish_nowait(telemetry_topic("car-9"), envelope.data)
                await wait_for(lambda: db.query("SELECT head_seq FROM devices")[0][0] == 99)

    asyncio.run(main())
    assert db.query("SELECT COUNT(*) FROM envelopes")[0][0] == 100
    db.close()
