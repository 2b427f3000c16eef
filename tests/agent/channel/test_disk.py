"""The fdatasync helper process (agent/channel/disk.py), against a real child process."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from agent.channel.disk import FsyncHelper
from agent.errors import SpoolError


async def _wait(futures: list[asyncio.Future[BaseException | None]]) -> list[object]:
    return await asyncio.wait_for(asyncio.gather(*futures), 10)


def _callback(loop: asyncio.AbstractEventLoop
              ) -> tuple[asyncio.Future[BaseException | None], object]:
    fut: asyncio.Future[BaseException | None] = loop.create_future()
    return fut, fut.set_result


def test_every_sync_is_answered_in_order(tmp_path: Path) -> None:
    asyncio.run(_every_sync_is_answered_in_order(tmp_path))


async def _every_sync_is_answered_in_order(tmp_path: Path) -> None:
    loop = asyncio.get_running_loop()
    fd = os.open(tmp_path / "store", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    helper = FsyncHelper(fd)
    order: list[int] = []
    futures = []
    try:
        for i in range(50):  # many queue up during one fdatasync: group commit
            os.write(fd, b"record %d\n" % i)
            fut, done = _callback(loop)
            fut.add_done_callback(lambda _, i=i: order.append(i))
            helper.sync(done)  # type: ignore[arg-type]
            futures.append(fut)
        assert await _wait(futures) == [None] * 50
        assert order == list(range(50))
    finally:
        helper.close()
        os.close(fd)
    assert helper._proc.returncode == 0  # ended on the closed pipe, not killed


def test_a_failing_fdatasync_fails_every_waiting_step() -> None:
    asyncio.run(_a_failing_fdatasync_fails_every_waiting_step())


async def _a_failing_fdatasync_fails_every_waiting_step() -> None:
    """fdatasync on a pipe fails with EINVAL: a real error from the kernel, reported with
    its errno text, never a silent success."""
    loop = asyncio.get_running_loop()
    read_end, write_end = os.pipe()
    helper = FsyncHelper(write_end)
    try:
        futures = []
        for _ in range(3):
            fut, done = _callback(loop)
            helper.sync(done)  # type: ignore[arg-type]
            futures.append(fut)
        errors = await _wait(futures)
    finally:
        helper.close()
        os.close(read_end)
        os.close(write_end)
    assert all(isinstance(e, SpoolError) and e.reason == "store-write" for e in errors)
    assert "fdatasync failed" in str(errors[0]) and os.strerror(22) in str(errors[0])


def test_a_killed_helper_fails_what_waits_and_what_comes(tmp_path: Path) -> None:
    asyncio.run(_a_killed_helper_fails_what_waits_and_what_comes(tmp_path))


async def _a_killed_helper_fails_what_waits_and_what_comes(tmp_path: Path) -> None:
    loop = asyncio.get_running_loop()
    fd = os.open(tmp_path / "store", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    helper = FsyncHelper(fd)
    try:
        fut, done = _callback(loop)
        helper.sync(done)  # type: ignore[arg-type]
        assert await _wait([fut]) == [None]
        os.kill(helper._proc.pid, signal.SIGKILL)
        helper._proc.wait(5)
        fut, done = _callback(loop)
        helper.sync(done)  # type: ignore[arg-type]
        (error,) = await _wait([fut])
    finally:
        helper.close()
        os.close(fd)
    assert isinstance(error, SpoolError) and error.reason == "store-write"


@pytest.mark.parametrize("pending", [0, 5])
def test_close_ends_the_helper(tmp_path: Path, pending: int) -> None:
    asyncio.run(_close_ends_the_helper(tmp_path, pending))


async def _close_ends_the_helper(tmp_path: Path, pending: int) -> None:
    fd = os.open(tmp_path / "store", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    helper = FsyncHelper(fd)
    called: list[object] = []
    for _ in range(pending):
        helper.sync(called.append)
    helper.close()  # waiting callbacks are dropped, as in a crash
    helper.close()  # twice is harmless
    await asyncio.sleep(0.05)
    os.close(fd)
    assert called == [] and helper._proc.returncode is not None
