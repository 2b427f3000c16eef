"""The telemetry pipeline the runtime supervises (DESIGN s3, s4)::

    sources --emit--> queue --> Batcher --> Sealer --> Spool.commit   (task "telemetry.seal")
    Spool (oldest first) --> Uplink.publish_nowait --> PUBACK --> Spool.delete_acked
                                                                   (task "telemetry.publish")

Rules:

- ``emit`` awaits a bounded queue: a source that outruns the disk is slowed down, memory
  stays bounded whatever the broker does.
- Envelopes are committed (one SQLite transaction for every envelope sealed in one pass,
  with the chain head) BEFORE they can be published; the publisher reads only the spool.
- The publisher sends rows in id (= seq) order with at most ``window`` awaiting PUBACK, and
  deletes a row only after its PUBACK. After a reconnect it starts again from the oldest
  row still in the spool, so what was in flight is sent again, in order: a subscriber sees
  a duplicate only for a message whose PUBACK we never got (QoS 1 redelivery).
- Steady-state cost (bench/steady.py): one spool transaction (one fsync) per commit, which
  also deletes the rows acknowledged since the last one; an idle publisher sleeps until a
  commit, a failed publish or an acknowledgement, with no timer of its own. A delete that
  waits for the next commit is safe: until then the row is only resent after a crash or a
  reconnect, a QoS 1 duplicate the verifier removes.
- A publish the broker refuses (ACL: ``not-authorised``) leaves the row in the spool and
  is retried after a capped exponential back-off.
- With ``[spool] keep_until = "fleet-commit"`` a PUBACK of an envelope only frees its
  place in the window: the row stays (no longer "in flight", so the drop policy may take
  it) until a fleet commit mark covers it (agent.fleet_commit); after a reconnect the
  publisher starts again from the oldest row, so what the fleet has not committed is sent
  again.
- A failed commit (disk full) is counted and logged. Its envelopes are never stored, so
  never published: their seqs are given up (the sealer is NOT set back, so no seq is ever
  handed out twice, even if the failed commit's outcome was not what SQLite reported), and
  the next commit that succeeds records them as a dropped range (``disk-full``). Every
  dropped range (spool full or disk full) is declared by a signed drop envelope sealed at
  the first commit while the uplink is connected (``Spool.commit(declare=True)``): one per
  outage, published after what was kept.

Usage (runtime)::

    pipeline = Pipeline(sealer, SpoolWorker(spool), uplink, device_id, batch=BatchConfig())
    async with asyncio.TaskGroup() as tg:
        tg.create_task(pipeline.run_sealer(), name="telemetry.seal")
        tg.create_task(pipeline.run_publisher(), name="telemetry.publish")
        tg.create_task(source.run(pipeline.emit), name=f"source[{source.id}]")
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from agent.backoff import Backoff
from agent.config import BatchConfig
from agent.envelope import Batcher, Sealer
from agent.errors import SpoolError, UplinkError
from agent.readings import Event, Reading
from agent.spool import DroppedRange, Outgoing, Spool, SpoolRow
from agent.topics import event_topic, telemetry_topic
from agent.uplink import RETRY_PAUSE_S, Uplink

log = logging.getLogger("edge_agent.telemetry")
T = TypeVar("T")

MAX_ENVELOPES_PER_COMMIT = 64
# Acknowledged rows are deleted by the sealer's next commit, in its transaction (no
# transaction, fsync and thread hop of their own); by the publisher itself once this many
# wait, or once they waited ACK_LINGER_S (no commit came: the sources are quiet), or at
# once while draining at shutdown.
ACK_FLUSH_ROWS = 256
ACK_LINGER_S = 2.0


class SpoolWorker:
    """Runs the blocking Spool on ONE thread, so its connection is never shared."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="spool")

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args))

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        self.spool.close()


class _Flush:
    """Queue marker: seal what the batcher holds now (shutdown, tests)."""


