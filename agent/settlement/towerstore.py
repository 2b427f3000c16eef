"""The watchtower's crash-safe store: the verified states it guards (issue 14).

Same framing and rules as the channel store (agent/channel/store.py): an append-only file
of ``len (4 B, big endian) || crc32 (4 B) || entry`` frames, each ``append`` fsync'd before
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
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

from agent import dcbor
from agent.errors import EdgeAgentError, MalformedEnvelope, SpoolError
from agent.settlement.model import SignedState

_HEAD = struct.Struct(">II")
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
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

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
            os.write(self._fd, _HEAD.pack(len(data), zlib.crc32(data)) + data)
            os.fdatasync(self._fd)
        except OSError as exc:
            raise SpoolError(f"watchtower store write failed: {exc.strerror}",
                             reason="store-write") from exc

    def _load(self) -> list[Guarded | bytes]:
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        out: list[Guarded | bytes] = []
        pos = 0
        while pos + _HEAD.size <= len(data):
            length, crc = _HEAD.unpack_from(data, pos)
            end = pos + _HEAD.size + length
            if length > MAX_ENTRY_BYTES:
                raise SpoolError(f"watchtower store frame at {pos} claims {length} bytes",
                                 reason="store-corrupt")
            if end > len(data):
                break  # torn body
            body = data[pos + _HEAD.size:end]
            if zlib.crc32(body) != crc:
                if end == len(data):
                    break  # torn last frame
                raise SpoolError(f"watchtower store frame at {pos} fails its CRC",
                                 reason="store-corrupt")
            try:
                out.append(_decode(body))
            except EdgeAgentError as exc:
                raise SpoolError(f"watchtower store frame at {pos}: {exc}",
                                 reason="store-corrupt") from exc
            pos = end
        if pos < len(data):
            with open(self.path, "r+b") as f:
                f.truncate(pos)
                os.fsync(f.fileno())
        return out

    def _rewrite(self, entries: list[Guarded]) -> None:
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        with open(tmp, "wb") as f:
            for entry in entries:
                data = _encode(entry)
                f.write(_HEAD.pack(len(data), zlib.crc32(data)) + data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, self.path)
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


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
