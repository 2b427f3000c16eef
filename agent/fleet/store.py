"""Storing verified envelopes: one transaction per batch, idempotent, forks found.

``store_batch(db, batch)`` runs in ONE transaction (the ingest acknowledges the batch's
messages to the broker only after it returned):

1. which (device, seq) of the batch are stored already, and with which hash: the same hash
   is a QoS 1 duplicate (nothing to do), another hash is a fork (an alarm with both);
2. the new envelopes (raw bytes kept), their readings and events;
3. per device touched, in device order (no deadlock between workers), the device row is
   locked and its head moved over what the database holds (agent.fleet.chain), broken
   links become alarms;
4. messages that did not verify go to ``rejected`` with their reason, raw.

It returns, per device, the head after the transaction: what the commit mark says.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from agent.envelope import KIND_DROP, ChainHead, OpenedEnvelope
from agent.errors import RemoteProtocolError, SignatureError
from agent.fleet.chain import ChainRow, Walk, walk
from agent.fleet.db import Database
from agent.fleet.registry import RegistrySnapshot
from agent.readings import Reading

INT64 = (-(1 << 63), (1 << 63) - 1)
_READING_CORE = {"name", "value", "unit", "ts_ns", "time_status", "source"}
READING_COLUMNS = ("device", "seq", "idx", "name", "value_int", "value_real", "value_text",
                   "value_bytes", "unit", "ts_ns", "time_status", "source", "extra")
EVENT_COLUMNS = ("device", "seq", "idx", "code", "message", "ts_ns", "source", "details")
WALK_ROWS = 512
# the Reading fields beyond the core six, found once (dataclasses.fields per reading was a
# tenth of the ingest's time)
_READING_EXTRA = tuple((f.name, f.default) for f in dataclasses.fields(Reading)
                       if f.name not in _READING_CORE)


@dataclass(frozen=True, slots=True)
class Verified:
    opened: OpenedEnvelope
    raw: bytes
    received_ns: int


@dataclass(frozen=True, slots=True)
class Rejection:
    topic: str
    raw: bytes
    reason: str
    detail: str
    received_ns: int
    device: str | None = None  # set when the alarm belongs to a device (key mismatch)
    seq: int | None = None     # the seq the envelope claims, when it opened


@dataclass
class BatchResult:
    counters: Counter[str] = field(default_factory=Counter)
    heads: dict[str, tuple[int, bytes]] = field(default_factory=dict)  # device -> head
    advanced: set[str] = field(default_factory=set)
    behind_head: set[str] = field(default_factory=set)  # duplicates the head covers already
    new_hashes: list[bytes] = field(default_factory=list)  # stored by this batch (anchoring)


def store_batch(db: Database, batch: Sequence[Verified], rejected: Sequence[Rejection] = (),
                claims: Sequence[ChainHead] = ()) -> BatchResult:
    """See the module docstring. Retried as a whole on a race with another worker."""
    ordered = sorted(batch, key=lambda v: (v.opened.device, v.opened.seq))
    return db.transaction(lambda d: _store(d, ordered, rejected, claims))


def _store(db: Database, batch: Sequence[Verified], rejected: Sequence[Rejection],
           claims: Sequence[ChainHead]) -> BatchResult:
    result = BatchResult()
    now = time.time_ns()
    stored = _stored_hashes(db, [(v.opened.device, v.opened.seq) for v in batch])
    new: list[Verified] = []
    seen: dict[tuple[str, int], bytes] = {}
    for item in batch:
        key = (item.opened.device, item.opened.seq)
        known = stored.get(key) or seen.get(key)
        if known is None:
            new.append(item)
            seen[key] = item.opened.hash
        elif known == item.opened.hash:
            result.counters["duplicates"] += 1
        else:
            result.counters["forks"] += 1
            _alarm(db, item.opened.device, item.opened.seq, "fork",
                   f"seq {item.opened.seq} stored with hash {known.hex()[:16]}, this one "
                   f"{item.opened.hash.hex()[:16]}", item.raw, now)
    _insert(db, new, now)
    result.new_hashes = [item.opened.hash for item in new]
    result.counters["stored"] += len(new)
    result.counters["readings"] += sum(len(v.opened.readings) for v in new)
    if batch:
        _advance_all(db, batch, Counter(v.opened.device for v in new), now, result)
    for claim in claims:
        db.execute("UPDATE devices SET claimed_seq = ?, claimed_hash = ?, claimed_ns = ? "
                   "WHERE device = ? AND (claimed_seq IS NULL OR claimed_seq <= ?)",
                   (claim.seq, claim.hash, claim.ts_ns, claim.device, claim.seq))
    for refused in rejected:
        db.execute("INSERT INTO rejected (topic, reason, detail, raw, received_ns) "
                   "VALUES (?, ?, ?, ?, ?)", (refused.topic, refused.reason,
                                              refused.detail[:500], refused.raw,
                                              refused.received_ns))
        if refused.device is not None:
            _alarm(db, refused.device, refused.seq, refused.reason, refused.detail, refused.raw,
                   now)
        result.counters[f"rejected_{refused.reason}"] += 1
    return result


def _stored_hashes(db: Database, keys: Sequence[tuple[str, int]]) -> dict[tuple[str, int], bytes]:
    found: dict[tuple[str, int], bytes] = {}
    for start in range(0, len(keys), 400):
        chunk = keys[start:start + 400]
        values = ", ".join("(?, ?)" for _ in chunk)
        args = [x for key in chunk for x in key]
        for device, seq, digest in db.execute(
                f"SELECT device, seq, hash FROM envelopes WHERE (device, seq) IN "
                f"(VALUES {values})", args).fetchall():
            found[(device, int(seq))] = bytes(digest)
    return found


def _insert(db: Database, new: Sequence[Verified], now: int) -> None:
    envelopes, readings, events = [], [], []
    for item in new:
        o = item.opened
        drop = o.drop
        envelopes.append((o.device, o.seq, o.hash, o.prev, o.kid, o.kind,
                          drop.first if drop else None, drop.last if drop else None,
                          drop.last_hash if drop else None, item.raw, item.received_ns, now))
        readings += [(o.device, o.seq, idx, *reading_columns(r)) for idx, r in
                     enumerate(o.readings)]
        events += [(o.device, o.seq, idx, e.code, e.message, e.ts_ns, e.source,
                    json.dumps(dict(e.details), sort_keys=True)) for idx, e in
                   enumerate(o.events)]
    # ON CONFLICT: another worker may have stored the same envelope since our look-up;
    # its readings then conflict too, and the whole transaction is retried (db.transaction).
    db.executemany("INSERT INTO envelopes (device, seq, hash, prev, kid, kind, drop_first, "
                   "drop_last, drop_hash, raw, received_ns, stored_ns) VALUES "
                   "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING", envelopes)
    db.copy_rows("readings", READING_COLUMNS, readings)
    db.copy_rows("events", EVENT_COLUMNS, events)


def reading_columns(reading: Reading) -> tuple[object, ...]:
    """name, value_int, value_real, value_text, value_bytes, unit, ts_ns, time_status,
    source, extra. Fields beyond the core six (flags; a meter identity a newer Reading may
    carry) go to ``extra`` as JSON, so new optional fields need no schema change."""
    value = reading.value
    v_int = value if isinstance(value, int) and INT64[0] <= value <= INT64[1] else None
    v_real = float(value) if isinstance(value, float) else None
    v_text = value if isinstance(value, str) else None
    if isinstance(value, int) and v_int is None:
        v_text = str(value)  # beyond 64 bits: exact as text
    v_bytes = value if isinstance(value, bytes) else None
    extra = {}
    for name, default in _READING_EXTRA:
        item = getattr(reading, name)
        if item not in (None, (), "", default):
            extra[name] = list(item) if isinstance(item, tuple) else item
    return (reading.name, v_int, v_real, v_text, v_bytes, reading.unit, reading.ts_ns,
            reading.time_status.value, reading.source,
            json.dumps(extra, sort_keys=True, default=str) if extra else None)


def _advance_all(db: Database, batch: Sequence[Verified], new: Counter[str], now: int,
                 result: BatchResult) -> None:
    """Move the heads of every device in the batch, set-based: a handful of statements per
    batch whatever the number of devices (a fleet of 1,000 devices puts hundreds of
    devices in one batch; a statement per device was most of the ingest's time)."""
    by_device: dict[str, list[Verified]] = {}
    for item in batch:
        by_device.setdefault(item.opened.device, []).append(item)
    names = sorted(by_device)
    # First contact with a device no registry add created: the chain is tracked from the
    # first envelope seen (a capture may start mid-stream). Registered devices start at -1.
    firsts = []
    for device in names:
        lowest = min(by_device[device], key=lambda v: v.opened.seq).opened
        firsts.append((device, lowest.seq - 1, lowest.seq - 1, lowest.prev, -1))
    db.executemany("INSERT INTO devices (device, base_seq, head_seq, head_hash, max_seq) "
                   "VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING", firsts)
    heads: dict[str, tuple[int, bytes]] = {}
    rows: dict[str, list[ChainRow]] = {device: [] for device in names}
    for start in range(0, len(names), 400):
        chunk = names[start:start + 400]
        marks = ", ".join("?" * len(chunk))
        # in device order, so two workers never wait on each other in a cycle
        for device, head_seq, head_hash in db.execute(
                f"SELECT device, head_seq, head_hash FROM devices WHERE device IN ({marks}) "
                f"ORDER BY device{db.for_update()}", chunk).fetchall():
            heads[device] = (int(head_seq), bytes(head_hash))
        for statement, args in (
                ("e.seq > d.head_seq AND e.seq <= d.head_seq + ?", [*chunk, WALK_ROWS]),
                ("e.drop_first IS NOT NULL AND e.drop_last > d.head_seq", chunk)):
            for r in db.execute(
                    "SELECT e.device, e.seq, e.prev, e.hash, e.drop_first, e.drop_last, "
                    "e.drop_hash FROM envelopes e JOIN devices d ON d.device = e.device "
                    f"WHERE d.device IN ({marks}) AND {statement}", args).fetchall():
                rows[r[0]].append(ChainRow(int(r[1]), bytes(r[2]), bytes(r[3]), r[4], r[5],
                                           bytes(r[6]) if r[6] is not None else None))
    updates = []
    for device in names:
        head_seq, head_hash = heads[device]
        moved = walk(head_seq, head_hash, rows[device])
        if moved.consumed_all and len(rows[device]) >= WALK_ROWS:
            moved = _walk_on(db, device, moved)  # more than a window to catch up (rare)
        for seq in moved.broken:
            _alarm(db, device, seq, "broken-link", f"prev of seq {seq} is not the hash of "
                   f"seq {seq - 1}", None, now)
            result.counters["broken_links"] += 1
        items = by_device[device]
        top = max(v.opened.seq for v in items)
        updates.append((moved.seq, moved.hash, top, top, new[device], now,
                        items[-1].opened.kid, device))
        result.heads[device] = (moved.seq, moved.hash)
        if moved.seq > head_seq:
            result.advanced.add(device)
        elif any(v.opened.seq <= moved.seq for v in items):
            result.behind_head.add(device)
    db.executemany("UPDATE devices SET head_seq = ?, head_hash = ?, "
                   "max_seq = CASE WHEN max_seq < ? THEN ? ELSE max_seq END, "
                   "envelopes = envelopes + ?, last_seen_ns = ?, last_kid = ? WHERE device = ?",
                   updates)


def _walk_on(db: Database, device: str, moved: Walk) -> Walk:
    broken = list(moved.broken)
    while True:
        rows = [ChainRow(int(r[0]), bytes(r[1]), bytes(r[2]), r[3], r[4],
                         bytes(r[5]) if r[5] is not None else None)
                for r in db.execute(
                    "SELECT seq, prev, hash, drop_first, drop_last, drop_hash FROM envelopes "
                    "WHERE device = ? AND seq > ? ORDER BY seq LIMIT ?",
                    (device, moved.seq, WALK_ROWS)).fetchall()]
        step = walk(moved.seq, moved.hash, rows)
        broken += step.broken
        progressed = step.seq != moved.seq
        moved = Walk(step.seq, step.hash, broken, step.consumed_all)
        if not (progressed and step.consumed_all and len(rows) == WALK_ROWS):
            return moved


def _alarm(db: Database, device: str, seq: int | None, kind: str, detail: str,
           raw: bytes | None, now: int) -> None:
    db.execute("INSERT INTO alarms (device, seq, kind, detail, raw, ts_ns) "
               "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
               (device, seq, kind, detail, raw, now))


__all__ = ["KIND_DROP", "BatchResult", "Rejection", "Verified", "store_batch"]


def reverify_rejected(db: Database, snapshot: RegistrySnapshot) -> tuple[int, int]:
    """``fleet reverify``: look again at what the ingest refused (and acknowledged, so kept
    raw): an envelope of a key registered since then is stored now and leaves `rejected`.
    Returns (stored, still refused)."""
    rows = db.query("SELECT id, raw, received_ns FROM rejected ORDER BY id")
    good: list[Verified] = []
    ids: list[int] = []
    for row_id, raw, received_ns in rows:
        try:
            opened = snapshot.open(bytes(raw))
        except (SignatureError, RemoteProtocolError):
            continue
        if snapshot.registry.device_of(opened.kid) == opened.device:
            good.append(Verified(opened, bytes(raw), int(received_ns)))
            ids.append(int(row_id))
    if good:
        store_batch(db, good)
        db.transaction(lambda d: d.executemany("DELETE FROM rejected WHERE id = ?",
                                               [(i,) for i in ids]))
    return len(good), len(rows) - len(good)
