"""Framed append-only files: the on-disk format of the channel store and the tower store.

Frame: ``len (4 bytes, big endian) || crc32 (4 bytes) || body``. A power cut can leave a torn
last frame (short head, short body, or a body whose CRC fails and that ends the file): it
was never acknowledged by the writer's fsync, so nothing acted on it, and reading cuts it
off (durably: truncate, fsync). A frame that claims more than ``max_bytes``, or a bad CRC in
the middle of the file, is corruption, not a torn write: SpoolError(store-corrupt), we never
guess.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

from agent.errors import SpoolError

HEAD = struct.Struct(">II")


def frame(body: bytes) -> bytes:
    return HEAD.pack(len(body), zlib.crc32(body)) + body


def read_frames(path: Path, what: str, max_bytes: int) -> list[tuple[int, bytes]]:
    """Every good frame of ``path`` as (offset, body), a torn tail cut off; ``what`` names
    the store in errors ("channel store")."""
    if not path.exists():
        return []
    data = path.read_bytes()
    frames: list[tuple[int, bytes]] = []
    pos = 0
    while pos + HEAD.size <= len(data):
        length, crc = HEAD.unpack_from(data, pos)
        end = pos + HEAD.size + length
        if length > max_bytes:
            raise SpoolError(f"{what} frame at {pos} claims {length} bytes",
                             reason="store-corrupt")
        if end > len(data):
            break  # torn body
        body = data[pos + HEAD.size:end]
        if zlib.crc32(body) != crc:
            if end == len(data):
                break  # torn last frame
            raise SpoolError(f"{what} frame at {pos} fails its CRC", reason="store-corrupt")
        frames.append((pos, body))
        pos = end
    if pos < len(data):
        with open(path, "r+b") as f:
            f.truncate(pos)
            f.flush()
            os.fsync(f.fileno())
    return frames
