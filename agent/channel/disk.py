"""fdatasync of the channel store in a helper process, so the event loop never waits for
the disk and never fights a thread for the GIL.

Why a process. Every channel update must be durable before its signature leaves (DESIGN
s5), and the loop has other work meanwhile (the next message, the meter, telemetry).
- fsync on the loop: a slow SD card (several ms per fdatasync) would stall the whole agent
  on every update.
- fsync in a thread (``asyncio.to_thread`` or a thread of our own): the thread takes the GIL
  back after every system call, while the loop thread releases it on every socket call; the
  hand-offs cost ~0.2 ms of CPU per update here, more than the fdatasync itself, and cut the
  channel's rate by a third (bench/channel.py: 590-690 updates/s against 735-910 inline).
- A helper process has its own interpreter. The loop writes the records into the page cache
  itself (a few us), then writes an 8-byte ticket into a pipe; the helper calls
  ``fdatasync`` on the same file (it inherited the descriptor: fdatasync flushes the file,
  whoever wrote it) and writes the highest ticket back. Requests that queue up during one
  fdatasync share the next one (group commit).

The helper runs ``python -I -S`` on a dozen lines, costs a few MB, and exits when the
request pipe closes (our process ended, however it ended). If it dies or fdatasync fails,
every waiting step fails with SpoolError: nothing unsynced is ever published.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections import deque
from collections.abc import Callable

from agent.errors import SpoolError

Done = Callable[[BaseException | None], None]
_TICKET = 8
_FAILED = 1 << 63  # ticket bit: fdatasync failed; the low bits carry errno

_HELPER = """
import os, sys
fd, requests, acks = (int(a) for a in sys.argv[1:4])
try:
    while data := os.read(requests, 4096):
        try:
            os.fdatasync(fd)
        except OSError as exc:
            os.write(acks, ((1 << 63) | exc.errno).to_bytes(8, "big"))
            break
        os.write(acks, data[-8:])  # tickets are 8-byte atomic pipe writes
except (OSError, KeyboardInterrupt):
    pass
"""


class FsyncHelper:
    """``sync(done)``: make everything written to ``fd`` so far durable, then call
    ``done(None)`` on the loop (``done(error)`` if that cannot be done)."""

    def __init__(self, fd: int) -> None:
        self._loop = asyncio.get_running_loop()
        req_r, self._requests = os.pipe()
        self._acks, ack_w = os.pipe()
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _HELPER, str(fd), str(req_r), str(ack_w)],
                pass_fds=(fd, req_r, ack_w), stdin=subprocess.DEVNULL)
        finally:
            os.close(req_r)
            os.close(ack_w)
        os.set_blocking(self._acks, False)
        self._ticket = 0
        self._waiting: deque[tuple[int, Done]] = deque()
        self._loop.add_reader(self._acks, self._on_acks)

    def sync(self, done: Done) -> None:
        self._ticket += 1
        self._waiting.append((self._ticket, done))
        try:
            os.write(self._requests, self._ticket.to_bytes(_TICKET, "big"))
        except OSError as exc:  # the helper is gone (EPIPE)
            self._fail(SpoolError(f"channel store fsync helper is gone ({exc.strerror})",
                                  reason="store-write"))

    def close(self) -> None:
        """Stop the helper once the fdatasync in hand is done (a write is never torn by us);
        waiting ``done`` callbacks are dropped, as in a crash."""
        if self._requests < 0:
            return
        self._loop.remove_reader(self._acks)
        os.close(self._requests)
        os.close(self._acks)
        self._requests = self._acks = -1
        self._waiting.clear()
        try:
            self._proc.wait(2)
        except subprocess.TimeoutExpired:
            self._proc.kill()

    def _on_acks(self) -> None:
        try:
            data = os.read(self._acks, 4096)
        except BlockingIOError:
            return
        if not data:
            self._fail(SpoolError("channel store fsync helper exited", reason="store-write"))
            return
        # Tickets are 8-byte writes, atomic on a pipe, and 4096 is a multiple of 8: a read
        # returns whole tickets. The last one is the highest.
        ticket = int.from_bytes(data[-_TICKET:], "big")
        if ticket & _FAILED:
            self._fail(SpoolError(f"channel store fdatasync failed: "
                                  f"{os.strerror(ticket & 0xFFFF)}", reason="store-write"))
            return
        while self._waiting and self._waiting[0][0] <= ticket:
            self._waiting.popleft()[1](None)

    def _fail(self, error: SpoolError) -> None:
        waiting = list(self._waiting)
        self.close()
        for _, done in waiting:
            done(error)
