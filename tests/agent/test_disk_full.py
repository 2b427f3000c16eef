"""A full disk for real: a small tmpfs mounted by the test (issue 15.5).

`edge-agent run` restarted on a full disk used to exit with "cannot open spool: disk I/O
error" classified `spool-corrupt`. Now it is `disk-full`: the agent starts, says so in its
status and on the notify socket, and streams as soon as space frees, its first envelope a
signed `spool-disk-full` event naming the time in which no reading was taken.

Mounting needs root (or CAP_SYS_ADMIN): the test fails, never skips, without it.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.errors import SpoolError
from agent.live_verify import TOPICS, mqtt_config
from agent.spool import Spool, SpoolConfig
from agent.status import read_status
from agent.uplink import Uplink
from agent.verify import Verifier
from tests.agent.test_runtime import (
    METER,
    NotifySocket,
    provision,
    start_agent,
    station_config,
    stop_agent,
)


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs: a file system that really runs out of space (ENOSPC)."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs",
                           str(mount)], capture_output=True, text=True)
    assert done.returncode == 0, f"mounting a tmpfs needs root: {done.stderr.strip()}"
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def fill(directory: Path) -> Path:
    """Write a file until the file system is full; returns it (delete it to free space)."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 65536)
    except OSError as exc:
        assert exc.errno == 28  # ENOSPC
    try:
        while True:  # the last blocks, smaller than a chunk
            os.write(fd, b"\0" * 512)
    except OSError:
        pass
    finally:
        os.close(fd)
    return filler


def wait_status(path: Path, condition, timeout_s: float = 20.0):
    """The status file the agent rewrites every 0.2 s, once ``condition`` holds."""
    deadline = time.monotonic() + timeout_s
    status = None
    while time.monotonic() < deadline:
        try:
            status = read_status(path)
        except Exception:  # noqa: BLE001 - written right now, or not yet: read again
            status = None
        if status is not None and condition(status):
            return status
        time.sleep(0.05)
    raise AssertionError(f"status never matched; last: {status}")


def test_spool_open_on_a_full_disk_is_disk_full_not_corrupt(small_fs):
    config = SpoolConfig(small_fs / "spool.sqlite")
    Spool.open(config).close()  # a spool from before (a clean exit: no -wal, no -shm)
    filler = fill(small_fs)
    with pytest.raises(SpoolError) as info:
        Spool.open(config)
    assert info.value.reason == "disk-full", info.value
    filler.unlink()
    spool = Spool.open(config)  # the file was never damaged
    assert spool.integrity_check() == "ok"
    spool.close()


def test_agent_started_on_a_full_disk_waits_reports_and_streams_when_space_frees(
        tmp_path, small_fs, mosquitto):
    registry = provision(tmp_path)
    config = station_config(tmp_path, mosquitto.url, METER)
    spool_path = small_fs / "spool.sqlite"
    config.write_text(config.read_text() + f'\n[spool]\npath = "{spool_path}"\n')
    Spool.open(SpoolConfig(spool_path)).close()
    filler = fill(small_fs)
    notify = NotifySocket(tmp_path / "notify.sock")
    verifier = Verifier(registry)
    opened = []
    proc = start_agent(config, notify)
    try:
        notify.wait_for("disk full", 20)  # READY=1 with STATUS=...disk full...
        status = wait_status(tmp_path / "status.json", lambda s: s.spool is not None)
        assert status.state == "waiting" and status.spool.state == "disk-full"
        assert any(e.reason == "disk-full" for e in status.errors)
        assert proc.poll() is None  # it did not exit

        async def stream() -> None:
            async with Uplink(mqtt_config(mosquitto.url, client_id="fleet")) as sub:
                await sub.wait_connected()
                for topic in TOPICS:
                    await sub.subscribe(topic)  # returns on SUBACK
                filler.unlink()  # space is back
                messages = sub.messages()
                async with asyncio.timeout(30):
                    while len(opened) < 5:
                        envelope = verifier.add((await anext(messages)).payload)
                        if envelope is not None:
                            opened.append(envelope)

        asyncio.run(stream())
        status = wait_status(tmp_path / "status.json", lambda s: s.state == "running")
        assert status.spool.state == "ok"
    finally:
        out = stop_agent(proc)
    assert proc.returncode == 0, out
    assert "Traceback" not in out
    report = verifier.report()
    assert report.ok, report.format()
    assert report.devices["cs-test-1"].readings > 0
    first = min(opened, key=lambda e: e.seq)
    assert first.seq == 0 and [e.code for e in first.events] == ["spool-disk-full"]
    details = dict(first.events[0].details)
    assert details["from_ns"] < details["to_ns"]
