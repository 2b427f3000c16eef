"""End-to-end commit marks: agents (`edge-agent run`, keep_until = "fleet-commit") stream
into a real mosquitto that is killed with SIGKILL again and again; the fleet ingest stores
and marks; no envelope the agents let go of is missing from the fleet database. The same
run shows the signed chain head in the agents' retained status."""

import asyncio
import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.chain_head import head_from_status
from agent.envelope import open_head
from agent.fleet import queries
from agent.fleet import registry as fleet_registry
from agent.fleet.db import open_database
from agent.fleet.ingest import Ingest, IngestConfig
from agent.fleet.mqtt import BrokerConfig
from agent.keys import IdentityKey, KeyStore
from agent.telemetry import MAX_ENVELOPES_PER_COMMIT
from agent.topics import status_topic
from agent.uplink import MqttConfig, Uplink

EDGE_AGENT = str(Path(sys.executable).parent / "edge-agent")
COMMIT_KEY = IdentityKey(bytes([7]) * 32)


def agent_config(tmp_path: Path, name: str, url: str) -> Path:
    state = tmp_path / name
    KeyStore(state).init(name)
    path = tmp_path / f"{name}.toml"
    path.write_text(f"""
[device]
role = "station"
state_dir = "{state}"

[batch]
max_readings = 4
max_age_ms = 50

[[sources]]
id = "meter0"
kind = "hil-meter"
map = "sdm630"
power_w = 11000
interval_s = 0.01
time_scale = 60

[mqtt]
url = "{url}"
backoff_initial_s = 0.05
backoff_max_s = 0.3
keepalive_s = 5

[spool]
keep_until = "fleet-commit"
commit_keys = ["{COMMIT_KEY.public.hex()}"]
head_interval_s = 0.5

[status]
path = "{state / 'status.json'}"
""")
    return path


def spool_seqs(tmp_path: Path, name: str) -> tuple[set[int], int]:
    with sqlite3.connect(tmp_path / name / "spool.sqlite") as db:
        seqs = {r[0] for r in db.execute("SELECT seq FROM outbox WHERE seq IS NOT NULL")}
        next_seq = db.execute("SELECT next_seq FROM chain").fetchone()[0]
    return seqs, next_seq


def wait_running(status_file: Path, proc: subprocess.Popen, timeout_s: float = 60,
                 sealed: int = 0) -> None:
    """The readiness signal: the agent's status file says running (its signal handlers are
    installed by then, so SIGTERM is a clean stop), with at least ``sealed`` envelopes."""
    from agent.errors import EdgeAgentError
    from agent.status import read_status

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            status = read_status(status_file)
            state = status.state
            next_seq = status.spool.next_seq if status.spool else 0
        except (OSError, EdgeAgentError):
            state, next_seq = "no status file yet", 0
        if state == "running" and next_seq >= sealed:
            return
        time.sleep(0.05)
    raise AssertionError("the agent did not report running")


def stop(proc: subprocess.Popen) -> str:
    proc.terminate()
    try:
        out, _ = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:  # never leave an agent behind
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"agent did not stop on SIGTERM:\n{out}") from None
    return out


async def retained_status(url: str, device: str) -> bytes:
    async with Uplink(MqttConfig.from_url(url, f"probe-{device}", session_expiry_s=0)) as up:
        await up.subscribe(status_topic(device))
        async with asyncio.timeout(10):
            async for message in up.messages():
                return message.payload
    raise AssertionError("no retained status")


@pytest.mark.parametrize("kills", [pytest.param(3, id="3-kills"),
                                   pytest.param(12, id="12-kills", marks=pytest.mark.slow)])
