"""Test support: a socat pty pair (the RS-485 cable) and an event sink."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from agent.readings import Event, Reading


class SocatPair:
    """Two linked ptys (``meter`` and ``agent`` ends). ``kill()`` pulls the cable,
    ``start()`` plugs it back in with the same paths."""

    def __init__(self, folder: Path) -> None:
        self.meter, self.agent = str(folder / "meter"), str(folder / "agent")
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> SocatPair:
        socat = shutil.which("socat")
        assert socat, "socat is required (Debian package socat)"
        self.process = subprocess.Popen(
            [socat, f"pty,raw,echo=0,link={self.meter}", f"pty,raw,echo=0,link={self.agent}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 5
        while not (os.path.exists(self.meter) and os.path.exists(self.agent)):
            assert time.monotonic() < deadline, "socat did not create the pty pair"
            time.sleep(0.005)
        return self

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=5)
            self.process = None
        # SIGKILL leaves socat no chance to remove its links: they dangle, as a device node
        # of an unplugged adapter would vanish. Remove them so start() can link again.
        for link in (self.meter, self.agent):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(link)


class Sink:
    """Collects what a source emits; tests wait on conditions, not on fixed sleeps."""

    def __init__(self) -> None:
        self.items: list[Reading | Event] = []

    async def __call__(self, item: Reading | Event) -> None:
        self.items.append(item)

    @property
    def readings(self) -> list[Reading]:
        return [i for i in self.items if isinstance(i, Reading)]

    @property
    def events(self) -> list[Event]:
        return [i for i in self.items if isinstance(i, Event)]

    def codes(self) -> list[str]:
        return [e.code for e in self.events]

    def problems(self) -> list[Event]:
        """Events other than the once-per-connection ``meter-identified``."""
        return [e for e in self.events if e.code != "meter-identified"]

    async def wait(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"condition not met in {timeout}s; events: {self.codes()}")
            await asyncio.sleep(0.01)
