"""Crash-safe writes of small state files (issue 15.2): key store, odometer, channel store.

After a power cut a file system keeps only what was forced to the disk: a file's data once
its descriptor was fsync'd, a name in a directory once the directory was fsync'd (POSIX
fsync(2); ext4 and f2fs on SD cards behave so, "data=ordered" or not). Hence every state
file is written as:

1. a temp file next to it (``<name>.tmp``, created with its final mode: a secret is never
   readable by others, not even briefly), all bytes written, then **fsync** of the temp file;
2. **rename** over the old name (atomic: a reader sees the old file or the new one);
3. **fsync of the directory**, so the rename itself survives.

Before step 3 a power cut leaves the old file; after it, the new one; never an empty or
half-written file (without step 1, ext4 may keep the rename but not the data: a file of
length 0, e.g. an empty ``device.json`` that stops the agent from starting).

Every operation goes through a :class:`FileOps` (the default does what ``os`` does), so a
test can stop after any step and look at what a power cut would leave
(tests/agent/test_durable.py). This module imports nothing of ours: the adapters use it too.
"""

from __future__ import annotations

import os
from pathlib import Path


class FileOps:
    """The file operations the state files use; a test substitutes a recording one."""

    def open(self, path: Path, flags: int, mode: int = 0o600) -> int:
        return os.open(path, flags, mode)

    def write(self, fd: int, data: bytes) -> int:
        return os.write(fd, data)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def close(self, fd: int) -> None:
        os.close(fd)

    def replace(self, src: Path, dst: Path) -> None:
        os.replace(src, dst)

    def unlink(self, path: Path) -> None:
        os.unlink(path)

    def mkdir(self, path: Path, mode: int = 0o700) -> None:
        os.mkdir(path, mode)

    def fsync_dir(self, path: Path) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


OS = FileOps()


def write_all(ops: FileOps, fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[ops.write(fd, view.tobytes()):]


def create_file(path: Path, data: bytes, *, mode: int = 0o600, ops: FileOps = OS,
                exclusive: bool = True) -> None:
    """Create ``path`` (mode ``mode`` from the start) with ``data``, fsync'd. The name
    is durable only once the caller fsyncs the directory (several files, one fsync)."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC)
    fd = ops.open(path, flags, mode)
    try:
        write_all(ops, fd, data)
        ops.fsync(fd)
    finally:
        ops.close(fd)


def write_atomic(path: Path, data: bytes, *, mode: int = 0o600, ops: FileOps = OS) -> None:
    """Replace ``path`` with ``data``: temp file, fsync, rename, fsync of the directory."""
    tmp = path.with_name(path.name + ".tmp")
    try:  # a leftover of a crash: created anew, so it gets ``mode`` whatever it had
        ops.unlink(tmp)
    except FileNotFoundError:
        pass
    create_file(tmp, data, mode=mode, ops=ops)
    ops.replace(tmp, path)
    ops.fsync_dir(path.parent)


def make_dir(path: Path, *, mode: int = 0o700, ops: FileOps = OS) -> None:
    """``mkdir -p`` whose new directories survive a power cut (each parent fsync'd)."""
    if path.is_dir():
        return
    make_dir(path.parent, mode=mode, ops=ops)
    try:
        ops.mkdir(path, mode)
    except FileExistsError:
        return
    ops.fsync_dir(path.parent)
