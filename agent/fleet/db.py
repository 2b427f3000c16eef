"""The fleet database: SQLite (embedded default) or PostgreSQL (psycopg 3), one schema.

``open_database(url)`` takes ``sqlite:///path/fleet.db`` (``sqlite:///:memory:`` for tests) or
``postgresql://user@host:port/db``. Everything above this module writes portable SQL with
``?`` placeholders (SQLite's and the DB-API's ``qmark``); for PostgreSQL they become ``%s``.
``INSERT ... ON CONFLICT``, row values and window functions are common to both.

Tables (why each one is there):

- ``envelopes``: every verified envelope with its RAW bytes (anything can be re-verified
  later, and the logbook ships the originals), unique per (device, seq): a QoS 1 duplicate
  is a no-op, a different envelope with a stored seq is a fork (``alarms``).
- ``readings`` / ``events``: the decoded content, keyed (device, seq, idx). Reading fields
  that a newer agent adds (a meter identity, say) land in ``extra`` (JSON), so the schema
  does not have to change with them.
- ``devices``: per device the chain state that ALL workers share: ``head_seq``/``head_hash``
  (highest seq up to which the chain is contiguous, drops counted as covered: what a commit
  mark says), ``base_seq`` (where the tracked chain starts), the device's own claimed head.
  Workers lock the row (``FOR UPDATE``; SQLite serialises writers anyway) while they move it.
- ``alarms``: forks, broken links, key/device mismatches, with the offending raw bytes.
- ``rejected``: messages that did not verify, raw, with the reason: the ingest acknowledged
  them, so they must not be lost (an unknown key may be registered later).
- ``keys`` / ``revoked``: the fleet registry (agent.fleet.registry), shared by all workers.
- ``anchors``: Merkle roots submitted on chain (agent.fleet.anchor); ``anchor_proofs``: the
  offline inclusion proof of each root's transaction (agent.fleet.inclusion).

Durability: SQLite runs in WAL mode with ``synchronous=FULL``, so a commit that returned is
on disk, and only then does the ingest acknowledge to the broker (as agent.spool).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit

from agent.errors import ConfigError, EdgeAgentError
from agent.options import split_url

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS envelopes (
    device      TEXT    NOT NULL,
    seq         BIGINT  NOT NULL,
    hash        {blob}  NOT NULL,
    prev        {blob}  NOT NULL,
    kid         {blob}  NOT NULL,
    kind        TEXT    NOT NULL,
    drop_first  BIGINT,
    drop_last   BIGINT,
    drop_hash   {blob},
    raw         {blob}  NOT NULL,
    received_ns BIGINT  NOT NULL,
    stored_ns   BIGINT  NOT NULL,
    PRIMARY KEY (device, seq)
);
CREATE INDEX IF NOT EXISTS envelopes_hash ON envelopes (hash);
CREATE INDEX IF NOT EXISTS envelopes_drops ON envelopes (device, drop_last)
    WHERE drop_first IS NOT NULL;
CREATE TABLE IF NOT EXISTS readings (
    device      TEXT    NOT NULL,
    seq         BIGINT  NOT NULL,
    idx         INTEGER NOT NULL,
    name        TEXT    NOT NULL,
    value_int   BIGINT,
    value_real  {real},
    value_text  TEXT,
    value_bytes {blob},
    unit        TEXT    NOT NULL,
    ts_ns       BIGINT  NOT NULL,
    time_status TEXT    NOT NULL,
    source      TEXT    NOT NULL,
    extra       TEXT,
    PRIMARY KEY (device, seq, idx)
);
CREATE INDEX IF NOT EXISTS readings_name_ts ON readings (device, name, ts_ns);
CREATE TABLE IF NOT EXISTS events (
    device      TEXT    NOT NULL,
    seq         BIGINT  NOT NULL,
    idx         INTEGER NOT NULL,
    code        TEXT    NOT NULL,
    message     TEXT    NOT NULL,
    ts_ns       BIGINT  NOT NULL,
    source      TEXT    NOT NULL,
    details     TEXT    NOT NULL,
    PRIMARY KEY (device, seq, idx)
);
CREATE TABLE IF NOT EXISTS devices (
    device        TEXT   PRIMARY KEY,
    base_seq      BIGINT NOT NULL,
    head_seq      BIGINT NOT NULL,
    head_hash     {blob} NOT NULL,
    max_seq       BIGINT NOT NULL,
    envelopes     BIGINT NOT NULL DEFAULT 0,
    last_seen_ns  BIGINT NOT NULL DEFAULT 0,
    last_kid      {blob},
    claimed_seq   BIGINT,
    claimed_hash  {blob},
    claimed_ns    BIGINT
);
CREATE TABLE IF NOT EXISTS alarms (
    id      {serial},
    device  TEXT   NOT NULL,
    seq     BIGINT,
    kind    TEXT   NOT NULL,
    detail  TEXT   NOT NULL,
    raw     {blob},
    ts_ns   BIGINT NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS alarms_once ON alarms (device, seq, kind);
CREATE TABLE IF NOT EXISTS rejected (
    id          {serial},
    topic       TEXT   NOT NULL,
    reason      TEXT   NOT NULL,
    detail      TEXT   NOT NULL,
    raw         {blob} NOT NULL,
    received_ns BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS keys (
    kid          {blob}  PRIMARY KEY,
    device       TEXT    NOT NULL,
    ed25519      {blob}  NOT NULL,
    secp256k1    {blob}  NOT NULL,
    added_ns     BIGINT  NOT NULL,
    rotated_from {blob},
    record       {blob}
);
CREATE TABLE IF NOT EXISTS revoked (
    kid        {blob}  PRIMARY KEY,
    revoked_ns BIGINT  NOT NULL
);
CREATE TABLE IF NOT EXISTS anchors (
    id          {serial},
    root        {blob}  NOT NULL,
    leaves      BIGINT  NOT NULL,
    first_ns    BIGINT  NOT NULL,
    last_ns     BIGINT  NOT NULL,
    tx_hash     {blob},
    block       BIGINT,
    chain_id    BIGINT,
    contract    {blob},
    leaf_hashes {blob}  NOT NULL
);
CREATE TABLE IF NOT EXISTS anchor_proofs (
    root        {blob}  PRIMARY KEY,
    proof       {blob}  NOT NULL
);
"""

