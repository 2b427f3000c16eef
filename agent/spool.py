"""Durable store-and-forward for outgoing messages (DESIGN s4): SQLite in WAL mode.

Rules this module keeps:

- An envelope, its seq and the chain head (the Sealer's ``next_seq`` and ``head``) are
  committed in ONE transaction (:meth:`Spool.commit`) before anything is published. After a
  crash, :meth:`Spool.open` reads the head back, so the Sealer continues the chain: a seq is
  never reused and ``prev`` always links to what was committed. A seq sealed but never
  committed was never published either, so handing it out again after a crash is safe.
- A row leaves the spool only through :meth:`Spool.delete_acked`, which the uplink calls
  after the broker's PUBACK. Rows go out in ``id`` order (= commit order = seq order).
- Capacity is in bytes (``SpoolConfig.max_bytes``). Above it, the drop policy deletes the
  OLDEST telemetry (runs of consecutive seqs, never a row handed to the broker since this
  process started: it may have arrived without its PUBACK reaching us) until the spool is
  down to the low-water mark, and records what it deleted as a *pending drop* (first, last,
  count, bytes, last hash) in the same transaction. A pass whose run starts right after a
  pending drop extends it, so a whole outage is ONE range. The signed drop envelope
  (``Sealer.seal_drop``) is sealed from the pending drop by a later commit with
  ``declare=True`` (the pipeline asks when the uplink is connected): sealing one per pass
  would put a drop envelope, which is never dropped, between every two passes, and a later
  pass could only merge it by dropping everything older than it (the spool emptied of
  telemetry, dozens of declarations per outage). Event and drop rows are never dropped:
  they may push the spool above its cap (``counters["over_cap"]``), and a kept
  event between two runs makes two declarations.
- Envelopes sealed but never committed (a full disk) are declared the same way: the
  pipeline passes them as ``lost`` to the next commit (reason ``disk-full``).
- Every method is blocking (SQLite); the asyncio side calls them through one worker thread
  (``telemetry.SpoolWorker``), so the one connection is never used by two threads at once.

Why ``PRAGMA synchronous=FULL`` (and not NORMAL) is crash-safe here: in WAL mode a
transaction is durable once its WAL frames reach the disk. With FULL, SQLite fsyncs the WAL
at every commit, so a commit that returned survives a process crash AND a power cut; only
then do we publish. With NORMAL the WAL is fsynced only at checkpoints: a SIGKILL loses
nothing (the frames are in the OS page cache) but a power cut may roll back the last
commits - whose envelopes may already be at the broker - and the Sealer would then hand out
those seqs again for different envelopes: a reused seq and a forked chain. See
https://www.sqlite.org/pragma.html#pragma_synchronous and https://www.sqlite.org/wal.html.
Deletes after PUBACK are batched; losing one in a power cut only means a QoS 1 duplicate,
which the verifier removes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
import threading
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from agent.envelope import GENESIS, KIND_DROP, KIND_EVENT, KIND_TELEMETRY, SealedEnvelope
from agent.errors import SpoolError
from agent.options import Table

DROPPABLE = frozenset({KIND_TELEMETRY})
ROW_OVERHEAD_BYTES = 64  # rough per-row cost in SQLite beyond the payload (keys, header)
MIN_FREE_BYTES = 64 * 1024  # below this a file system counts as full (SQLite's -shm: 32 kB)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id     INTEGER PRIMARY KEY AUTOINCREMENT,
    seq    INTEGER UNIQUE,            -- every row is in the device chain (never NULL)
    kind   TEXT    NOT NULL,
    topic  TEXT    NOT NULL,
    data   BLOB    NOT NULL,
    hash   BLOB,
    nbytes INTEGER NOT NULL,
    drop_first INTEGER,               -- drop envelopes: the range they declare, its bytes
    drop_last  INTEGER,
    drop_bytes INTEGER
);
CREATE TABLE IF NOT EXISTS pending_drop (  -- dropped, not yet declared (see the docstring)
    first      INTEGER PRIMARY KEY,
    last       INTEGER NOT NULL,
    last_hash  BLOB    NOT NULL,
    count      INTEGER NOT NULL,
    nbytes     INTEGER NOT NULL,
    reason     TEXT    NOT NULL,
    topic      TEXT    NOT NULL
);
CREATE TABLE IF NOT EXISTS chain (
    one      INTEGER PRIMARY KEY CHECK (one = 1),
    next_seq INTEGER NOT NULL,
    head     BLOB    NOT NULL
);
"""


