"""The watchtower's crash-safe store: the verified states it guards (issue 14).

Same framing and rules as the channel store (agent/frames.py): an append-only file
of ``len || crc32 || entry`` frames, each ``append`` fsync'd before
it returns, so a state the tower acknowledged survives kill -9 or a power cut. On open a
torn last frame is cut off (it was never acknowledged); a bad frame in the middle raises
SpoolError (corruption: we never guess). A file past ``compact_bytes`` is rewritten with
only the live entries (temp file, fsync, rename, fsync of the directory).

Entries (deterministic CBOR arrays):

    [1, SignedState item, ev, cs]    a verified state and the channel's parties
    [2, channel_id]                  the channel settled: forget its states

The tower verifies entries again when it loads them: the file is not trusted more than a
hand-off.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from agent import dcbor
from agent.durable import OS, write_atomic
from agent.errors import EdgeAgentError, MalformedEnvelope, SpoolError
from agent.frames import frame, read_frames
from agent.settlement.model import SignedState

MAX_ENTRY_BYTES = 2048


@dataclass(frozen=True, slots=True)
class Guarded:
    """A verified state the tower guards, with the parties it was verified against."""

    signed: SignedState
    ev: bytes
    cs: bytes


class TowerStore:
    """Append-only, fsync'd. One writer (the tower's service)."""

    def __init__(self, path: str | os.PathLike[str], *, compact_bytes: int = 4 << 20) -> None:
        self.path = Path(path)
        entries = self._load()
        self._live: dict[bytes, list[Guarded]] = {}
        for entry in entries:
            if isinstance(entry, Guarded):
                self._live.setdefault(entry.signed.state.channel_id, []).append(entry)
            else:
                self._live.pop(entry, None)
        if self.path.exists() and self.path.stat().st_size > compact_bytes:
            self._rewrite([g for gs in self._live.values() for g in gs])
        created = not self.path.exists()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        if created:  # the new name must survive a power cut before any append counts
            OS.fsync_dir(self.path.parent)

    def guarded(self) -> list[Guarded]:
        """Every live entry, in the order written (what the tower reloads)."""
        return [g for gs in self._live.values() for g in gs]

    def add(self, entry: Guarded) -> None:
        """Durable when this returns."""
        self._write(_encode(entry))
        self._live.setdefault(entry.signed.state.channel_id, []).append(entry)

    def forget(self, channel_id: bytes) -> None:
        if self._live.pop(channel_id, None) is not None:
            self._write(dcbor.dumps([2, channel_id]))

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    # ---- internals

    def _write(self, data: bytes) -> None:
        try:
            os.write(self._fd, frame(data))
            os.fdatasync(self._fd)
        except OSError as exc:
            raise SpoolError(f"watchtower store write failed: {exc.strerror}",
                             reason="store-write") from exc

    def _load(self) -> list[Guarded | bytes]:
        out: list[Guarded | bytes] = []
        for pos, body in read_frames(self.path, "watchtower store", MAX_ENTRY_BYTES):
            try:
                out.append(_decode(body))
            except EdgeAgentError as exc:
                raise SpoolError(f"watchtower store frame at {pos}: {exc}",
                                 reason="store-corrupt") from exc
        return out

    def _rewrite(self, entries: list[Guarded]) -> None:
        write_atomic(self.path, b"".join(frame(_encode(e)) for e in entries), mode=0o600)


def _encode(entry: Guarded) -> bytes:
    return dcbor.dumps([1, entry.signed.to_cbor_item(), entry.ev, entry.cs])


def _decode(data: bytes) -> Guarded | bytes:
    item = dcbor.loads(data, max_bytes=MAX_ENTRY_BYTES)
    if isinstance(item, list) and len(item) == 4 and item[0] == 1 \
            and all(isinstance(a, bytes) and len(a) == 20 for a in item[2:]):
        return Guarded(SignedState.from_cbor_item(item[1]), item[2], item[3])
    if isinstance(item, list) and len(item) == 2 and item[0] == 2 \
            and isinstance(item[1], bytes) and len(item[1]) == 32:
        return item[1]
    raise MalformedEnvelope("not a watchtower store entry", reason="malformed-entry")
