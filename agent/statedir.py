"""The state directory: checked before use, and held by one agent at a time.

Scope: :func:`check_state_dir` turns every way a state directory can be unusable (missing
and not creatable, a file, read-only, not ours) into one clear :class:`StateDirError`;
:func:`lock_state_dir` takes an exclusive ``flock(2)`` on ``<state_dir>/agent.lock``.

Why a lock: two agents on one state directory (a technician runs ``edge-agent run`` by hand
while the service is up) share one device key and one spool. They kick each other off the
broker (same client id) and both seal envelopes with the next seq, forking the device's
signed chain. So ``run`` and every command that writes state (``keys init``/``rotate``, the
channel commands that sign with the settlement key) take the same lock, and the second one
exits at once with "another agent (pid N) uses DIR".

Why flock and not a pid file alone: the kernel drops a flock when its holder dies, even by
kill -9 or a power cut, so a stale lock never blocks a restart; the pid written into the
file is only there to name the holder in the message. The lock file is never deleted
(deleting it would let a second process lock a new inode while the first holds the old).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path

from agent.errors import StateDirError, StateDirLocked

LOCK_FILE = "agent.lock"

# Held locks, by state directory, for the life of the process: the CLI takes a lock once and
# the kernel releases it when the process exits.
_held: dict[Path, int] = {}


def check_state_dir(path: Path, *, create: bool = True) -> Path:
    """Return ``path`` if it is a directory we can write; create it (mode 0700) when it is
    missing and ``create``. Raises StateDirError naming the directory and the fix."""
    if path.exists() and not path.is_dir():
        raise StateDirError(f"state directory {path} is a file, not a directory: move it away "
                            f"or set [device] state_dir / --state-dir to a directory",
                            reason="state-dir-not-dir")
    if not path.exists():
        if not create:
            raise StateDirError(f"state directory {path} does not exist: run `edge-agent "
                                f"keys init --state-dir {path}` first", reason="state-dir-missing")
        try:
            path.mkdir(parents=True, mode=0o700)
        except FileExistsError:
            pass
        except OSError as exc:
            raise _os_error(path, exc, "cannot create") from None
    return path


def lock_state_dir(path: Path, what: str = "edge-agent", *, reentrant: bool = False) -> None:
    """Take the state directory's lock until :func:`release_state_dir` or the end of the
    process. Raises StateDirLocked when another holder has it (another process, or another
    agent in this one: flock(2) locks belong to open file descriptions), StateDirError when
    the directory is unusable. ``reentrant``: a lock this process already holds is fine
    (CLI commands; the runtime never passes it)."""
    path = check_state_dir(path)
    key = path.resolve()
    if reentrant and key in _held:   # a command run twice in one process (scripts, tests)
        return
    lock = path / LOCK_FILE
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        raise _os_error(path, exc, "cannot write to") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_pid(fd)
        os.close(fd)
        who = f"pid {holder}" if holder else "another process"
        # A second agent may want a directory of its own; a command on this device's
        # state (keys rotate, channel close) waits for the agent to stop.
        other = f", or give {what} a state directory of its own" if what == "this agent" \
            else ", then run this command again"
        raise StateDirLocked(
            f"another agent ({who}) uses {path}: stop it first (`systemctl stop edge-agent` "
            f"if it is the service){other}", pid=holder) from None
    except OSError as exc:
        os.close(fd)
        raise _os_error(path, exc, "cannot lock") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _held[key] = fd


def release_state_dir(path: Path) -> None:
    """Drop the lock early (tests, and a runtime that ends before its process does)."""
    fd = _held.pop(path.resolve(), None)
    if fd is not None:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)


def release_all() -> None:
    """Drop every lock this process holds (the CLI, when a command ends: a test or a
    script may run several commands in one process)."""
    for key in list(_held):
        release_state_dir(key)


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _os_error(path: Path, exc: OSError, doing: str) -> StateDirError:
    if exc.errno == errno.EROFS:
        return StateDirError(f"state directory {path} is on a read-only file system: put it "
                             f"on persistent, writable storage ([device] state_dir)",
                             reason="state-dir-read-only")
    if exc.errno in (errno.EACCES, errno.EPERM):
        try:
            owner = path.stat().st_uid
        except OSError:
            owner = None
        fix = f"its mode does not let its owner write: `chmod u+rwx {path}`" \
            if owner == os.geteuid() else \
            "run as the user that owns it, e.g. `sudo -u edge-agent edge-agent ...`"
        return StateDirError(f"{doing} state directory {path}: permission denied ({fix})",
                             reason="state-dir-permission")
    if exc.errno == errno.ENOTDIR:
        return StateDirError(f"state directory {path}: a part of the path is a file, not a "
                             f"directory", reason="state-dir-not-dir")
    return StateDirError(f"{doing} state directory {path}: {exc.strerror}",
                         reason="state-dir-unusable")