KEEP_UNTIL = ("puback", "fleet-commit")


@dataclass(frozen=True, slots=True)
class SpoolConfig:
    """``[spool]``: ``path`` (default ``<state_dir>/spool.sqlite``), ``max_bytes`` (cap),
    ``low_water`` (fraction of the cap a drop pass frees down to: after a pass the spool
    holds about ``low_water x max_bytes``, the newest telemetry). ``keep_until``.

    ``keep_until = "puback"`` (default): a row leaves after the broker's PUBACK.
    ``keep_until = "fleet-commit"``: an envelope stays until a commit mark of the fleet
    ingest (signed by one of ``commit_keys``, Ed25519 public keys in hex) covers its seq,
    because a PUBACK only says the broker has it, and a broker killed before its autosave
    loses what it acknowledged (agent.fleet_commit). PUBACK still drives the in-flight
    window; the cap and the drop policy still apply. ``head_interval_s``: how often the
    signed chain head is republished in the retained status (agent.chain_head)."""

    path: Path
    max_bytes: int = 64 * 1024 * 1024
    low_water: float = 0.5
    keep_until: str = "puback"
    commit_keys: tuple[bytes, ...] = ()
    head_interval_s: float = 30.0

    @property
    def fleet_commit(self) -> bool:
        return self.keep_until == "fleet-commit"

    @classmethod
    def from_table(cls, table: Table, state_dir: Path | None = None) -> SpoolConfig:
        default = str((state_dir or Path("/var/lib/edge-agent")) / "spool.sqlite")
        keys = []
        for index, text in enumerate(table.list("commit_keys", [])):
            try:
                key = bytes.fromhex(text) if isinstance(text, str) else b""
            except ValueError:
                key = b""
            if len(key) != 32:
                raise table.error(f"commit_keys[{index}]", "an Ed25519 public key in hex "
                                  "(`edge-agent fleet key` prints it)", text)
            keys.append(key)
        value = cls(path=table.path("path", default),
                    max_bytes=table.int("max_bytes", 64 * 1024 * 1024, min=64 * 1024),
                    low_water=table.float("low_water", 0.5, min=0.1, max=0.9),
                    keep_until=table.choice("keep_until", "puback", KEEP_UNTIL),
                    commit_keys=tuple(keys),
                    head_interval_s=table.float("head_interval_s", 30.0, min=0.1))
        if value.fleet_commit and not value.commit_keys:
            raise table.error("commit_keys", "the fleet ingest's key(s) with keep_until = "
                              "\"fleet-commit\"", [])
        table.reject_unknown()
        return value


@dataclass(frozen=True, slots=True)
class SpoolRow:
    id: int
    seq: int
    kind: str
    topic: str
    data: bytes


@dataclass(frozen=True, slots=True)
class _Row:
    id: int
    seq: int
    kind: str
    topic: str
    hash: bytes
    nbytes: int
    drop_first: int | None
    drop_last: int | None
    drop_bytes: int | None


@dataclass(frozen=True, slots=True)
class DroppedRange:
    """Envelopes ``first..last`` (``count`` of them, ``nbytes``) that will never be sent;
    ``last_hash`` is the hash of envelope ``last`` (the next one links to it)."""

    first: int
    last: int
    last_hash: bytes
    count: int
    nbytes: int
    reason: str
    topic: str  # where its declaration goes: where the envelopes would have gone


