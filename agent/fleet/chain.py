"""Chain continuity as the fleet database sees it (sans-I/O: rows in, a new head out).

The ingest keeps per device a head: the highest seq up to which the chain is contiguous,
and that envelope's hash (agent.fleet.db ``devices``). A worker that stores envelopes moves
the head while it holds the device's row lock, walking what is IN THE DATABASE (not what it
received itself): workers that each see only part of a device's stream agree on one head,
and a gap that a late replay closes is resolved by whichever worker stores the missing
envelope. Rules (DESIGN s3, agent.verify for the same rules on a capture):

- the envelope at ``head + 1`` extends the head; its ``prev`` must be the head's hash,
  else the link is broken (an edit, an insertion, a fork): an alarm, and the head moves on
  (the commit mark is about delivery; the alarm is about validity);
- a drop envelope anywhere above the head whose declared range holds ``head + 1`` covers
  the range: the head jumps to the range's last seq with the declared ``last_hash``;
- anything else above the head waits: the seqs between are a gap until they arrive.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class ChainRow:
    seq: int
    prev: bytes
    hash: bytes
    drop_first: int | None = None
    drop_last: int | None = None
    drop_hash: bytes | None = None


@dataclass
class Walk:
    seq: int
    hash: bytes
    broken: list[int] = field(default_factory=list)
    consumed_all: bool = False  # every row given was used: there may be more to fetch


def walk(head_seq: int, head_hash: bytes, rows: Sequence[ChainRow]) -> Walk:
    """Move the head over ``rows`` (envelopes above the head, any order)."""
    by_seq = {row.seq: row for row in rows}
    drops = [row for row in rows if row.drop_first is not None and row.drop_last is not None]
    result = Walk(head_seq, head_hash)
    while True:
        nxt = result.seq + 1
        row = by_seq.get(nxt)
        if row is not None:
            if row.prev != result.hash:
                result.broken.append(nxt)
            result.seq, result.hash = nxt, row.hash
            continue
        covers = [d for d in drops if d.drop_first is not None and d.drop_last is not None
                  and d.drop_first <= nxt <= d.drop_last and d.drop_hash is not None]
        if covers:
            cover = max(covers, key=lambda d: d.drop_last or 0)
            assert cover.drop_last is not None and cover.drop_hash is not None
            result.seq, result.hash = cover.drop_last, cover.drop_hash
            continue
        break
    top = max(by_seq, default=head_seq)
    result.consumed_all = bool(rows) and result.seq >= top
    return result


def missing(base_seq: int, seqs: Sequence[int],
            drops: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """The gaps: seq ranges above ``base_seq`` and below the highest stored seq that are
    neither stored nor declared dropped. ``seqs`` sorted ascending."""
    gaps: list[tuple[int, int]] = []
    previous = base_seq
    for seq in seqs:
        if seq <= previous:
            continue
        if seq > previous + 1:
            gaps.extend(uncovered(previous + 1, seq - 1, drops))
        previous = seq
    return gaps


def uncovered(first: int, last: int, drops: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    out, seq = [], first
    for lo, hi in sorted(drops):
        if hi < seq or lo > last:
            continue
        if lo > seq:
            out.append((seq, lo - 1))
        seq = max(seq, hi + 1)
        if seq > last:
            return out
    if seq <= last:
        out.append((seq, last))
    return out
