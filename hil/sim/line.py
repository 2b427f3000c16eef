"""An RS-485 line simulator: a relay between two ptys that paces bytes at a real baud rate.

Why: a pty delivers bytes as fast as the kernel copies them (1,920 bytes at "9600 baud" in
0.1 ms), so serial timing measured over a bare pty pair is fiction. This relay creates two
ptys, exposes their slave ends under two paths (symlinks), and moves bytes between them
no faster than the configured line: each character occupies the wire for
``LineFormat.char_time_s`` (start bit + data bits + parity + stop bits at the baud rate).
RS-485 two-wire is half duplex, so both directions share one wire clock: a byte from the
meter waits until the master's last byte has left. A new frame (the other direction
talking, or a pause of more than 1.5 characters) starts no earlier than the 3.5-character
silent interval after the previous frame ("MODBUS over Serial Line V1.02" s2.5.1.1), which
a real slave needs to see the end of the request before it can answer.

Use in-process (tests)::

    with LineSimulator(LineFormat(9600), "/tmp/x/agent", "/tmp/x/meter"):
        ...  # open /tmp/x/agent as the master's port, serve the meter on /tmp/x/meter

or as a process (the benchmark, to keep the pacing thread off the measured process's GIL):
``python -m hil.sim.line --baudrate 9600 /tmp/x/agent /tmp/x/meter``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import signal
import threading
import time
import tty
from collections import deque
from collections.abc import Sequence
from types import TracebackType

from firmware_adapters.modbus.rtu import LineFormat


class LineSimulator:
    def __init__(self, line: LineFormat, path_a: str, path_b: str) -> None:
        self.line = line
        self.paths = (path_a, path_b)
        self.bytes_relayed = 0
        self._fds: list[int] = []
        self._thread: threading.Thread | None = None
        self._stop_r, self._stop_w = -1, -1

    def start(self) -> LineSimulator:
        masters = []
        for path in self.paths:
            master, slave = os.openpty()
            tty.setraw(slave)
            tty.setraw(master)
            # Keep our own handle on the slave: without it, the master reads EIO whenever
            # the port is closed by its user (a driver reconnecting).
            self._fds += [master, slave]
            masters.append(master)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            os.symlink(os.ttyname(slave), path)
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(target=self._relay, args=tuple(masters),
                                         name="line-sim", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            os.write(self._stop_w, b"x")
            self._thread.join(timeout=5)
            self._thread = None
        for fd in [*self._fds, self._stop_r, self._stop_w]:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds, self._stop_r, self._stop_w = [], -1, -1
        for path in self.paths:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def __enter__(self) -> LineSimulator:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.stop()

    def _relay(self, master_a: int, master_b: int) -> None:
        char_time, silence = self.line.char_time_s, self.line.silent_interval_s
        peer = {master_a: master_b, master_b: master_a}
        queue: deque[tuple[float, int, int]] = deque()  # (due time, destination fd, byte)
        wire_free, talker = 0.0, -1
        while True:
            now = time.perf_counter()
            timeout = max(0.0, queue[0][0] - now) if queue else None
            readable, _, _ = select.select([master_a, master_b, self._stop_r], [], [], timeout)
            if self._stop_r in readable:
                return
            now = time.perf_counter()
            for fd in readable:
                try:
                    data = os.read(fd, 4096)
                except OSError:
                    continue
                if fd != talker or now - wire_free > 1.5 * char_time:
                    wire_free = max(now, wire_free + silence)  # a new frame
                    talker = fd
                for byte in data:
                    # A character is delivered when its last (stop) bit has been sent.
                    wire_free = max(wire_free, now) + char_time
                    queue.append((wire_free, peer[fd], byte))
            self._deliver(queue, time.perf_counter())

    def _deliver(self, queue: deque[tuple[float, int, int]], now: float) -> None:
        while queue and queue[0][0] <= now:
            destination = queue[0][1]
            chunk = bytearray()
            while queue and queue[0][0] <= now and queue[0][1] == destination:
                chunk.append(queue.popleft()[2])
            self.bytes_relayed += len(chunk)
            with contextlib.suppress(OSError):
                os.write(destination, bytes(chunk))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m hil.sim.line",
                                     description="Relay two ptys at a real serial line speed.")
    parser.add_argument("path_a")
    parser.add_argument("path_b")
    parser.add_argument("--baudrate", type=int, default=9600)
    parser.add_argument("--bytesize", type=int, choices=(7, 8), default=8)
    parser.add_argument("--parity", choices=("N", "E", "O"), default="N")
    parser.add_argument("--stopbits", type=int, choices=(1, 2), default=1)
    args = parser.parse_args(argv)
    line = LineFormat(args.baudrate, args.bytesize, args.parity, args.stopbits)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    with LineSimulator(line, args.path_a, args.path_b):
        print(f"line simulator {line.baudrate} baud {args.path_a} <-> {args.path_b}",
              flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            done.wait()


if __name__ == "__main__":
    main()