_SQLITE_TYPES = {"blob": "BLOB", "real": "REAL", "serial": "INTEGER PRIMARY KEY AUTOINCREMENT"}
_PG_TYPES = {"blob": "BYTEA", "real": "DOUBLE PRECISION", "serial": "BIGSERIAL PRIMARY KEY"}


class DatabaseError(EdgeAgentError):
    """The fleet database failed (cannot open, disk full, lost connection)."""

    reason = "fleet-db"


class Cursor(Protocol):
    rowcount: int

    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...


class Database:
    """One connection to the fleet database. Not thread-safe: one worker thread per
    Database (the ingest runs its writes on one thread, as the agent's spool)."""

    def __init__(self, url: str, conn: Any, dialect: str) -> None:
        self.url, self._conn, self.dialect = url, conn, dialect
        self._transient: tuple[type[BaseException], ...] = (sqlite3.OperationalError,)
        self._errors: tuple[type[BaseException], ...] = (sqlite3.Error,)
        if dialect == "postgresql":
            import psycopg

            self._errors = (psycopg.Error,)
            self._transient = (psycopg.errors.DeadlockDetected,
                               psycopg.errors.SerializationFailure,
                               psycopg.errors.UniqueViolation)

    @property
    def postgres(self) -> bool:
        return self.dialect == "postgresql"

    def sql(self, statement: str) -> str:
        return statement.replace("?", "%s") if self.postgres else statement

    def execute(self, statement: str, args: Sequence[object] = ()) -> Cursor:
        cursor: Cursor = self._conn.execute(self.sql(statement), args)
        return cursor

    def executemany(self, statement: str, rows: Sequence[Sequence[object]]) -> None:
        if not rows:
            return
        if self.postgres:
            with self._conn.cursor() as cur:
                cur.executemany(self.sql(statement), rows)  # pipelined by psycopg 3
        else:
            self._conn.executemany(statement, rows)

    def copy_rows(self, table: str, columns: Sequence[str],
                  rows: Sequence[Sequence[object]]) -> None:
        """Bulk insert (COPY on PostgreSQL: several times executemany's rate). The rows
        must be new: COPY has no ON CONFLICT (a race raises UniqueViolation, and the
        transaction is retried, see :meth:`transaction`)."""
        if not rows:
            return
        if not self.postgres:
            marks = ", ".join("?" * len(columns))
            self._conn.executemany(
                f"INSERT OR IGNORE INTO {table} ({', '.join(columns)}) VALUES ({marks})", rows)
            return
        with self._conn.cursor() as cur, \
                cur.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)

    def for_update(self) -> str:
        return " FOR UPDATE" if self.postgres else ""

    def transaction(self, work: Callable[[Database], T], attempts: int = 5) -> T:
        """Run ``work(self)`` in one transaction; retried on a deadlock, a serialization
        failure or a unique-key race with another worker (each attempt starts afresh)."""
        for attempt in range(attempts):
            try:
                with self._begin():
                    return work(self)
            except self._transient as exc:
                if attempt == attempts - 1 or (not self.postgres and "locked" not in str(exc)):
                    raise DatabaseError(f"fleet database: {exc}") from exc
                time.sleep(0.01 * (attempt + 1))
            except self._errors as exc:
                raise DatabaseError(f"fleet database: {exc}") from exc
        raise AssertionError("unreachable")

    @contextmanager
    def _begin(self) -> Iterator[None]:
        if self.postgres:
            with self._conn.transaction():
                yield
            return
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    def query(self, statement: str, args: Sequence[object] = ()) -> list[Any]:
        """A read outside any write transaction."""
        try:
            if self.postgres:
                with self._conn.transaction():
                    return list(self.execute(statement, args).fetchall())
            return list(self.execute(statement, args).fetchall())
        except self._errors as exc:
            raise DatabaseError(f"fleet database: {exc}") from exc

    def close(self) -> None:
        self._conn.close()