class DropSealer(Protocol):
    """What the spool needs of agent.envelope.Sealer: seal a drop, and its chain head."""

    next_seq: int
    head: bytes

    def seal_drop(self, first_seq: int, last_seq: int, last_hash: bytes, count: int,
                  nbytes: int, reason: str) -> SealedEnvelope: ...


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A sealed envelope and the topic it goes to."""

    envelope: SealedEnvelope
    topic: str


class Spool:
    """One SQLite database. Use :meth:`open`; all methods block."""

    def __init__(self, conn: sqlite3.Connection, config: SpoolConfig) -> None:
        self._db, self.config = conn, config
        self.counters: Counter[str] = Counter()
        self._in_flight: set[int] = set()
        self._lock = threading.Lock()
        row = conn.execute("SELECT COALESCE(SUM(nbytes), 0), COUNT(*) FROM outbox").fetchone()
        self.total_bytes, self.rows = int(row[0]), int(row[1])
        self.pending = self._count_pending()  # pending drops (read from the loop thread)
        head = conn.execute("SELECT next_seq, head FROM chain WHERE one = 1").fetchone()
        self.next_seq, self.head = (int(head[0]), bytes(head[1])) if head else (0, GENESIS)

    # -- opening and recovery ---------------------------------------------------------
    @classmethod
    def open(cls, config: SpoolConfig, *, check: bool = True) -> Spool:
        """Open (or create) the spool. SQLite replays or discards the WAL itself; we then
        check the file (``quick_check``) and that the chain head is ahead of every stored
        seq. Raises SpoolError: ``disk-full`` (nothing is wrong with the file; retry when
        space frees), ``spool-corrupt`` (the file is damaged), ``spool`` (other I/O)."""
        try:
            config.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            reason = "disk-full" if exc.errno == errno.ENOSPC else "spool"
            raise SpoolError(f"{config.path.parent}: cannot create: {exc.strerror}",
                             reason=reason) from exc
        conn = None
        try:
            conn = sqlite3.connect(config.path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")  # why: see the module docstring
            conn.execute("PRAGMA busy_timeout=5000")
            conn.executescript(_SCHEMA)
            columns = {r[1] for r in conn.execute("PRAGMA table_info(outbox)")}
            for column in ("drop_first", "drop_last", "drop_bytes"):  # spools of 0.1.0 dev
                if column not in columns:
                    conn.execute(f"ALTER TABLE outbox ADD COLUMN {column} INTEGER")
            if check:
                result = conn.execute("PRAGMA quick_check").fetchone()[0]
                if result != "ok":
                    raise SpoolError(f"{config.path}: integrity check failed: {result}",
                                     reason="spool-corrupt")
            spool = cls(conn, config)
        except sqlite3.Error as exc:
            if conn is not None:
                conn.close()
            reason = _reason(exc, config.path)
            what = {"disk-full": "the disk is full", "spool-corrupt": "the file is damaged"}
            raise SpoolError(f"{config.path}: cannot open spool ({what.get(reason, 'I/O')}: "
                             f"{exc})", reason=reason) from exc
        except SpoolError:
            if conn is not None:
                conn.close()
            raise
        top = conn.execute("SELECT MAX(seq) FROM outbox").fetchone()[0]
        if top is not None and top >= spool.next_seq:
            conn.close()
            raise SpoolError(f"{config.path}: stored seq {top} is not below the chain head "
                             f"{spool.next_seq}", reason="spool-corrupt")
        return spool

    def close(self) -> None:
        self._db.close()

    def integrity_check(self) -> str:
        return str(self._db.execute("PRAGMA integrity_check").fetchone()[0])

    # -- writing ----------------------------------------------------------------------
    def commit(self, items: Sequence[Outgoing], sealer: DropSealer | None = None, *,
               declare: bool = False, lost: DroppedRange | None = None,
               acked: Sequence[int] = ()) -> list[int]:
        """Store sealed envelopes and the sealer's chain head in one transaction. With
        ``sealer``: apply the drop policy when the new rows would push the spool over its
        cap; record ``lost`` (envelopes sealed but never stored) as a pending drop; and
        with ``declare``, seal every pending drop into a drop envelope, all in the same
        transaction. ``acked``: rows the broker acknowledged, deleted in the same
        transaction first (as :meth:`delete_acked` would, without a transaction and an
        fsync of their own). Returns the new row ids."""
        incoming = sum(len(i.envelope.data) + ROW_OVERHEAD_BYTES for i in items)
        try:
            with self._transaction():
                gone_bytes, gone_rows = self._delete_ids(acked)
                ids = [self._insert(i.topic, i.envelope) for i in items]
                freed, dropped_rows = gone_bytes, gone_rows
                if sealer is not None:
                    if lost is not None:
                        self._add_pending(lost)
                    if self.total_bytes - gone_bytes + incoming > self.config.max_bytes:
                        drop_freed, drop_rows = self._apply_drop_policy(incoming - gone_bytes)
                        freed, dropped_rows = freed + drop_freed, dropped_rows + drop_rows
                    if declare:
                        declared = self._declare(sealer)
                        ids += [row_id for row_id, _ in declared]
                        incoming += sum(nbytes for _, nbytes in declared)
                if items or sealer is not None:
                    next_seq, head = (sealer.next_seq, sealer.head) if sealer else \
                        (items[-1].envelope.seq + 1, items[-1].envelope.hash)
                    self._db.execute(
                        "INSERT INTO chain(one, next_seq, head) VALUES (1, ?, ?) "
                        "ON CONFLICT(one) DO UPDATE SET next_seq = excluded.next_seq, "
                        "head = excluded.head", (next_seq, head))
        except sqlite3.Error as exc:
            self._reload_totals()
            raise SpoolError(f"spool commit failed: {exc}",
                             reason=_reason(exc, self.config.path)) from exc
        self.total_bytes += incoming - freed
        self.rows += len(ids) - dropped_rows
        self.pending = self._count_pending()
        if items or sealer is not None:
            self.next_seq, self.head = next_seq, head
        if self.total_bytes > self.config.max_bytes:
            self.counters["over_cap"] += 1
        return ids

    def _insert(self, topic: str, envelope: SealedEnvelope,
                declared: tuple[int, int, int] | None = None) -> int:
        first, last, nbytes = declared or (None, None, None)
        cur = self._db.execute(
            "INSERT INTO outbox(seq, kind, topic, data, hash, nbytes, drop_first, drop_last, "
            "drop_bytes) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (envelope.seq, envelope.kind, topic, envelope.data, envelope.hash,
             len(envelope.data) + ROW_OVERHEAD_BYTES, first, last, nbytes))
        return int(cur.lastrowid or 0)

    def _apply_drop_policy(self, incoming: int) -> tuple[int, int]:
        """Delete the oldest runs of consecutive telemetry seqs (not in flight) until the
        spool, with ``incoming`` bytes added, is at the low-water mark; each run is added
        to the pending drops. Returns the bytes and rows freed."""
        target = int(self.config.max_bytes * self.config.low_water)
        freed = rows = 0
        with self._lock:
            in_flight = set(self._in_flight)
        self.counters["drop_passes"] += 1
        while self.total_bytes + incoming - freed > target:
            run = self._droppable_run(in_flight, self.total_bytes + incoming - freed - target)
            if not run:
                self.counters["nothing_droppable"] += 1
                break
            first, last = run[0], run[-1]
            nbytes = sum(r.nbytes for r in run)
            self._db.execute("DELETE FROM outbox WHERE seq BETWEEN ? AND ?", (first.seq, last.seq))
            self._add_pending(DroppedRange(first.seq, last.seq, last.hash, len(run), nbytes,
                                           "spool-full", first.topic))
            freed += nbytes
            rows += len(run)
            self.counters["dropped"] += len(run)  # envelopes deleted unsent
        return freed, rows

    def _droppable_run(self, in_flight: set[int], need: int) -> list[_Row]:
        """The oldest run of consecutive seqs of telemetry not in flight, cut once it
        covers ``need`` bytes (so a pass stops at the low-water mark, not below)."""
        run: list[_Row] = []
        covered = 0
        for row in self._rows():
            sendable = row.kind in DROPPABLE and row.id not in in_flight
            if not run:
                if sendable:
                    run, covered = [row], row.nbytes
            elif sendable and row.seq == run[-1].seq + 1:
                run.append(row)
                covered += row.nbytes
            else:
                break
            if covered >= need:
                break
        return run

    def _add_pending(self, dropped: DroppedRange) -> None:
        """Record a dropped range; one that starts right after a pending range of the
        same reason extends it (a whole outage: one range, one declaration)."""
        before = self._db.execute(
            "SELECT first FROM pending_drop WHERE last = ? AND reason = ?",
            (dropped.first - 1, dropped.reason)).fetchone()
        if before is not None:
            self._db.execute(
                "UPDATE pending_drop SET last = ?, last_hash = ?, count = count + ?, "
                "nbytes = nbytes + ? WHERE first = ?",
                (dropped.last, dropped.last_hash, dropped.count, dropped.nbytes, before[0]))
        else:
            self._db.execute(
                "INSERT INTO pending_drop(first, last, last_hash, count, nbytes, reason, "
                "topic) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (dropped.first, dropped.last, dropped.last_hash, dropped.count,
                 dropped.nbytes, dropped.reason, dropped.topic))

    def _count_pending(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM pending_drop").fetchone()[0])

    def pending_drops(self) -> list[DroppedRange]:
        """Dropped ranges not declared yet, oldest first."""
        return [DroppedRange(r[0], r[1], bytes(r[2]), r[3], r[4], r[5], r[6])
                for r in self._db.execute(
                    "SELECT first, last, last_hash, count, nbytes, reason, topic "
                    "FROM pending_drop ORDER BY first")]

    def _declare(self, sealer: DropSealer) -> list[tuple[int, int]]:
        """Seal every pending drop into a drop envelope; returns (row id, bytes) of each."""
        out = []
        for dropped in self.pending_drops():
            drop = sealer.seal_drop(dropped.first, dropped.last, dropped.last_hash,
                                    dropped.count, dropped.nbytes, dropped.reason)
            row_id = self._insert(dropped.topic, drop, (dropped.first, dropped.last, dropped.nbytes))
            self._db.execute("DELETE FROM pending_drop WHERE first = ?", (dropped.first,))
            out.append((row_id, len(drop.data) + ROW_OVERHEAD_BYTES))
            self.counters["drop_envelopes"] += 1
        return out

    def _rows(self) -> list[_Row]:
        return [_Row(*r) for r in self._db.execute(
            "SELECT id, seq, kind, topic, hash, nbytes, drop_first, drop_last, drop_bytes "
            "FROM outbox ORDER BY seq")]

    # -- reading and deleting ---------------------------------------------------------
    def fetch(self, after_id: int, limit: int) -> list[SpoolRow]:
        """Rows with id > after_id, oldest first (the publish order)."""
        try:
            rows = self._db.execute(
                "SELECT id, seq, kind, topic, data FROM outbox WHERE id > ? ORDER BY id LIMIT ?",
                (after_id, limit)).fetchall()
        except sqlite3.Error as exc:
            raise SpoolError(f"spool read failed: {exc}",
                             reason=_reason(exc, self.config.path)) from exc
        return [SpoolRow(r[0], r[1], r[2], r[3], bytes(r[4])) for r in rows]

    def delete_acked(self, ids: Iterable[int]) -> int:
        """Delete rows the broker acknowledged (PUBACK). Returns how many went."""
        ids = list(ids)
        if not ids:
            return 0
        try:
            with self._transaction():
                nbytes, count = self._delete_ids(ids)
        except sqlite3.Error as exc:
            raise SpoolError(f"spool delete failed: {exc}",
                             reason=_reason(exc, self.config.path)) from exc
        self.total_bytes -= nbytes
        self.rows -= count
        return count

    def _delete_ids(self, ids: Sequence[int]) -> tuple[int, int]:
        """Delete rows by id inside the caller's transaction; returns (bytes, rows) gone."""
        if not ids:
            return 0, 0
        marks = ",".join("?" * len(ids))
        nbytes, count = self._db.execute(
            f"SELECT COALESCE(SUM(nbytes), 0), COUNT(*) FROM outbox WHERE id IN ({marks})",
            ids).fetchone()
        self._db.execute(f"DELETE FROM outbox WHERE id IN ({marks})", ids)
        return int(nbytes), int(count)

    def delete_committed(self, seq: int, digest: bytes) -> int:
        """Delete every envelope of the device chain up to ``seq``: the fleet committed
        them (a verified commit mark). Refused (0) when the envelope at ``seq`` is still
        here with another hash: that mark is not about our chain. Returns how many went."""
        if seq >= self.next_seq:  # a mark about seqs we never sealed: not our chain
            self.counters["commit_mark_ahead"] += 1
            return 0
        try:
            with self._transaction():
                row = self._db.execute("SELECT hash FROM outbox WHERE seq = ?",
                                       (seq,)).fetchone()
                if row is not None and bytes(row[0]) != digest:
                    self.counters["commit_mark_mismatch"] += 1
                    return 0
                nbytes, count = self._db.execute(
                    "SELECT COALESCE(SUM(nbytes), 0), COUNT(*) FROM outbox "
                    "WHERE seq <= ?", (seq,)).fetchone()
                self._db.execute("DELETE FROM outbox WHERE seq <= ?", (seq,))
        except sqlite3.Error as exc:
            raise SpoolError(f"spool delete failed: {exc}", reason=_reason(exc)) from exc
        self.total_bytes -= int(nbytes)
        self.rows -= int(count)
        return int(count)

    def mark_in_flight(self, row_id: int) -> None:
        with self._lock:
            self._in_flight.add(row_id)

    def clear_in_flight(self, ids: Iterable[int] | None = None) -> None:
        with self._lock:
            if ids is None:
                self._in_flight.clear()
            else:
                self._in_flight.difference_update(ids)

    def seqs(self) -> list[int]:
        return [r[0] for r in self._db.execute(
            "SELECT seq FROM outbox ORDER BY seq")]

    def kinds(self) -> Counter[str]:
        return Counter({r[0]: r[1] for r in self._db.execute(
            "SELECT kind, COUNT(*) FROM outbox GROUP BY kind")})

    # -- helpers ----------------------------------------------------------------------
    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)

    def _reload_totals(self) -> None:
        row = self._db.execute("SELECT COALESCE(SUM(nbytes), 0), COUNT(*) FROM outbox").fetchone()
        self.total_bytes, self.rows = int(row[0]), int(row[1])


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, ROLLBACK on any exception (autocommit connection)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._db = conn

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            try:
                self._db.execute("COMMIT")
            except sqlite3.Error:
                if self._db.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        self._db.execute("ROLLBACK")
                raise
        elif self._db.in_transaction:
            # SQLite may have rolled back already (SQLITE_FULL does): keep the real error.
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")


