"""``edge-agent fleet ingest --mqtt URL --db URL``: verified ingest that scales out.

::

    broker --$share/<group>/evedge/v1/+/telemetry|event|status--> SharedSubscriber (paho thread)
        --> queue (bounded by Receive Maximum) --> batch (count / age)
        --> verify (registry snapshot, revocation times) --> store_batch (ONE transaction,
            DB thread) --> PUBACK each message --> commit marks per device (retained, signed)

Rules:

- Acknowledge after commit: a message is PUBACKed only once the transaction holding it
  returned; a crash before that means the broker sends it again (a no-op duplicate).
- Nothing acknowledged is lost: what does not verify is stored in ``rejected`` with its
  raw bytes and reason (an unknown key may be registered later, anything can be re-checked).
- Back-pressure: the broker sends at most ``max_in_flight`` unacknowledged messages, and a
  batch is stored before the next is taken: a slow database slows the broker's sending.
  A database error keeps the batch (nothing acknowledged) and retries it after a back-off.
- Commit marks (agent.fleet_commit): after each transaction, for each device whose head
  moved, ``evedge/v1/<device>/commit`` (retained) says "contiguous up to seq N, hash H",
  signed by the ingest's commit key; duplicates that the head covers already get the mark
  again (at most once a second per device): the agent resent them because it lacks it.
- A worker reloads the registry from the database every ``registry_refresh_s`` and at once
  (at most once a second) when it meets an unknown key.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from agent.backoff import Backoff
from agent.chain_head import head_from_status
from agent.durable import write_atomic
from agent.envelope import COMMIT_CONTENT_TYPE, ChainHead, open_head, seal_head
from agent.errors import EdgeAgentError, RemoteProtocolError, SignatureError
from agent.fleet import registry as fleet_registry
from agent.fleet.db import Database, DatabaseError, open_database
from agent.fleet.mqtt import Arrival, BrokerConfig, SharedSubscriber
from agent.fleet.registry import RegistrySnapshot
from agent.fleet.store import BatchResult, Rejection, Verified, store_batch
from agent.keys import IdentityKey, read_secret
from agent.topics import ROOT, commit_topic, device_of

log = logging.getLogger("edge_agent.fleet.ingest")
T = TypeVar("T")

FILTERS = (f"{ROOT}/+/telemetry", f"{ROOT}/+/event", f"{ROOT}/+/status")
REMARK_INTERVAL_NS = 1_000_000_000


@dataclass(frozen=True, slots=True)
class IngestConfig:
    broker: BrokerConfig
    db_url: str
    batch_max: int = 200
    batch_age_s: float = 0.02
    registry_refresh_s: float = 2.0
    progress_s: float = 10.0


@dataclass
class IngestStats:
    counters: Counter[str] = field(default_factory=Counter)
    latencies_ns: list[int] = field(default_factory=list)  # arrival -> commit, per envelope
    keep_latencies: bool = False


def load_or_create_commit_key(path: Path) -> IdentityKey:
    """The ingest's Ed25519 commit-mark key: a 32-byte seed file, mode 0600, made on first
    use (its public key goes into the agents' ``[spool] commit_keys``)."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, IdentityKey.generate().seed(), mode=0o600)
    return IdentityKey(read_secret(path))


class Ingest:
    """One ingest worker. ``await ingest.run(stop)`` until ``stop`` is set."""

    def __init__(self, config: IngestConfig, commit_key: IdentityKey | None = None,
                 clock: Callable[[], int] = time.time_ns) -> None:
        self.config, self.commit_key, self._clock = config, commit_key, clock
        self.stats = IngestStats()
        self.counters = self.stats.counters
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="fleet-db")
        self._db: Database | None = None
        self._snapshot: RegistrySnapshot | None = None
        self._queue: asyncio.Queue[Arrival] = asyncio.Queue()
        self._remarked: dict[str, int] = {}
        self._forced_reload_ns = 0
        self.subscriber: SharedSubscriber | None = None
        self.ready = asyncio.Event()

    async def _db_call(self, fn: Callable[..., T], *args: object) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(*args))

    async def run(self, stop: asyncio.Event) -> None:
        self._db = await self._db_call(open_database, self.config.db_url)
        db = self._db
        self._snapshot = await self._db_call(fleet_registry.load, db)
        loop = asyncio.get_running_loop()
        self.subscriber = SharedSubscriber(self.config.broker, FILTERS, loop,
                                           self._queue.put_nowait)
        self.subscriber.start()
        try:
            async with asyncio.TaskGroup() as tg:
                tasks = [tg.create_task(self._work(), name="fleet.ingest"),
                         tg.create_task(self._progress(), name="fleet.progress")]
                await self.subscriber.connected_async.wait()
                self.ready.set()
                await stop.wait()
                for task in tasks:
                    task.cancel()
        finally:
            await asyncio.to_thread(self.subscriber.stop)
            await self._db_call(db.close)
            self._executor.shutdown(wait=True)

    # -- the worker loop -----------------------------------------------------------------
    async def _work(self) -> None:
        backoff = Backoff(0.1, 5.0)
        while True:
            batch = await self._next_batch()
            await self._maybe_reload()
            verified, rejected, claims = self._verify(batch)
            if any(r.reason == "unknown-key" for r in rejected) and \
                    time.time_ns() - self._forced_reload_ns > 1_000_000_000:
                # a key registered since our snapshot: reload once and look again
                self._forced_reload_ns = time.time_ns()
                await self._maybe_reload(force=True)
                verified, rejected, claims = self._verify(batch)
            while True:
                try:
                    result = await self._db_call(store_batch, self._db, verified, rejected,
                                                 claims)
                    break
                except DatabaseError as exc:  # keep the batch, acknowledge nothing
                    self.counters["db_errors"] += 1
                    log.warning("fleet ingest: %s; retrying the batch", exc)
                    await asyncio.sleep(backoff.next())
            backoff.reset()
            committed = self._clock()
            assert self.subscriber is not None
            self.counters["acked"] += self.subscriber.ack(batch)
            self.counters.update(result.counters)
            if self.stats.keep_latencies:
                self.stats.latencies_ns += [committed - v.received_ns for v in verified]
            self._publish_marks(result)

    async def _next_batch(self) -> list[Arrival]:
        batch = [await self._queue.get()]
        deadline = time.monotonic() + self.config.batch_age_s
        while len(batch) < self.config.batch_max:
            if self._queue.empty():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(left):  # not wait_for: gh-86296
                        batch.append(await self._queue.get())
                continue
            batch.append(self._queue.get_nowait())
        return batch

    async def _maybe_reload(self, force: bool = False) -> None:
        assert self._snapshot is not None
        age_s = (time.time_ns() - self._snapshot.loaded_ns) / 1e9
        if force or age_s > self.config.registry_refresh_s:
            self._snapshot = await self._db_call(fleet_registry.load, self._db)
            self.counters["registry_reloads"] += 1

    def _verify(self, batch: list[Arrival]) -> tuple[list[Verified], list[Rejection],
                                                      list[ChainHead]]:
        assert self._snapshot is not None
        snapshot = self._snapshot
        verified, rejected, claims = [], [], []
        for arrival in batch:
            if arrival.topic.endswith("/status"):
                claim = self._claim(snapshot, arrival)
                if claim is not None:
                    claims.append(claim)
                continue
            try:
                opened = snapshot.open(arrival.payload)
            except (SignatureError, RemoteProtocolError) as exc:
                rejected.append(self._rejection(arrival, exc))
                continue
            owner = snapshot.registry.device_of(opened.kid)
            if owner != opened.device:
                rejected.append(Rejection(arrival.topic, arrival.payload, "device-mismatch",
                                          f"envelope of {opened.device} signed by a key of "
                                          f"{owner}", arrival.received_ns, opened.device))
                continue
            verified.append(Verified(opened, arrival.payload, arrival.received_ns))
        return verified, rejected, claims

    def _claim(self, snapshot: RegistrySnapshot, arrival: Arrival) -> ChainHead | None:
        cose = head_from_status(arrival.payload)
        if cose is None:
            return None
        try:
            head = open_head(cose, snapshot.public_key)
        except (SignatureError, RemoteProtocolError) as exc:
            self.counters[f"head_refused_{exc.reason}"] += 1
            return None
        if snapshot.registry.device_of(head.kid) != head.device or \
                device_of(arrival.topic) != head.device:
            self.counters["head_refused_device-mismatch"] += 1
            return None
        return head

    @staticmethod
    def _rejection(arrival: Arrival, exc: EdgeAgentError) -> Rejection:
        return Rejection(arrival.topic, arrival.payload, exc.reason, str(exc),
                         arrival.received_ns)

    def _publish_marks(self, result: BatchResult) -> None:
        if self.commit_key is None or self.subscriber is None:
            return
        now = self._clock()
        for device, (seq, digest) in result.heads.items():
            if seq < 0:
                continue
            if device not in result.advanced:
                if device not in result.behind_head or \
                        now - self._remarked.get(device, 0) < REMARK_INTERVAL_NS:
                    continue
            self._remarked[device] = now
            mark = seal_head(self.commit_key, device, seq, digest, now, COMMIT_CONTENT_TYPE)
            self.subscriber.publish(commit_topic(device), mark, retain=True)
            self.counters["commit_marks"] += 1

    async def _progress(self) -> None:
        last, last_t = 0, time.monotonic()
        while True:
            await asyncio.sleep(self.config.progress_s)
            stored, now = self.counters["stored"], time.monotonic()
            log.info("fleet ingest: %d envelopes stored (%.0f/s), %d readings, %d duplicates, "
                     "%d forks, %d rejected", stored, (stored - last) / (now - last_t),
                     self.counters["readings"], self.counters["duplicates"],
                     self.counters["forks"],
                     sum(v for k, v in self.counters.items() if k.startswith("rejected_")))
            last, last_t = stored, now
