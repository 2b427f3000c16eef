"""fleet ingest against a real mosquitto: shared subscription across two workers, one
database, acknowledge after commit, commit marks, garbage kept in `rejected`."""

import asyncio
import contextlib
import socket
import subprocess
import sys
from pathlib import Path

from agent.chain_head import HeadStatus
from agent.fleet import queries
from agent.fleet.db import open_database
from agent.fleet.ingest import Ingest, IngestConfig
from agent.fleet.mqtt import BrokerConfig
from agent.fleet_commit import CommitFollower
from agent.keys import IdentityKey
from agent.topics import commit_topic, status_topic, telemetry_topic
from agent.uplink import MqttConfig, Uplink

from .helpers import Device, register

COMMIT_KEY = IdentityKey(bytes([9]) * 32)


def config(url: str, db_url: str, name: str) -> IngestConfig:
    return IngestConfig(BrokerConfig(url, client_id=name, max_in_flight=32), db_url,
                        batch_max=50, batch_age_s=0.01)


@contextlib.asynccontextmanager
async def workers(url, db_url, n=2):
    stop = asyncio.Event()
    ingests = [Ingest(config(url, db_url, f"ingest-{i}"), COMMIT_KEY) for i in range(n)]
    tasks = [asyncio.create_task(i.run(stop)) for i in ingests]
    try:
        for ingest in ingests:
            await asyncio.wait_for(ingest.ready.wait(), 10)  # set on SUBACK
        yield ingests
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 10)


async def wait_for(predicate, timeout_s=20.0):
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.05)


def test_two_workers_share_the_stream_and_agree_on_the_chain(tmp_path, mosquitto):
    db_url = f"sqlite:///{tmp_path / 'fleet.db'}"
    db = open_database(db_url)
    cars = [Device(f"car-{i}", seed=i + 1) for i in range(3)]
    register(db, *cars)
    sent = {car.name: car.envelopes(60) for car in cars}

    async def main():
        async with workers(mosquitto.url, db_url) as ingests:
            marks = []
            async with Uplink(MqttConfig.from_url(mosquitto.url, "pub")) as up:
                await up.wait_connected()
                await up.subscribe(commit_topic("car-0"))
                for i in range(60):
                    for car in cars:
                        up.publish_nowait(telemetry_topic(car.name), sent[car.name][i].data)
                up.publish_nowait(telemetry_topic("car-0"), b"\xd2\x84garbage")
                await up.publish(telemetry_topic("car-0"), sent["car-0"][5].data)  # duplicate

                def stored():
                    return db.query("SELECT COUNT(*) FROM envelopes")[0][0] == 180

                await wait_for(stored)
                async with asyncio.timeout(10):
                    async for message in up.messages():
                        mark = CommitFollower("car-0", [COMMIT_KEY.public]).check(
                            message.payload)
                        assert mark is not None
                        marks.append(mark)
                        if mark.seq == 59:
                            break
            await wait_for(lambda: sum(i.counters["rejected_malformed-cbor"]
                                       for i in ingests) == 1)
            return ingests, marks

    ingests, marks = asyncio.run(main())
    # both workers got part of the stream (shared subscription), and agree on one chain
    assert all(i.counters["stored"] > 0 for i in ingests)
    assert sum(i.counters["stored"] for i in ingests) == 180
    assert [d.head_seq for d in queries.devices(db)] == [59, 59, 59]
    assert queries.gaps(db) == []
    assert marks[-1].hash == sent["car-0"][59].hash
    assert db.query("SELECT reason FROM rejected") == [("malformed-cbor",)]
    db.close()