def open_database(url: str) -> Database:
    """Open (and create the schema of) ``sqlite:///PATH`` or ``postgresql://...``."""
    parts = split_url(url, "--db", "sqlite:///PATH or postgresql://user@host[:port]/db")
    if parts.scheme == "sqlite":
        path = url[len("sqlite:///"):] if url.startswith("sqlite:///") else ""
        if not path:
            raise ConfigError(key="--db", expected="sqlite:///PATH or postgresql://...",
                              found=url)
        try:
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")  # acknowledged => on disk (module doc)
            conn.execute("PRAGMA busy_timeout=30000")  # other ingest workers on this file
            conn.executescript(_SCHEMA.format(**_SQLITE_TYPES))
        except sqlite3.Error as exc:
            raise DatabaseError(f"{path}: cannot open the fleet database: {exc}") from exc
        return Database(url, conn, "sqlite")
    if parts.scheme in ("postgresql", "postgres"):
        try:
            import psycopg
        except ModuleNotFoundError:
            raise ConfigError("PostgreSQL needs psycopg: pip install 'ev-edge-agent[fleet]'") \
                from None
        try:
            pg = psycopg.connect(url, autocommit=True)
            with pg.transaction():
                # one DDL script at a time: concurrent workers creating the schema at once
                pg.execute("SELECT pg_advisory_xact_lock(19190019)")
                for statement in _SCHEMA.format(**_PG_TYPES).split(";"):
                    if statement.strip():
                        pg.execute(statement)
        except psycopg.Error as exc:
            raise DatabaseError(f"cannot open the fleet database {_redact(url)}: "
                                f"{str(exc).strip()}") from None
        return Database(url, pg, "postgresql")
    raise ConfigError(key="--db", expected="sqlite:///PATH or postgresql://...", found=url)


def _redact(url: str) -> str:
    """The URL without its password (secrets never reach messages)."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return "(the URL given)"  # unparsable: it may still hold a password
    if password is None:
        return url
    netloc = parts.netloc.replace(f":{password}@", ":***@")
    return parts._replace(netloc=netloc).geturl()
