"""``edge-agent fleet ingest --mqtt URL --db URL``: verified ingest that scales out.

::

    broker --$share/<group>/evedge/v1/+/telemetry|event, evedge/v1/+/status (plain)-->
        SharedSubscriber (paho thread)
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
- Commit marks (agent.fleet_commit): for each device whose head moved,
  ``evedge/v1/<device>/commit`` (retained) says "contiguous up to seq N, hash H", signed
  by the ingest's commit key; duplicates that the head covers already get the mark again
  (the agent resent them because it lacks it). At most one mark per device per
  ``mark_interval_s``: the newest head waits for the interval to pass (a timer publishes
  it). The marks due at once share ONE signature (agent.fleet_commit batch marks: a Merkle
  root signed, each device's head with its path): a signature per device was 35-40% of a
  worker's time with 1,000 devices (py-spy, bench/ingest.py).
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
from typing import TYPE_CHECKING, TypeVar

from agent.backoff import Backoff
from agent.chain_head import head_from_status
from agent.durable import write_atomic
from agent.envelope import ChainHead, open_head
from agent.errors import EdgeAgentError, RemoteProtocolError, SignatureError
from agent.fleet import registry as fleet_registry
from agent.fleet.db import Database, DatabaseError, open_database
from agent.fleet.mqtt import Arrival, BrokerConfig, SharedSubscriber
from agent.fleet.registry import RegistrySnapshot
from agent.fleet.store import BatchResult, Rejection, Verified, store_batch
from agent.fleet_commit import seal_commit_batch
from agent.keys import IdentityKey, SettlementKey, read_secret
from agent.topics import ROOT, commit_topic, device_of

if TYPE_CHECKING:
    from web3 import Web3

    from agent.fleet.anchor_chain import AnchorClient, AnchorTx
    from agent.settlement.txsign import DigestSigner

log = logging.getLogger("edge_agent.fleet.ingest")
T = TypeVar("T")

FILTERS = (f"{ROOT}/+/telemetry", f"{ROOT}/+/event")
# Not shared: the retained status (the devices' signed heads) never reaches a shared
# subscription (agent.fleet.mqtt), and missing-tail reports need it from the start.
PLAIN_FILTERS = (f"{ROOT}/+/status",)


@dataclass(frozen=True, slots=True)
class AnchorSettings:
    """Anchoring (issue 19): every ``interval_s`` the Merkle root of the envelopes this
    worker stored in the period goes to the anchor contract (agent.fleet.anchor_chain)."""

    node: Web3 | str            # JSON-RPC URL, or a Web3 (the in-process chain in tests)
    contract: bytes
    key: DigestSigner           # pays the gas; its address is the roots' submitter
    interval_s: float = 600.0


@dataclass(frozen=True, slots=True)
class IngestConfig:
    broker: BrokerConfig
    db_url: str
    batch_max: int = 200
    batch_age_s: float = 0.02
    registry_refresh_s: float = 2.0
    progress_s: float = 10.0
    mark_interval_s: float = 1.0
    anchor: AnchorSettings | None = None


@dataclass
class IngestStats:
    counters: Counter[str] = field(default_factory=Counter)
    latencies_ns: list[int] = field(default_factory=list)  # arrival -> commit, per envelope
    keep_latencies: bool = False


@dataclass(frozen=True, slots=True)
class _Checked:
    """A batch as it left verification, waiting for the database."""

    batch: list[Arrival]
    verified: list[Verified]
    rejected: list[Rejection]
    claims: list[ChainHead]


def load_or_create_commit_key(path: Path) -> IdentityKey:
    """The ingest's Ed25519 commit-mark key: a 32-byte seed file, mode 0600, made on first
    use (its public key goes into the agents' ``[spool] commit_keys``)."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, IdentityKey.generate().seed(), mode=0o600)
    return IdentityKey(read_secret(path))


def load_or_create_anchor_key(path: Path) -> SettlementKey:
    """The secp256k1 key that sends the anchoring transactions (fund its address with
    gas): a 32-byte secret file, mode 0600, made on first use."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, SettlementKey.generate().secret(), mode=0o600)
    return SettlementKey(read_secret(path))


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
        self._marked_ns: dict[str, int] = {}                 # device -> last mark sent
        self._pending_marks: dict[str, tuple[int, bytes]] = {}  # device -> newest head
        self._forced_reload_ns = 0
        self.subscriber: SharedSubscriber | None = None
        self.ready = asyncio.Event()
        self._period: list[bytes] = []           # hashes stored since the last anchoring
        self._period_ns: tuple[int, int] | None = None
        self._anchor_client: AnchorClient | None = None

    async def _db_call(self, fn: Callable[..., T], *args: object) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(*args))

    async def run(self, stop: asyncio.Event) -> None:
        self._db = await self._db_call(open_database, self.config.db_url)
        db = self._db
        self._snapshot = await self._db_call(fleet_registry.load, db)
        loop = asyncio.get_running_loop()
        self.subscriber = SharedSubscriber(self.config.broker, FILTERS, loop,
                                           self._queue.put_nowait, PLAIN_FILTERS)
        self.subscriber.start()
        try:
            async with asyncio.TaskGroup() as tg:
                tasks = [tg.create_task(self._work(), name="fleet.ingest"),
                         tg.create_task(self._progress(), name="fleet.progress"),
                         tg.create_task(self._mark_timer(), name="fleet.marks")]
                if self.config.anchor is not None:
                    tasks.append(tg.create_task(self._anchor_timer(), name="fleet.anchor"))
                # A stop while the broker is still out of reach ends the ingest too.
                subscribed = asyncio.ensure_future(self.subscriber.subscribed_async.wait())
                stopping = asyncio.ensure_future(stop.wait())
                try:
                    await asyncio.wait((subscribed, stopping),
                                       return_when=asyncio.FIRST_COMPLETED)
                finally:
                    subscribed.cancel()
                    stopping.cancel()
                if not stop.is_set():
                    self.ready.set()
                    await stop.wait()
                for task in tasks:
                    task.cancel()
        finally:
            await asyncio.to_thread(self.subscriber.stop)
            if self._period and self._period_ns is not None:  # the next start submits it
                from agent.fleet import anchor

                await self._db_call(anchor.record_period, db, self._period,
                                    *self._period_ns)
            await self._db_call(db.close)
            self._executor.shutdown(wait=True)

    # -- the worker loop -----------------------------------------------------------------
    # Two stages: while the database thread stores one batch (SQLite and psycopg release
    # the GIL, and the commit waits for the disk), the loop verifies the next one. At most
    # one verified batch waits for the database, so what is held unacknowledged stays
    # bounded by Receive Maximum.
    async def _work(self) -> None:
        ready: asyncio.Queue[_Checked] = asyncio.Queue(maxsize=1)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._verify_stage(ready), name="fleet.verify")
            tg.create_task(self._store_stage(ready), name="fleet.store")

    async def _verify_stage(self, ready: asyncio.Queue[_Checked]) -> None:
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
            await ready.put(_Checked(batch, verified, rejected, claims))

    async def _store_stage(self, ready: asyncio.Queue[_Checked]) -> None:
        backoff = Backoff(0.1, 5.0)
        while True:
            checked = await ready.get()
            while True:
                try:
                    result = await self._db_call(store_batch, self._db, checked.verified,
                                                 checked.rejected, checked.claims)
                    break
                except DatabaseError as exc:  # keep the batch, acknowledge nothing
                    self.counters["db_errors"] += 1
                    log.warning("fleet ingest: %s; retrying the batch", exc)
                    await asyncio.sleep(backoff.next())
            backoff.reset()
            committed = self._clock()
            assert self.subscriber is not None
            self.counters["acked"] += self.subscriber.ack(checked.batch)
            self.counters.update(result.counters)
            if self.stats.keep_latencies:
                self.stats.latencies_ns += [committed - v.received_ns for v in checked.verified]
            self._publish_marks(result)
            if self.config.anchor is not None and result.new_hashes:
                self._period += result.new_hashes
                first = self._period_ns[0] if self._period_ns else committed
                self._period_ns = (first, committed)

    # -- anchoring ---------------------------------------------------------------------
    async def _anchor_timer(self) -> None:
        assert self.config.anchor is not None
        while True:
            await asyncio.sleep(self.config.anchor.interval_s)
            await self.anchor_now()

    async def anchor_now(self) -> None:
        """Close the period (its root and leaves go to ``anchors``), then submit every root
        not on chain yet, oldest first. A node that is down or refuses leaves the roots
        pending: the next period submits them (nothing the database holds is lost)."""
        from agent.fleet import anchor

        if self._period and self._period_ns is not None:
            leaves, (first, last) = self._period, self._period_ns
            self._period, self._period_ns = [], None
            await self._db_call(anchor.record_period, self._db, leaves, first, last)
            self.counters["anchor_periods"] += 1
        pending = await self._db_call(anchor.pending_periods, self._db)
        for root, leaves_n, first, last in pending:
            try:
                done = await asyncio.to_thread(self._submit, root, leaves_n, first, last)
            except EdgeAgentError as exc:  # SettlementError, or a node that does not add up
                self.counters[f"anchor_failed_{exc.reason}"] += 1
                log.warning("fleet ingest: anchoring root %s failed: %s; retrying next period",
                            root.hex()[:16], exc)
                return
            await self._db_call(anchor.record_anchoring, self._db, root, done.tx_hash,
                                done.block, done.chain_id, done.contract, done.inclusion)
            self.counters["anchored"] += 1
            log.info("fleet ingest: root %s of %d envelopes anchored in block %d (tx %s)",
                     root.hex()[:16], leaves_n, done.block, done.tx_hash.hex())

    def _submit(self, root: bytes, leaves: int, first: int, last: int) -> AnchorTx:
        """On a worker thread (web3 blocks)."""
        from agent.fleet.anchor_chain import AnchorClient

        settings = self.config.anchor
        assert settings is not None
        if self._anchor_client is None:
            self._anchor_client = AnchorClient(settings.node, settings.contract, settings.key)
        return self._anchor_client.submit(root, leaves, first, last)

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
                    self.counters["heads"] += 1
                continue
            try:
                opened = snapshot.open(arrival.payload)
            except (SignatureError, RemoteProtocolError) as exc:
                rejected.append(self._rejection(arrival, exc))
                continue
            owner = snapshot.registry.device_of(opened.kid)
            if owner != opened.device:
                # The alarm is the key owner's: its key signed as another device (stolen, or
                # copied onto another box); the detail names the device it claimed to be.
                rejected.append(Rejection(arrival.topic, arrival.payload, "device-mismatch",
                                          f"envelope of {opened.device} signed by a key of "
                                          f"{owner}", arrival.received_ns,
                                          owner or opened.device, opened.seq))
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
        for device, head in result.heads.items():
            if head[0] >= 0 and (device in result.advanced or device in result.behind_head):
                self._pending_marks[device] = head
        self._flush_marks()

    def _flush_marks(self) -> None:
        """Sign and publish the pending heads of the devices whose last mark is at least
        ``mark_interval_s`` old; the rest wait for :meth:`_mark_timer`."""
        if self.commit_key is None or self.subscriber is None:
            return
        now = self._clock()
        interval_ns = int(self.config.mark_interval_s * 1e9)
        due = [d for d in self._pending_marks if now - self._marked_ns.get(d, 0) >= interval_ns]
        if not due:
            return
        heads = []
        for device in due:
            seq, digest = self._pending_marks.pop(device)
            self._marked_ns[device] = now
            heads.append((device, seq, digest))
        # QoS 0: a mark is cumulative and retained; one lost on the way is replaced by the
        # next (or re-sent when the agent resends what it lacks a mark for), and paho's
        # QoS 1 bookkeeping walks every message in flight per PUBACK: a flush of 1,000
        # marks cost more in paho than the one signature (py-spy).
        for device, mark in seal_commit_batch(self.commit_key, heads, now):  # one signature
            self.subscriber.publish(commit_topic(device), mark, retain=True, qos=0)
        self.counters["commit_marks"] += len(heads)
        self.counters["commit_signatures"] += 1

    async def _mark_timer(self) -> None:
        while True:
            await asyncio.sleep(self.config.mark_interval_s / 4)
            if self._pending_marks:
                self._flush_marks()

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