def test_heads_reach_every_worker_and_name_the_missing_tail(tmp_path, mosquitto):
    """The status topics are subscribed plainly, not shared: MQTT 5 s4.8.2 sends no
    retained message to a shared subscription (spec-following brokers drop it; mosquitto
    happens to send it), and a live status on a shared one reaches a single member. So the
    retained head published before any worker ran AND the next live one reach EVERY
    worker, and `fleet gaps` reports the tail the broker never delivered."""
    db_url = f"sqlite:///{tmp_path / 'fleet.db'}"
    db = open_database(db_url)
    car = Device("car-tail", seed=7)
    register(db, car)
    sent = car.envelopes(12)   # the device sealed 0..11; only 0..4 will ever arrive
    sealed_up_to = [10]
    head = HeadStatus(car.key, car.name, "car-tail",
                      lambda: (sealed_up_to[0], sent[sealed_up_to[0] - 1].hash))

    async def main():
        async with Uplink(MqttConfig.from_url(mosquitto.url, "car-tail")) as up:
            await up.wait_connected()
            await up.publish(status_topic(car.name), head.payload("online"), retain=True)
            async with workers(mosquitto.url, db_url) as ingests:
                for sealed in sent[:5]:
                    await up.publish(telemetry_topic(car.name), sealed.data)
                await wait_for(lambda: all(i.counters["heads"] == 1 for i in ingests))
                sealed_up_to[0] = 12  # a live head, after both subscribed
                await up.publish(status_topic(car.name), head.payload("online"), retain=True)

                def done():
                    rows = db.query("SELECT max_seq, claimed_seq FROM devices")
                    return rows == [(4, 11)] and all(i.counters["heads"] == 2 for i in ingests)

                await wait_for(done)
                return ingests

    ingests = asyncio.run(main())
    assert [i.counters["heads"] for i in ingests] == [2, 2]  # retained and live, each worker
    assert queries.gaps(db) == []                            # no hole below the top...
    assert queries.tails(db) == [("car-tail", 5, 11)]        # ...but the tail is missing
    db.close()
    cli = subprocess.run([str(Path(sys.executable).parent / "edge-agent"), "fleet", "gaps",
                          "--db", db_url], capture_output=True, text=True, timeout=60)
    assert cli.returncode == 1, cli.stderr
    assert "car-tail  missing tail seq 5..11 (7): the device's signed head says seq 11" \
        in cli.stdout
    assert "0 gap(s), 1 missing tail(s)" in cli.stdout


def test_a_stop_ends_the_ingest_while_the_broker_is_unreachable(tmp_path):
    """SIGTERM to an ingest started before its broker used to be ignored until the broker
    answered (it waited for the SUBACK first)."""
    with socket.socket() as sock:   # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        url = f"mqtt://127.0.0.1:{sock.getsockname()[1]}"

    async def main() -> Ingest:
        stop = asyncio.Event()
        ingest = Ingest(config(url, f"sqlite:///{tmp_path / 'fleet.db'}", "ingest-x"),
                        COMMIT_KEY)
        task = asyncio.create_task(ingest.run(stop))
        await asyncio.sleep(1.5)
        assert not task.done()
        stop.set()
        await asyncio.wait_for(task, 10)
        return ingest

    ingest = asyncio.run(main())
    assert not ingest.ready.is_set()   # it never claimed to be subscribed


def test_parse_time_keeps_every_microsecond():
    from agent.fleet.commands import parse_time

    assert parse_time("2026-05-01T00:00:00.000001Z") == 1_777_593_600_000_001_000
    assert parse_time("2026-05-01T00:00:00.999999+00:00") == 1_777_593_600_999_999_000


def test_a_key_signing_as_another_device_raises_the_key_owners_alarm(tmp_path, mosquitto):
    db_url = f"sqlite:///{tmp_path / 'fleet.db'}"
    db = open_database(db_url)
    thief, victim = Device("car-1", seed=1), Device("car-2", seed=2)
    register(db, thief, victim)
    # car-1's key signs envelopes that claim to be car-2's
    impostor = Device("car-2", seed=1)

    async def main():
        async with workers(mosquitto.url, db_url, n=1) as (ingest,):
            async with Uplink(MqttConfig.from_url(mosquitto.url, "pub")) as up:
                await up.wait_connected()
                for envelope in impostor.envelopes(3):
                    await up.publish(telemetry_topic("car-2"), envelope.data)
            await wait_for(lambda: ingest.counters["rejected_device-mismatch"] == 3)

    asyncio.run(main())
    alarms = db.query("SELECT device, seq, kind FROM alarms ORDER BY seq")
    assert alarms == [("car-1", 0, "device-mismatch"), ("car-1", 1, "device-mismatch"),
                      ("car-1", 2, "device-mismatch")]
    assert db.query("SELECT COUNT(*) FROM envelopes")[0][0] == 0
    db.close()
