"""What the pipeline costs when little happens (issue 18, bench/steady.py): an idle agent
sleeps, and a reading a second costs one spool transaction, not three.

Against a real mosquitto. The event loop's selector is wrapped to count how often the loop
blocked and woke up; the spool worker records which spool calls it ran (both forward to
the real thing).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import selectors
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from agent.config import BatchConfig
from agent.envelope import Sealer
from agent.keys import IdentityKey
from agent.readings import Reading
from agent.spool import Spool, SpoolConfig
from agent.telemetry import ACK_LINGER_S, Pipeline, SpoolWorker
from agent.topics import status_topic
from agent.uplink import MqttConfig, Uplink
from hil.broker import Mosquitto

KEY = IdentityKey(bytes(range(32)))
DEVICE = "dev-idle"


class CountingSelector(selectors.DefaultSelector):  # type: ignore[misc,valid-type]
    """The loop's selector; counts the selects that may block (timeout None or > 0)."""

    blocking = 0

    def select(self, timeout: float | None = None) -> list[Any]:
        if timeout is None or timeout > 0:
            self.blocking += 1
        return super().select(timeout)


class RecordingWorker(SpoolWorker):
    """The real spool worker; remembers the name of every call it ran on the spool thread."""

    def __init__(self, spool: Spool) -> None:
        super().__init__(spool)
        self.calls: Counter[str] = Counter()

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        self.calls[getattr(fn, "__name__", None) or fn.func.__name__] += 1  # partials too
        return await super().call(fn, *args)


@contextlib.asynccontextmanager
async def pipeline_on(broker: Mosquitto, path: Path) -> AsyncIterator[Pipeline]:
    spool = Spool.open(SpoolConfig(path))
    worker = RecordingWorker(spool)
    config = MqttConfig.from_url(broker.url, DEVICE, status_topic=status_topic(DEVICE),
                                 keepalive_s=30)
    try:
        async with Uplink(config) as up:
            await asyncio.wait_for(up.wait_connected(), 10)
            pipeline = Pipeline(Sealer(KEY, DEVICE, os.urandom(16), spool.next_seq,
                                       spool.head), worker, up, DEVICE,
                                batch=BatchConfig(max_readings=50, max_age_ms=20))
            async with asyncio.TaskGroup() as tg:
                tasks = [tg.create_task(pipeline.run_sealer()),
                         tg.create_task(pipeline.run_publisher())]
                try:
                    yield pipeline
                finally:
                    for task in tasks:
                        task.cancel()
    finally:
        worker.close()


def run_counting(main: Callable[[CountingSelector], Any]) -> None:
    selector = CountingSelector()
    with asyncio.Runner(loop_factory=lambda: asyncio.SelectorEventLoop(selector)) as runner:
        runner.run(main(selector))


async def until(condition: Callable[[], bool], timeout_s: float) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.02)


def reading(n: int) -> Reading:
    return Reading("Vehicle.Speed", n, "km/h", n + 1, source="sim")


def test_an_idle_pipeline_sleeps_instead_of_polling(tmp_path: Path, mosquitto: Mosquitto) -> None:
    # Before: the publisher looked at the spool every 0.2 s (a hop to the spool thread
    # each time) and paho's loop_misc ran every second: a dozen wake-ups in 2 s of nothing.
    async def main(selector: CountingSelector) -> None:
        async with pipeline_on(mosquitto, tmp_path / "s.sqlite") as pipeline:
            for n in range(10):
                await pipeline.emit(reading(n))
            await pipeline.wait_drained(10)
            worker = pipeline.worker
            assert isinstance(worker, RecordingWorker)
            calls, woke = sum(worker.calls.values()), selector.blocking
            await asyncio.sleep(2.0)  # one wake-up of its own
            assert selector.blocking - woke <= 2, "the loop woke up while nothing happened"
            assert sum(worker.calls.values()) == calls  # and never went to the spool

    run_counting(main)


def test_one_reading_a_second_costs_one_spool_transaction(tmp_path: Path,
                                                          mosquitto: Mosquitto) -> None:
    # Each commit deletes what was acknowledged since the last one (no delete transaction
    # and fsync of its own) and fetches the rows the idle publisher sends next (no hop of
    # its own). Before: commit, fetch, fetch, delete per envelope.
    async def main(selector: CountingSelector) -> None:
        async with pipeline_on(mosquitto, tmp_path / "s.sqlite") as pipeline:
            worker = pipeline.worker
            assert isinstance(worker, RecordingWorker)
            for n in range(30):
                await pipeline.emit(reading(n))
                committed = pipeline.counters["envelopes_committed"]
                await until(lambda done=committed: pipeline.counters["envelopes_committed"] > done
                            and pipeline.counters["acked"] == done + 1, 10)
            assert pipeline.counters["deleted"] >= 29  # all but the last, by the commits
            assert worker.calls["delete_acked"] == 0
            assert worker.calls["_commit_and_fetch"] == 30
            assert worker.calls["_fetch"] <= 3, worker.calls  # at the start, not per commit
            assert pipeline.counters["prefetched"] >= 27
            assert pipeline.depth == 0 and pipeline.spool.rows == 1  # acknowledged, waits
            # No commit follows: the publisher deletes it itself after the linger.
            await until(lambda: pipeline.spool.rows == 0, ACK_LINGER_S + 5)
            assert worker.calls["delete_acked"] == 1

    run_counting(main)


class SlowCommitWorker(RecordingWorker):
    """A spool whose commits take 0.3 s (an SD card under load): a drain that looks only at
    the queue, the batcher and the spool's rows sees "nothing left" while one is on the way."""

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        if (getattr(fn, "__name__", None) or fn.func.__name__) == "_commit_and_fetch":
            await asyncio.sleep(0.3)
        return await super().call(fn, *args)


def test_a_drain_waits_for_the_commit_on_its_way(tmp_path: Path, mosquitto: Mosquitto) -> None:
    async def main(selector: CountingSelector) -> tuple[int, int]:
        async with pipeline_on(mosquitto, tmp_path / "s.sqlite") as pipeline:
            pipeline.worker = SlowCommitWorker(pipeline.spool)
            await pipeline.emit(reading(1))
            await pipeline.wait_drained(5.0)
            return pipeline.spool.rows, pipeline.counters["acked"]

    got: list[tuple[int, int]] = []
    run_counting(lambda selector: _collect(main(selector), got))
    assert got == [(0, 1)], "the drain ended with the last envelope still to be published"


async def _collect(coro: Any, into: list[Any]) -> None:
    into.append(await coro)