def test_broker_killed_repeatedly_loses_nothing_the_agents_let_go(tmp_path, broker_factory,
                                                                  kills):
    broker = broker_factory()
    db_url = f"sqlite:///{tmp_path / 'fleet.db'}"
    db = open_database(db_url)
    names = ["cs-a", "cs-b"]
    configs = [agent_config(tmp_path, name, broker.url) for name in names]
    for name in names:
        fleet_registry.add_record(db, KeyStore(tmp_path / name).latest_record())

    async def main() -> Ingest:
        stop_ingest = asyncio.Event()
        ingest = Ingest(IngestConfig(BrokerConfig(broker.url, "ingest-1", max_in_flight=64),
                                     db_url, batch_max=100, batch_age_s=0.02), COMMIT_KEY)
        task = asyncio.create_task(ingest.run(stop_ingest))
        await asyncio.wait_for(ingest.ready.wait(), 10)
        procs = [subprocess.Popen([EDGE_AGENT, "run", "--config", str(c)], text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                 for c in configs]
        try:
            for name, proc in zip(names, procs, strict=True):
                await asyncio.to_thread(wait_running, tmp_path / name / "status.json", proc)
            for _ in range(kills):
                target = ingest.counters["stored"] + 40
                async with asyncio.timeout(30):
                    while ingest.counters["stored"] < target:
                        await asyncio.sleep(0.05)
                await asyncio.to_thread(broker.kill)  # SIGKILL: unsaved messages are gone
                await asyncio.to_thread(broker.start)
            await asyncio.sleep(1.0)
            heads = [json.loads(await retained_status(broker.url, n)) for n in names]
        finally:
            outs = [await asyncio.to_thread(stop, p) for p in procs]
        for proc, out in zip(procs, outs, strict=True):
            assert proc.returncode == 0 and "Traceback" not in out, out
        # the agents are gone; the ingest stores what is still in flight
        await asyncio.sleep(1.0)
        stop_ingest.set()
        await asyncio.wait_for(task, 10)
        assert all("head" in h and h["state"] == "online" for h in heads), heads
        return ingest

    ingest = asyncio.run(main())
    assert ingest.counters["commit_marks"] > 0
    for name in names:
        kept, next_seq = spool_seqs(tmp_path, name)
        stored = {r[0] for r in db.query("SELECT seq FROM envelopes WHERE device = ?", (name,))}
        let_go = set(range(next_seq)) - kept
        assert next_seq > 40 * kills // len(names)
        assert let_go - stored == set(), f"{name}: deleted by the agent, not in the fleet db"
        assert let_go, "the agent deleted nothing: commit marks never arrived"
        head = db.query("SELECT head_seq FROM devices WHERE device = ?", (name,))[0][0]
        assert head >= max(let_go)
        for _, first, last in queries.gaps(db, name):  # only what the agent still holds
            assert set(range(first, last + 1)) <= kept
    db.close()


def test_offline_status_carries_the_signed_head(tmp_path, mosquitto):
    config = agent_config(tmp_path, "cs-h", mosquitto.url)
    proc = subprocess.Popen([EDGE_AGENT, "run", "--config", str(config)], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_running(tmp_path / "cs-h" / "status.json", proc, sealed=3)
    finally:
        out = stop(proc)
    assert proc.returncode == 0, out
    payload = asyncio.run(retained_status(mosquitto.url, "cs-h"))
    status = json.loads(payload)
    assert status["state"] == "offline", out
    keys = KeyStore(tmp_path / "cs-h").load()
    head = open_head(head_from_status(payload), lambda kid: keys.identity.public)
    _, next_seq = spool_seqs(tmp_path, "cs-h")
    with sqlite3.connect(tmp_path / "cs-h" / "spool.sqlite") as spool:
        stored = spool.execute("SELECT hash FROM outbox WHERE seq = ?", (head.seq,)).fetchone()
    # the head names an envelope the agent committed, with its hash; it may trail the very
    # end by the one commit still running on the spool thread as the uplink closed
    assert head.seq == status["head"]["seq"] and head.device == "cs-h"
    assert stored is not None and bytes(stored[0]) == head.hash
    assert next_seq - 1 - MAX_ENVELOPES_PER_COMMIT <= head.seq <= next_seq - 1
