"""Real peers and helpers for the OBD driver tests (fixtures re-exported by conftest.py): ELM327-emulator (scenario ``car``) on a pty, and as an
SLCAN CAN interface on one end of a socat pty pair. Every process is stopped by pid in
teardown (the emulator can spin at 100% CPU once its pty peer is gone)."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.readings import Event, Reading
from firmware_adapters.base import Source

ROOT = Path(__file__).resolve().parents[3]


def _wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()  # by pid: SIGKILL, the emulator ignores a closed stdin when spinning
    proc.wait(timeout=5)


def start_emulator(tmp: Path, *extra: str, module: tuple[str, ...] = ("elm", "-s", "car")
                   ) -> tuple[subprocess.Popen[bytes], Path]:
    """The emulator as its own process, working directory ``tmp`` (its ``elm.log`` lands
    there, not in the repository). ``module``: what ``python -m`` runs before ``-b FILE``."""
    out = tmp / "elm-batch.txt"
    proc = subprocess.Popen([sys.executable, "-m", *module, "-b", str(out), *extra],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, cwd=tmp,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    return proc, out


def emulator_pty(out: Path, timeout: float = 20) -> str:
    """The pty the emulator (batch mode) wrote as the first line of its output file."""
    _wait_for(lambda: out.exists() and out.read_text().strip() != "", timeout, "emulator pty")
    return out.read_text().split()[0]


@pytest.fixture
def elm_port(tmp_path: Path) -> Iterator[str]:
    """ELM327-emulator on its own pty; yields the pty path."""
    proc, out = start_emulator(tmp_path)
    try:
        yield emulator_pty(out)
    finally:
        _stop(proc)


@pytest.fixture
def slcan_port(tmp_path: Path) -> Iterator[str]:
    """ELM327-emulator as an SLCAN adapter on one end of a socat pty pair; yields the other."""
    if shutil.which("socat") is None:
        pytest.fail("socat is required (Debian package socat)")
    emu_end, app_end = tmp_path / "emu", tmp_path / "app"
    socat = subprocess.Popen(["socat", f"pty,raw,echo=0,link={emu_end}",
                              f"pty,raw,echo=0,link={app_end}"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc = None
    try:
        _wait_for(lambda: emu_end.exists() and app_end.exists(), 10, "socat pty pair")
        proc, out = start_emulator(tmp_path, "-c", str(emu_end))
        # readiness: the emulator logs this line once its SLCAN server holds the port
        _wait_for(lambda: out.exists() and "(SLCAN) started" in out.read_text(), 20,
                  "emulator SLCAN server")
        yield str(app_end)
    finally:
        if proc is not None:
            _stop(proc)
        _stop(socat)


def emulator_values(name: str) -> list[bytes]:
    """The data bytes (after 41 PID) the emulator's 'car' scenario answers for a PID, in its
    sequential order. Read from the emulator's own table, not copied by hand."""
    from elm.obd_message import ObdMessage
    responses = ObdMessage["car"][name]["Response"]
    values = []
    for r in responses:
        data = re.findall(r"<data>(.*?)</data>", r)[0].split()
        values.append(bytes.fromhex("".join(data[2:])))
    return values


async def collect(source: Source, until: Callable[[list[Reading | Event]], bool],
                  timeout: float) -> list[Reading | Event]:
    """Run a source until ``until(items)`` holds; fail on timeout. Cancels the source."""
    items: list[Reading | Event] = []
    done = asyncio.Event()

    async def emit(item: Reading | Event) -> None:
        items.append(item)
        if until(items):
            done.set()

    task = asyncio.create_task(source.run(emit))
    try:
        await asyncio.wait_for(done.wait(), timeout)
    finally:
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
    return items


def named(items: list[Reading | Event], name: str) -> list[Reading]:
    return [i for i in items if isinstance(i, Reading) and i.name == name]


def events(items: list[Reading | Event], *, but: tuple[str, ...] = ()) -> list[Event]:
    """The events among ``items``, leaving out the codes in ``but``."""
    return [i for i in items if isinstance(i, Event) and i.code not in but]


FREEZE = ("obd-freeze-frame",)  # the simulator's stored DTC brings one freeze-frame event