# SQLite primary result codes (https://www.sqlite.org/rescode.html); the extended code's
# low byte is the primary one.
SQLITE_IOERR, SQLITE_CORRUPT, SQLITE_FULL, SQLITE_NOTADB = 10, 11, 13, 26


def _reason(exc: sqlite3.Error, path: Path | None = None) -> str:
    """Classify by SQLite's result code, not by message text. An I/O error while the file
    system has no free block left is a full disk too: SQLite reports ENOSPC on its -shm or
    -wal file as SQLITE_IOERR_* (\"disk I/O error\"), not as SQLITE_FULL."""
    code = getattr(exc, "sqlite_errorcode", None)
    primary = code & 0xFF if isinstance(code, int) else None
    if primary == SQLITE_FULL:
        return "disk-full"
    if primary == SQLITE_IOERR and path is not None and _no_space(path):
        return "disk-full"
    if primary in (SQLITE_CORRUPT, SQLITE_NOTADB):
        return "spool-corrupt"
    return "spool"


def _no_space(path: Path) -> bool:
    """True when the file system holding ``path`` has (almost) no block left for us."""
    try:
        info = os.statvfs(path if path.is_dir() else path.parent)
    except OSError:
        return False
    return info.f_bavail * info.f_frsize < MIN_FREE_BYTES


__all__ = ["KIND_DROP", "KIND_EVENT", "KIND_TELEMETRY", "Outgoing", "Spool",
           "SpoolConfig", "SpoolRow"]
