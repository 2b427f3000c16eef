"""The pipeline against a real mosquitto: nothing committed is ever lost (issue 3, Must show).

Every test reads what a real subscriber received and runs the verifier over it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import random
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import pytest

from agent.config import BatchConfig
from agent.envelope import Sealer
from agent.errors import UplinkError
from agent.fleet_keys import FleetRegistry
from agent.keys import IdentityKey, SettlementKey, provisioning_record
from agent.live_verify import TOPICS, LiveVerifier, collect, mqtt_config
from agent.readings import Event, Reading
from agent.spool import Spool, SpoolConfig
from agent.telemetry import Pipeline, SpoolWorker
from agent.topics import status_topic
from agent.uplink import MqttConfig, Uplink
from hil.broker import AclRule, BrokerOptions, Mosquitto, free_port, make_pki

KEY = IdentityKey(bytes(range(32)))
DEVICE = "dev-a"
AGENT_SCRIPT = Path(__file__).with_name("telemetry_agent.py")
FLEET_CONF = Path(__file__).resolve().parents[2] / "config" / "mosquitto-fleet.conf"


def registry() -> FleetRegistry:
    reg = FleetRegistry()
    reg.add_record(provisioning_record(DEVICE, KEY, SettlementKey.generate(), 1))
    return reg


def agent_mqtt(url: str, **options) -> MqttConfig:
    options.setdefault("backoff_initial_s", 0.05)
    options.setdefault("backoff_max_s", 0.5)
    options.setdefault("keepalive_s", 5)
    options.setdefault("window", 16)
    return MqttConfig.from_url(url, DEVICE, status_topic=status_topic(DEVICE), **options)


@contextlib.asynccontextmanager
async def running_agent(mqtt: MqttConfig, spool_path: Path, *, max_bytes: int = 16 << 20,
                        batch: int = 10) -> AsyncIterator[Pipeline]:
    spool = Spool.open(SpoolConfig(spool_path, max_bytes=max_bytes))
    sealer = Sealer(KEY, DEVICE, os.urandom(16), spool.next_seq, spool.head)
    worker = SpoolWorker(spool)
    try:
        async with Uplink(mqtt) as up:
            pipeline = Pipeline(sealer, worker, up, DEVICE,
                                batch=BatchConfig(max_readings=batch, max_age_ms=20))
            async with asyncio.TaskGroup() as tg:
                tasks = [tg.create_task(pipeline.run_sealer(), name="telemetry.seal"),
                         tg.create_task(pipeline.run_publisher(), name="telemetry.publish")]
                try:
                    yield pipeline
                finally:
                    for task in tasks:
                        task.cancel()
    finally:
        worker.close()


@contextlib.asynccontextmanager
async def subscriber(url: str, live: LiveVerifier, client_id: str = "verifier",
                     **tls) -> AsyncIterator[Uplink]:
    async with Uplink(mqtt_config(url, client_id=client_id, persistent=True, **tls)) as up:
        await asyncio.wait_for(up.wait_connected(), 10)
        for topic in TOPICS:
            await up.subscribe(topic)
        yield up


async def until(condition, timeout_s: float = 15.0) -> None:
    """Wait for a counter or state to reach a value (checked every 20 ms)."""
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.02)


async def emit_readings(pipeline: Pipeline, start: int, count: int, per_tick: int = 50) -> None:
    for n in range(start, start + count):
        await pipeline.emit(Reading("Vehicle.Speed", n % 250, "km/h", n + 1, source="sim"))
        if n % per_tick == 0:
            await asyncio.sleep(0.005)


async def receive_all(up: Uplink, live: LiveVerifier, envelopes: int, timeout_s: float) -> None:
    await collect(up, live, until=lambda s: len(s.arrivals) >= envelopes, timeout_s=timeout_s)


def assert_complete(live: LiveVerifier, envelopes: int) -> None:
    report = live.report()
    device = report.devices[DEVICE]
    assert report.ok, report.format()
    assert (device.first_seq, device.last_seq, device.gaps) == (0, envelopes - 1, 0), \
        report.format()
    seqs = [seq for _, seq in live.arrivals]
    assert seqs == sorted(seqs), "first arrivals out of seq order"


# ----------------------------------------------------------------------------- broker restart


@pytest.mark.parametrize("hard", [True, False], ids=["sigkill", "sigterm"])
def test_broker_killed_and_restarted_mid_stream_loses_nothing(tmp_path, broker_factory, hard):
    asyncio.run(_broker_restart(tmp_path, broker_factory(), hard))


async def _broker_restart(tmp_path: Path, broker: Mosquitto, hard: bool) -> None:
    live = LiveVerifier(registry())
    async with subscriber(broker.url, live) as sub, \
            running_agent(agent_mqtt(broker.url), tmp_path / "s.sqlite") as pipeline:
        await emit_readings(pipeline, 0, 1500)
        await collect(sub, live, until=lambda s: False, timeout_s=0.5)
        # The verifier's session (its subscriptions) must be on disk before a SIGKILL, or
        # the restarted broker queues nothing for it: a broker's loss, not the agent's.
        await asyncio.to_thread(broker.save)
        await asyncio.to_thread(broker.kill if hard else broker.stop)
        await emit_readings(pipeline, 1500, 1500)  # the broker is down: spool only
        await asyncio.to_thread(broker.start)
        await emit_readings(pipeline, 3000, 1500)
        await pipeline.wait_drained(30)
        total = pipeline.sealer.next_seq
        await receive_all(sub, live, total, 30)
        assert pipeline.uplink.epoch >= 2 and sub.epoch >= 2
    assert_complete(live, total)
    assert live.report().devices[DEVICE].readings == 4500


# ----------------------------------------------------------------------------- agent SIGKILL


def test_agent_sigkilled_20_times_while_streaming(tmp_path, mosquitto):
    asyncio.run(_agent_kills(tmp_path, mosquitto, kills=20, rng=random.Random(20261121)))


@pytest.mark.slow
def test_agent_sigkilled_100_times_while_streaming(tmp_path, mosquitto):
    asyncio.run(_agent_kills(tmp_path, mosquitto, kills=100, rng=random.Random()))


def _agent_cmd(url: str, spool: Path, *extra: str) -> list[str]:
    return [sys.executable, str(AGENT_SCRIPT), "--url", url, "--spool", str(spool),
            "--seed", KEY.seed().hex(), "--device", DEVICE, "--rate", "3000", *extra]


async def _agent_kills(tmp_path: Path, broker: Mosquitto, kills: int, rng: random.Random):
    spool_path = tmp_path / "spool.sqlite"
    live = LiveVerifier(registry())
    async with subscriber(broker.url, live) as sub:
        for _ in range(kills):
            proc = subprocess.Popen(_agent_cmd(broker.url, spool_path))
            try:
                # Random moments: during start-up/recovery, mid-commit, mid-publish.
                await collect(sub, live, until=lambda s: False,
                              timeout_s=rng.uniform(0.2, 1.2))
            finally:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(10)
            spool = Spool.open(SpoolConfig(spool_path))  # recovery + quick_check
            assert spool.integrity_check() == "ok"
            spool.close()
        final = subprocess.run(_agent_cmd(broker.url, spool_path, "--count", "100",
                                          "--exit-when-drained"), timeout=60,
                               capture_output=True, text=True)
        assert final.returncode == 0, final.stderr[-2000:]
        spool = Spool.open(SpoolConfig(spool_path))
        total, left = spool.next_seq, spool.rows
        spool.close()
        assert left == 0
        await receive_all(sub, live, total, 30)
    assert_complete(live, total)
    report = live.report().devices[DEVICE]
    assert report.seq_reused == 0 and report.broken_links == 0
    assert total > kills  # it really streamed between the kills


# ----------------------------------------------------------------------------- unreachable


def test_broker_unreachable_spool_grows_to_cap_then_drops_with_a_declaration(tmp_path,
                                                                             broker_factory):
    asyncio.run(_unreachable(tmp_path, broker_factory, seconds=4.0))


@pytest.mark.slow
def test_broker_unreachable_for_a_minute_memory_stays_flat(tmp_path, broker_factory):
    asyncio.run(_unreachable(tmp_path, broker_factory, seconds=60.0))


async def _unreachable(tmp_path: Path, broker_factory, seconds: float) -> None:
    # The fleet side: a broker where the verifier has a persistent session, then stopped
    # (saving that session). The agent's port has nothing listening until it comes back.
    broker = broker_factory()
    live = LiveVerifier(registry())
    async with subscriber(broker.url, live):
        pass
    await asyncio.to_thread(broker.stop)
    port = free_port()
    url = f"mqtt://127.0.0.1:{port}"
    cap = 256 * 1024
    process = psutil.Process()
    rss: list[int] = []
    async with running_agent(agent_mqtt(url), tmp_path / "s.sqlite", max_bytes=cap,
                             batch=50) as pipeline:
        spool = pipeline.spool
        n = 0
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        while loop.time() < end:  # a steady rate: 200 readings every 10 ms
            await emit_readings(pipeline, n, 200, per_tick=1000)
            n += 200
            await asyncio.sleep(0.01)
            if spool.counters["drop_passes"]:
                rss.append(process.memory_info().rss)
            assert spool.total_bytes <= cap + 4096
        assert pipeline.uplink.counters["error_unreachable"] >= 2  # it kept retrying
        assert spool.counters["drop_passes"] >= 2
        assert spool.counters["drop_envelopes"] == 0  # declared once the link is back
        sealed_bytes = pipeline.sealer.next_seq * 1000  # envelopes of 50 readings: > 1 kB
        assert sealed_bytes > 4 * cap
        # Memory: flat once the spool is full (the rest lives on disk or is dropped).
        assert max(rss) - rss[0] < 8 * 1024 * 1024, (rss[0], max(rss))

        # The link comes back: the same broker now also listens on the agent's port.
        broker.options = BrokerOptions(extra=(f"listener {port} 127.0.0.1",))
        await asyncio.to_thread(broker.start)
        async with subscriber(broker.url, live) as sub:
            await pipeline.wait_drained(60)
            await receive_all(sub, live, pipeline.counters["deleted"], 30)
    report = live.report()
    device = report.devices[DEVICE]
    assert report.ok, report.format()
    assert device.gaps == 0 and device.dropped_declared == spool.counters["dropped"] > 0
    assert spool.counters["drop_envelopes"] == 1  # one outage, one declaration
    assert device.last_seq == pipeline.sealer.next_seq - 1


# ----------------------------------------------------------------------------- refusals


def test_wrong_ca_wrong_client_cert_and_acl_deny_retry_and_lose_nothing(tmp_path,
                                                                        broker_factory):
    asyncio.run(_refusals(tmp_path, broker_factory))


async def _refusals(tmp_path: Path, broker_factory) -> None:
    pki = make_pki(tmp_path / "pki", ["dev-a", "fleet"])
    rogue = make_pki(tmp_path / "rogue", ["dev-a"], ca_name="rogue-ca")
    deny = (AclRule(DEVICE, "write", f"evedge/v1/{DEVICE}/status"),
            AclRule("fleet", "read", "evedge/v1/#"))
    broker = broker_factory(BrokerOptions(pki=pki, acl=deny))
    spool_path = tmp_path / "s.sqlite"
    good = {"ca_file": pki.ca, "cert_file": pki.clients["dev-a"].cert,
            "key_file": pki.clients["dev-a"].key}
    attempts = {
        "tls-verify": dict(good, ca_file=rogue.ca),
        "tls-handshake": dict(good, cert_file=rogue.clients["dev-a"].cert,
                              key_file=rogue.clients["dev-a"].key),
        "not-authorised": good,
    }
    emitted = 0
    for reason, tls in attempts.items():
        async with running_agent(agent_mqtt(broker.url, **tls), spool_path) as pipeline:
            await emit_readings(pipeline, emitted, 200)
            emitted += 200
            await pipeline.flush()

            def failures(p: Pipeline = pipeline, r: str = reason) -> int:
                return p.uplink.counters[f"error_{r}"] + p.counters[f"publish_failed_{r}"]

            await until(lambda f=failures: f() >= 3, 20)  # it retries, with back-off
            # (mosquitto 2.0.11 also closes the connection after a denied MQTT 5 publish,
            # so "disconnected" follows each "not-authorised": both are retried.)
            assert pipeline.spool.rows == pipeline.sealer.next_seq  # nothing left the spool
            assert pipeline.counters["deleted"] == 0

    # Fix the ACL; the same spool delivers everything.
    broker.stop()
    broker.options = BrokerOptions(pki=pki, acl=(
        AclRule(DEVICE, "write", f"evedge/v1/{DEVICE}/#"), AclRule("fleet", "read", "evedge/v1/#")))
    broker.start()
    live = LiveVerifier(registry())
    fleet = {"ca_file": pki.ca, "cert_file": pki.clients["fleet"].cert,
             "key_file": pki.clients["fleet"].key}
    async with subscriber(broker.url, live, client_id="fleet-verifier", **fleet) as sub, \
            running_agent(agent_mqtt(broker.url, **good), spool_path) as pipeline:
        await pipeline.emit(Event("E-TEST", "after the fix", 1))
        await pipeline.wait_drained(30)
        total = pipeline.sealer.next_seq
        await receive_all(sub, live, total, 30)
    assert_complete(live, total)
    assert live.report().devices[DEVICE].readings == emitted


# ----------------------------------------------------------------------------- broker queue


def fleet_queue_options() -> BrokerOptions:
    """The queue settings of config/mosquitto-fleet.conf, for a test broker."""
    values = {}
    for line in FLEET_CONF.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] in ("max_queued_messages", "max_inflight_messages"):
            values[parts[0]] = int(parts[1])
    assert values["max_queued_messages"] == 0 or values["max_queued_messages"] >= 100_000
    return BrokerOptions(**values)


@pytest.mark.parametrize("fleet_conf", [False, True], ids=["mosquitto-default-queue",
                                                           "fleet-conf"])
def test_broker_queue_overflow_is_caught_as_a_gap(tmp_path, broker_factory, fleet_conf):
    options = fleet_queue_options() if fleet_conf else BrokerOptions(max_queued_messages=20)
    asyncio.run(_queue_overflow(tmp_path, broker_factory(options), fleet_conf))


async def _queue_overflow(tmp_path: Path, broker: Mosquitto, fleet_conf: bool) -> None:
    live = LiveVerifier(registry())
    async with subscriber(broker.url, live):
        pass  # the verifier's session exists; it is away (a slow subscriber, at worst)
    async with running_agent(agent_mqtt(broker.url), tmp_path / "s.sqlite",
                             batch=1) as pipeline:
        await emit_readings(pipeline, 0, 300)
        await pipeline.wait_drained(30)  # every envelope got its PUBACK: gone from the spool
        # The verifier comes back while the device streams on (a loss at the very end of a
        # stream is invisible to anyone: nothing after it says it existed).
        async with subscriber(broker.url, live) as sub:
            await emit_readings(pipeline, 300, 20)
            await pipeline.wait_drained(30)
            total = pipeline.sealer.next_seq
            await collect(sub, live, until=lambda s: s.arrivals[-1:] == [(DEVICE, total - 1)],
                          idle_s=2.0, timeout_s=20)
    report = live.report()
    if fleet_conf:
        assert_complete(live, total)
    else:
        assert not report.ok
        assert report.devices[DEVICE].gaps >= 300 - 40, report.format()
        assert "missing seq" in report.format()


def test_fleet_conf_runs_on_mosquitto_with_tls_and_its_acl(tmp_path, pki):
    """config/mosquitto-fleet.conf as shipped (paths and port swapped for the test's)."""
    port = free_port()
    acl = tmp_path / "fleet.acl"
    acl.write_text("pattern write evedge/v1/%u/#\nuser fleet\ntopic read evedge/v1/#\n")
    text = FLEET_CONF.read_text()
    for old, new in {"listener 8883": f"listener {port} 127.0.0.1",
                     "/etc/mosquitto/ca/fleet-ca.pem": str(pki.ca),
                     "/etc/mosquitto/certs/broker.pem": str(pki.server.cert),
                     "/etc/mosquitto/certs/broker.key": str(pki.server.key),
                     "/etc/mosquitto/fleet.acl": str(acl),
                     "/var/lib/mosquitto/": f"{tmp_path}/",
                     "log_dest syslog": f"log_dest file {tmp_path}/mosquitto.log"}.items():
        assert old in text
        text = text.replace(old, new)
    text += f"user {pwd.getpwuid(os.getuid()).pw_name}\n"
    broker = Mosquitto(tmp_path / "fleet", port=port, config_text=text)
    broker.start()
    try:
        asyncio.run(_fleet_conf(broker, pki))
    finally:
        broker.kill()


async def _fleet_conf(broker: Mosquitto, pki) -> None:
    def tls(name: str) -> dict:
        return {"ca_file": pki.ca, "cert_file": pki.clients[name].cert,
                "key_file": pki.clients[name].key}

    live = LiveVerifier(registry())
    dev1 = MqttConfig.from_url(broker.url, "dev1", status_topic=status_topic("dev1"),
                               **tls("dev1"))
    async with asyncio.timeout(30), \
            subscriber(broker.url, live, client_id="fleet", **tls("fleet")) as sub, \
            Uplink(dev1) as up:
        await asyncio.wait_for(up.wait_connected(), 10)
        await up.publish("evedge/v1/dev1/telemetry", b"not an envelope")
        with pytest.raises(UplinkError) as info:  # dev1 may not speak for dev2
            await up.publish("evedge/v1/dev2/telemetry", b"x", retry=False)
        assert info.value.reason == "not-authorised"
        await collect(sub, live, until=lambda s: s.messages >= 1, timeout_s=10)
    assert live.messages == 1 and live.report().failures["wrong-tag"] == 1


def test_in_flight_window_is_bounded_while_the_broker_is_frozen(tmp_path, mosquitto):
    async def main():
        async with running_agent(agent_mqtt(mosquitto.url, window=4, keepalive_s=30),
                                 tmp_path / "s.sqlite", batch=1) as pipeline:
            up = pipeline.uplink
            await asyncio.wait_for(up.wait_connected(), 5)
            before = up.counters["published"]
            os.kill(mosquitto.pid, signal.SIGSTOP)  # no PUBACK comes back
            try:
                await emit_readings(pipeline, 0, 50)
                await pipeline.flush()
                await until(lambda: pipeline.spool.rows >= 50, 10)
                await until(lambda: up.counters["published"] - before >= 4, 10)
                # A negative check (nothing more goes out) has no signal to wait for: give
                # the publisher time to break the window if it could.
                await asyncio.sleep(0.5)
                assert up.counters["published"] - before == 4  # the window, not 50
            finally:
                os.kill(mosquitto.pid, signal.SIGCONT)
            await pipeline.wait_drained(20)
            assert pipeline.counters["deleted"] == 50

    asyncio.run(main())


def test_disk_full_loses_only_uncommitted_readings_and_declares_them(tmp_path, mosquitto):
    """SQLite's max_page_count stands in for a full SD card (SQLITE_FULL) while the agent
    runs; the broker is up. Envelopes that cannot be stored are never published; their seqs
    are declared (drop envelope, reason disk-full) once commits succeed again."""

    async def main():
        live = LiveVerifier(registry())
        async with subscriber(mosquitto.url, live) as sub, \
                running_agent(agent_mqtt(mosquitto.url), tmp_path / "s.sqlite",
                              batch=5) as pipeline:
            spool, worker = pipeline.spool, pipeline.worker
            await emit_readings(pipeline, 0, 50)
            await pipeline.wait_drained(10)
            pages = await worker.call(lambda: spool._db.execute("PRAGMA page_count").fetchone()[0])
            await worker.call(spool._db.execute, f"PRAGMA max_page_count={pages}")
            # No PUBACK meanwhile, so the spool must grow: a commit also deletes the rows
            # acknowledged since the last one, whose pages would otherwise hold the new rows.
            os.kill(mosquitto.pid, signal.SIGSTOP)
            try:
                await emit_readings(pipeline, 50, 500)
                await pipeline.flush()
                await until(lambda: pipeline.counters["commit_failed_disk-full"] > 0, 10)
                assert pipeline.disk_full
            finally:
                os.kill(mosquitto.pid, signal.SIGCONT)
            await worker.call(spool._db.execute, "PRAGMA max_page_count=1073741823")
            await emit_readings(pipeline, 550, 50)
            await pipeline.wait_drained(20)
            assert not pipeline.disk_full
            total = pipeline.sealer.next_seq
            await collect(sub, live, until=lambda s: (DEVICE, total - 1) in s.arrivals,
                          timeout_s=20)
        lost = pipeline.counters["envelopes_lost_uncommitted"]
        assert lost > 0
        report = live.report()
        device = report.devices[DEVICE]
        assert report.ok, report.format()  # no gap, no reused seq: the loss is declared
        assert device.gaps == 0 and device.dropped_declared >= lost
        assert device.last_seq == total - 1

    asyncio.run(main())
