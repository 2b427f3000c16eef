"""Crash-safe store of one channel: an fsync'd append-only file of records.

Why a file and not SQLite: the channel writes one small record per update and never
queries; an append plus ``fdatasync`` is the cheapest durable write there is (~0.1 ms here,
one per update on the hot path, DESIGN s5 "persist before you sign / act").

Frames (agent/frames.py): ``len || crc32 || record`` where ``record`` is the deterministic
CBOR of agent.channel.records. A power cut can leave a torn last frame; on open every frame
is checked and the file is truncated after the last good one (a torn frame was never
acknowledged by ``append``, so nothing acted on it). A bad frame in the middle (corruption,
not a torn write) raises SpoolError: we never guess.

``append(records)`` writes all records of one step with one fsync and returns only when
they are durable. On open, a file that grew past ``compact_bytes`` is rewritten with only
what restore needs (atomic: temp file, fsync, rename, fsync of the directory; a new store
file's directory is fsync'd before the first append, so its name survives a power cut).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from agent.channel.records import (
    KEEP_METERS,
    ClockRecord,
    CosignedRecord,
    FundedRecord,
    MeterRecord,
    MeterReserveRecord,
    NonceReserveRecord,
    OpenRecord,
    Record,
    SignedRecord,
    decode_record,
    encode_record,
)
from agent.durable import OS, write_atomic
from agent.errors import EdgeAgentError, SpoolError
from agent.frames import frame, read_frames

MAX_RECORD_BYTES = 8192


class ChannelStore:
    """One channel's records in ``path``. Not thread-safe; one writer."""

    def __init__(self, path: str | os.PathLike[str], *, compact_bytes: int = 1 << 20,
                 sync: bool = True) -> None:
        self.path = Path(path)
        self.sync = sync  # False only for benchmarks that measure the cost of fsync
        self.appends = 0
        self._records = self._load()
        if self.path.exists() and self.path.stat().st_size > compact_bytes:
            self._records = compact(self._records)
            self._rewrite(self._records)
        created = not self.path.exists()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        if created:  # the new name must survive a power cut before any append counts
            OS.fsync_dir(self.path.parent)

    def records(self) -> list[Record]:
        """Everything persisted, in order (what ``restore`` replays)."""
        return list(self._records)

    def append(self, records: Iterable[Record], *, sync: bool = True) -> None:
        """Write ``records``; with ``sync`` (and a syncing store) they are durable when this
        returns, and so is everything written before them."""
        frames = []
        batch = list(records)
        for record in batch:
            data = encode_record(record)
            frames.append(frame(data))
        if not frames:
            return
        try:
            os.write(self._fd, b"".join(frames))
            if self.sync and sync:
                os.fdatasync(self._fd)
        except OSError as exc:
            raise SpoolError(f"channel store write failed: {exc.strerror}",
                             reason="store-write") from exc
        self._records.extend(batch)
        self.appends += 1

    def fileno(self) -> int:
        """The append descriptor: fdatasync on it makes every append durable
        (agent/channel/disk.py does that in a helper process)."""
        return self._fd

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> ChannelStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- internals

    def _load(self) -> list[Record]:
        records: list[Record] = []
        for pos, body in read_frames(self.path, "channel store", MAX_RECORD_BYTES):
            try:
                records.append(decode_record(body))
            except EdgeAgentError as exc:
                raise SpoolError(f"channel store frame at {pos}: {exc}",
                                 reason="store-corrupt") from exc
        return records

    def _rewrite(self, records: list[Record]) -> None:
        frames = []
        for record in records:
            data = encode_record(record)
            frames.append(frame(data))
        write_atomic(self.path, b"".join(frames), mode=0o600)


def compact(records: list[Record]) -> list[Record]:
    """What restore needs: OPEN, FUNDED, the highest METER and nonce reservations, the last
    meters, the latest co-signed state and our signatures above it (plus the highest one
    signed), so no nonce and no METER counter is ever signed twice."""
    cosigned = None
    for r in records:
        if isinstance(r, CosignedRecord) and (cosigned is None or r.state.nonce > cosigned.state.nonce):
            cosigned = r
    floor = cosigned.state.nonce if cosigned else 0
    signed = [r for r in records if isinstance(r, SignedRecord)]
    keep_signed = [r for r in signed if r.state.nonce > floor]
    if signed and not keep_signed:
        keep_signed = [max(signed, key=lambda r: r.state.nonce)]
    meters = [r for r in records if isinstance(r, MeterRecord)][-KEEP_METERS:]
    head = [r for r in records if isinstance(r, OpenRecord | FundedRecord | ClockRecord)]
    reserves = [r for r in records if isinstance(r, MeterReserveRecord)]
    reserve = [max(reserves, key=lambda r: r.counter_hi)] if reserves else []
    nonces = [r for r in records if isinstance(r, NonceReserveRecord)]
    nonce_reserve = [max(nonces, key=lambda r: r.nonce_hi)] if nonces else []
    return (head + reserve + nonce_reserve + meters + keep_signed
            + ([cosigned] if cosigned else []))
