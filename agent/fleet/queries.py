"""Queries on the fleet database: ``fleet readings | gaps | devices``.

Gaps are computed from what the database holds (a window over each device's seqs, minus
the declared drop ranges), so they are the same whichever worker stored what, and a late
replay that fills one makes it disappear. A device whose own signed chain head (status,
last will) names a seq above the highest stored has a missing tail.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

from agent.fleet.chain import uncovered
from agent.fleet.db import Database


def gaps(db: Database, device: str | None = None) -> list[tuple[str, int, int]]:
    """(device, first, last) of every range of seqs missing and not declared dropped."""
    where, args = ("WHERE device = ?", (device,)) if device else ("", ())
    bases = {d: int(b) for d, b in db.query(f"SELECT device, base_seq FROM devices {where}",
                                            args)}
    holes: dict[str, list[tuple[int, int]]] = {}
    # Where the seq after a stored one is not stored: the window function finds the
    # edges in the database, Python only subtracts declared drops.
    for dev, seq, nxt in db.query(
            "SELECT device, seq, nxt FROM (SELECT device, seq, LEAD(seq) OVER "
            "(PARTITION BY device ORDER BY seq) AS nxt FROM envelopes "
            f"{where}) AS t WHERE nxt IS NOT NULL AND nxt > seq + 1", args):
        holes.setdefault(dev, []).append((int(seq), int(nxt)))
    firsts = {d: int(s) for d, s in db.query(
        f"SELECT device, MIN(seq) FROM envelopes {where} GROUP BY device", args)}
    drops: dict[str, list[tuple[int, int]]] = {}
    for dev, first, last in db.query(
            "SELECT device, drop_first, drop_last FROM envelopes WHERE drop_first IS NOT NULL"
            + (" AND device = ?" if device else ""), args):
        drops.setdefault(dev, []).append((int(first), int(last)))
    out = []
    for dev in sorted(set(bases) | set(holes)):
        base = bases.get(dev, firsts.get(dev, 0) - 1)
        ranges = [(seq + 1, nxt - 1) for seq, nxt in holes.get(dev, []) if nxt - 1 > base]
        if dev in firsts and firsts[dev] > base + 1:
            ranges.insert(0, (base + 1, firsts[dev] - 1))
        for first, last in ranges:
            out += [(dev, a, b) for a, b in uncovered(max(first, base + 1), last,
                                                      drops.get(dev, []))]
    return out


def tails(db: Database, device: str | None = None) -> list[tuple[str, int, int]]:
    """(device, first, last) of every missing TAIL: seqs above the highest stored that the
    device's own signed head (its retained status, last will or timer: agent.chain_head)
    says it has sealed. No window over stored rows can see these; only the device's word
    can. Workers read the retained heads through a plain subscription (agent.fleet.mqtt)."""
    where, args = ("AND device = ?", (device,)) if device else ("", ())
    return [(dev, max(int(top), int(base)) + 1, int(claimed)) for dev, base, top, claimed in
            db.query("SELECT device, base_seq, max_seq, claimed_seq FROM devices WHERE "
                     f"claimed_seq IS NOT NULL AND claimed_seq > max_seq {where} "
                     "ORDER BY device", args)
            if int(claimed) > max(int(top), int(base))]


@dataclass(frozen=True, slots=True)
class DeviceRow:
    device: str
    envelopes: int
    head_seq: int
    max_seq: int
    last_seen_ns: int
    kid: str
    claimed_seq: int | None
    gaps: int
    alarms: int

    @property
    def chain(self) -> str:
        if self.alarms:
            return f"ALARM ({self.alarms})"
        if self.gaps:
            return f"gaps ({self.gaps} missing)"
        if self.claimed_seq is not None and self.claimed_seq > self.max_seq:
            return f"missing tail (device says seq {self.claimed_seq}, last seen {self.max_seq})"
        return "ok"


def devices(db: Database) -> list[DeviceRow]:
    missing_by_device: dict[str, int] = {}
    for dev, first, last in gaps(db):
        missing_by_device[dev] = missing_by_device.get(dev, 0) + last - first + 1
    alarms = dict(db.query("SELECT device, COUNT(*) FROM alarms GROUP BY device"))
    rows = []
    for dev, count, head, top, seen, kid, claimed in db.query(
            "SELECT device, envelopes, head_seq, max_seq, last_seen_ns, last_kid, claimed_seq "
            "FROM devices ORDER BY device"):
        rows.append(DeviceRow(dev, int(count), int(head), int(top), int(seen),
                              bytes(kid).hex() if kid is not None else "",
                              int(claimed) if claimed is not None else None,
                              missing_by_device.get(dev, 0), int(alarms.get(dev, 0))))
    return rows


def readings(db: Database, *, device: str | None = None, name: str | None = None,
             since_ns: int | None = None, until_ns: int | None = None) -> Iterator[dict[str, object]]:
    clauses: list[str] = []
    args: list[object] = []
    for column, op, bound in (("device", "=", device), ("name", "=", name),
                              ("ts_ns", ">=", since_ns), ("ts_ns", "<", until_ns)):
        if bound is not None:
            clauses.append(f"{column} {op} ?")
            args.append(bound)
    where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
    for row in db.query(
            "SELECT device, seq, idx, name, value_int, value_real, value_text, value_bytes, "
            f"unit, ts_ns, time_status, source, extra FROM readings {where} "
            "ORDER BY device, ts_ns, seq, idx", args):
        dev, seq, idx, rname, v_int, v_real, v_text, v_bytes, unit, ts, status, source, extra = row
        value: object = next((v for v in (v_int, v_real, v_text) if v is not None), None)
        if v_bytes is not None:
            value = bytes(v_bytes).hex()
        item: dict[str, object] = {"device": dev, "seq": int(seq), "idx": int(idx),
                                   "name": rname, "value": value, "unit": unit,
                                   "ts_ns": int(ts), "time_status": status, "source": source}
        if extra:
            item.update(json.loads(extra))
        yield item