class Pipeline:
    """Sealer and publisher of one device's telemetry. See the module docstring."""

    def __init__(self, sealer: Sealer, worker: SpoolWorker, uplink: Uplink, device_id: str,
                 *, batch: BatchConfig | None = None, queue_size: int = 10_000,
                 clock: Callable[[], int] = time.time_ns) -> None:
        batch = batch or BatchConfig()
        self.sealer, self.worker, self.uplink = sealer, worker, uplink
        self.spool = worker.spool
        self.telemetry_topic, self.event_topic = telemetry_topic(device_id), event_topic(device_id)
        self.counters: Counter[str] = Counter()
        self._batcher = Batcher(batch.max_readings, batch.max_age_ms * 1_000_000)
        self._queue: asyncio.Queue[Reading | Event | _Flush] = asyncio.Queue(queue_size)
        self._clock = clock
        self._new_rows = asyncio.Event()  # a commit stored rows: the publisher fetches
        self._wake = asyncio.Event()  # the idle publisher: new rows, a failure, acks due
        self._progress = asyncio.Event()
        self._acked: list[int] = []  # acknowledged, not deleted yet (see ACK_FLUSH_ROWS)
        self._acked_since = 0.0  # monotonic time of the oldest of them
        self._linger: asyncio.TimerHandle | None = None  # wakes the publisher for them
        self._draining = False
        # The idle publisher's place, (stream, cursor): a commit fetches the next rows for
        # it in the same hop to the spool thread (_prefetched), see _stream.
        self._stream_no = 0
        self._idle_at: tuple[int, int] | None = None
        self._prefetched: tuple[tuple[int, int], list[SpoolRow]] | None = None
        self._refused_backoff = Backoff(uplink.config.backoff_initial_s,
                                        uplink.config.backoff_max_s)
        self._lost_bytes = 0  # of envelopes sealed whose commit failed, not yet recorded
        self._committing = False  # the sealer's commit is on the spool thread
        self.disk_full = False  # the last commit failed for want of space
        self.keep_until_commit = self.spool.config.fleet_commit

    # -- intake ---------------------------------------------------------------------
    async def emit(self, item: Reading | Event) -> None:
        """The sources' ``emit``: waits while the queue is full (backpressure)."""
        await self._queue.put(item)

    async def flush(self) -> None:
        """Seal whatever the batcher holds now, without waiting for its deadline."""
        await self._queue.put(_Flush())

    # -- task "telemetry.seal" --------------------------------------------------------
    async def run_sealer(self) -> None:
        while True:
            item = await self._next_item()
            now = self._clock()
            out: list[Outgoing] = []
            force = False
            while item is not None:
                force |= self._take(item, now, out)
                if len(out) >= MAX_ENVELOPES_PER_COMMIT or self._queue.empty():
                    break
                item = self._queue.get_nowait()
            batch = self._batcher.flush(now, force=force)
            if batch:
                out.append(Outgoing(self.sealer.seal_readings(batch), self.telemetry_topic))
            if out or self._declaration_due():
                # sealed, not yet in the spool: a drain must wait for it (wait_drained)
                self._committing = True
                try:
                    await self._commit(out)
                finally:
                    self._committing = False

    async def _next_item(self) -> Reading | Event | _Flush | None:
        deadline = self._batcher.deadline()
        if deadline is None:
            return await self._queue.get()
        timeout = (deadline - self._clock()) / 1e9
        if timeout <= 0:
            return self._queue.get_nowait() if not self._queue.empty() else None
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation
        # that arrives as the inner await completes (CPython gh-86296), and a sealer that
        # ignores its cancel would hang the agent's shutdown.
        try:
            async with asyncio.timeout(timeout):
                return await self._queue.get()
        except TimeoutError:
            return None

    def _take(self, item: Reading | Event | _Flush, now: int, out: list[Outgoing]) -> bool:
        if isinstance(item, _Flush):
            return True
        if isinstance(item, Event):
            # Events go out at once, each in its own envelope; readings batched before it
            # are sealed first, so seq order is arrival order.
            batch = self._batcher.flush(now, force=True)
            if batch:
                out.append(Outgoing(self.sealer.seal_readings(batch), self.telemetry_topic))
            out.append(Outgoing(self.sealer.seal_events([item]), self.event_topic))
            self.counters["events"] += 1
            return False
        self.counters["readings"] += 1
        batch = self._batcher.add(item, now)
        if batch:
            out.append(Outgoing(self.sealer.seal_readings(batch), self.telemetry_topic))
        return False

    def _declaration_due(self) -> bool:
        """A commit with nothing new is worth it to record lost envelopes, or to declare
        pending drops now that the uplink is up (the publisher asks with a flush)."""
        lost = self.sealer.next_seq > self.spool.next_seq
        return lost or (self.spool.pending > 0 and self.uplink.connected)

    def _lost(self, out: list[Outgoing]) -> DroppedRange | None:
        """Envelopes sealed after the committed head and before ``out``: their commit
        failed. The first of ``out`` links to the last of them (its ``prev``)."""
        first_new = out[0].envelope.seq if out else self.sealer.next_seq
        committed = self.spool.next_seq
        if first_new <= committed:
            return None
        last_hash = out[0].envelope.prev if out else self.sealer.head
        return DroppedRange(committed, first_new - 1, last_hash, first_new - committed,
                            self._lost_bytes, "disk-full", self.telemetry_topic)

    async def _commit(self, out: list[Outgoing]) -> None:
        acked = self._take_acked()
        commit = functools.partial(self._commit_and_fetch, out, self.uplink.connected,
                                   self._lost(out), acked, self._idle_at)
        try:
            prefetched = await self.worker.call(commit)
        except SpoolError as exc:
            # Nothing of `out` was stored, so nothing of it can be published; its seqs are
            # declared lost by the next commit that succeeds (see the module docstring).
            self._lost_bytes += sum(len(o.envelope.data) for o in out)
            self.disk_full = exc.reason == "disk-full"
            self.counters[f"commit_failed_{exc.reason}"] += 1
            self.counters["envelopes_lost_uncommitted"] += len(out)
            log.error("spool commit failed (%s): %d envelope(s) not stored", exc.reason,
                      len(out))
            # The acknowledged rows go on their own: on a full disk, deleting them is what
            # frees the pages the next commit needs.
            self._acked[:0] = acked
            await self._flush_acks()
            return
        self._lost_bytes = 0
        self.disk_full = False
        self.counters["envelopes_committed"] += len(out)
        if out and log.isEnabledFor(logging.DEBUG):
            log.debug("spool: committed seq %d-%d (%d bytes); %d acknowledged row(s) deleted",
                      out[0].envelope.seq, out[-1].envelope.seq,
                      sum(len(o.envelope.data) for o in out), len(acked))
        self._deleted(acked)
        if prefetched is not None:
            self._prefetched = prefetched
        self._new_rows.set()
        self._wake.set()

    def _commit_and_fetch(self, out: list[Outgoing], declare: bool, lost: DroppedRange | None,
                          acked: list[int], idle_at: tuple[int, int] | None
                          ) -> tuple[tuple[int, int], list[SpoolRow]] | None:
        """Runs on the spool thread: the commit, then, for a publisher idle at ``idle_at``,
        the fetch it would make next (saves it a hop to this thread per commit)."""
        self.spool.commit(out, self.sealer, declare=declare, lost=lost, acked=acked)
        if idle_at is None:
            return None
        try:
            return idle_at, self._fetch(idle_at[1], self.uplink.config.window)
        except SpoolError:
            return None  # committed all the same; the publisher's own fetch will say why

    # -- task "telemetry.publish" -----------------------------------------------------
    async def run_publisher(self) -> None:
        while True:
            await self.uplink.wait_connected()
            try:
                await self._stream()
            except UplinkError as exc:
                self.counters[f"publish_failed_{exc.reason}"] += 1
                if exc.reason == "disconnected":
                    await asyncio.sleep(RETRY_PAUSE_S)  # let the uplink notice (no spinning)
                else:
                    delay = self._refused_backoff.next()
                    log.warning("publish refused (%s): retrying in %.1f s", exc, delay)
                    await self._flush_acks()
                    await asyncio.sleep(delay)
            finally:
                # Rows sent without a PUBACK stay marked "in flight" until deleted: they may
                # have reached subscribers, so the drop policy must not declare them dropped.
                await self._flush_acks()

    async def _stream(self) -> None:
        """Publish from the oldest row on, in order, ``window`` at a time, until the
        connection fails (raises UplinkError). Idle, it sleeps until a commit, a failed
        publish or an acknowledgement to delete: no timer ticks while nothing happens."""
        window = asyncio.Semaphore(self.uplink.config.window)
        failed: list[UplinkError] = []
        cursor = 0
        self._stream_no += 1
        while True:
            rows = self._take_prefetched(cursor)
            if rows is None:
                self._new_rows.clear()
                rows = await self.worker.call(self._fetch, cursor, self.uplink.config.window)
            if not rows:
                await self._wait_for_rows(failed, cursor)
                continue
            for row in rows:
                await window.acquire()
                if failed:
                    raise failed[0]
                fut = self.uplink.publish_nowait(row.topic, row.data)
                log.debug("published seq %d (%d bytes) to %s", row.seq, len(row.data), row.topic)
                keep = self.keep_until_commit
                fut.add_done_callback(functools.partial(self._on_ack, row.id, keep, window,
                                                        failed))
                cursor = row.id
            if self._acks_due():
                await self._flush_acks()
            if len(rows) < self.uplink.config.window:
                # Caught up with every commit before that fetch; a later one sets _new_rows.
                await self._wait_for_rows(failed, cursor)

    def _take_prefetched(self, cursor: int) -> list[SpoolRow] | None:
        """The rows a commit fetched for this publisher while it was idle, if it is still
        where it was then (same stream, same cursor): exactly what its own fetch would
        return, read after that commit and marked in flight in the same step. The latest
        commit's fetch covers every earlier commit, hence _new_rows is cleared."""
        prefetched, self._prefetched = self._prefetched, None
        if prefetched is None or prefetched[0] != (self._stream_no, cursor):
            return None  # stale (a reconnect, or the publisher fetched itself meanwhile)
        self._new_rows.clear()
        self.counters["prefetched"] += 1
        return prefetched[1]

    async def _wait_for_rows(self, failed: list[UplinkError], cursor: int) -> None:
        """Until a commit stored rows; raises the first failed publish. Acknowledged rows
        that no commit took in time are deleted here. Drops not declared yet are declared
        now: every row kept is out, and the link is up. (Not only after a reconnect: the
        commit that was to declare them may have run in a moment the link was down, and
        the publisher does not notice a drop and reconnect while it has nothing to send.)"""
        self._idle_at = (self._stream_no, cursor)
        if self._declaration_due():
            await self.flush()  # the sealer's commit declares (Spool.commit(declare=True))
        try:
            while not self._new_rows.is_set():
                if failed:
                    raise failed[0]
                if self._acks_due():
                    await self._flush_acks()
                    continue
                self._wake.clear()
                await self._wake.wait()
        finally:
            self._idle_at = None

    def _acks_due(self) -> bool:
        return bool(self._acked) and (
            self._draining or len(self._acked) >= ACK_FLUSH_ROWS
            or time.monotonic() - self._acked_since >= ACK_LINGER_S)

    def _take_acked(self) -> list[int]:
        """The acknowledged rows, to be deleted by the caller; the linger timer is off."""
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        acked, self._acked = self._acked, []
        return acked

    def _fetch(self, cursor: int, limit: int) -> list[SpoolRow]:
        """Runs on the spool thread: fetch and mark in flight in one step, so the drop
        policy (same thread) never drops a row the publisher is about to send."""
        rows = self.spool.fetch(cursor, limit)
        for row in rows:
            self.spool.mark_in_flight(row.id)
        return rows

    def _on_ack(self, row_id: int, keep: bool, window: asyncio.Semaphore,
                failed: list[UplinkError], fut: asyncio.Future[None]) -> None:
        window.release()
        exc = fut.exception() if not fut.cancelled() else UplinkError("cancelled")
        if exc is None:
            if keep:  # stays until a fleet commit mark covers it
                self.spool.clear_in_flight((row_id,))
                self.counters["acked_kept"] += 1
            else:
                if not self._acked:  # no commit may come: wake the publisher at the latest then
                    self._acked_since = time.monotonic()
                    self._linger = asyncio.get_running_loop().call_later(ACK_LINGER_S,
                                                                         self._wake.set)
                self._acked.append(row_id)
                if self._draining:
                    self._wake.set()
            self.counters["acked"] += 1
            self._refused_backoff.reset()
        else:
            failed.append(exc if isinstance(exc, UplinkError) else UplinkError(str(exc)))
            self._wake.set()

    async def _flush_acks(self) -> None:
        if not self._acked:
            return
        ids = self._take_acked()
        try:
            await self.worker.call(self.spool.delete_acked, ids)
        except SpoolError as exc:
            # Not deleting only means sending again later (a duplicate), never a loss.
            self.counters[f"delete_failed_{exc.reason}"] += 1
            return
        self._deleted(ids)

    def _deleted(self, ids: list[int]) -> None:
        if not ids:
            return
        self.spool.clear_in_flight(ids)
        self.counters["deleted"] += len(ids)
        self._progress.set()

    # -- helpers ----------------------------------------------------------------------
    @property
    def depth(self) -> int:
        """Rows in the spool not acknowledged yet (acknowledged ones await their delete)."""
        return max(self.spool.rows - len(self._acked), 0)

    async def run(self) -> None:
        """Both tasks under one TaskGroup (for callers without their own supervisor)."""
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.run_sealer(), name="telemetry.seal")
            tg.create_task(self.run_publisher(), name="telemetry.publish")

    async def wait_drained(self, timeout_s: float) -> None:
        """Wait until everything emitted so far is sealed, published and deleted, and every
        drop is declared (its declaration published and deleted)."""
        self._draining = True  # acknowledged rows are deleted at once from now on
        self._wake.set()
        await self.flush()
        async with asyncio.timeout(timeout_s):
            while not (self._queue.empty() and len(self._batcher) == 0
                       and not self._committing and self.spool.rows == 0
                       and self.spool.pending == 0):
                self._progress.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.05):  # not wait_for: gh-86296
                        await self._progress.wait()
