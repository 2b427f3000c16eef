"""The one abstract base every data source plugs into (the python-can model).

A source is built from its ``[[sources]]`` table in config by :meth:`Source.from_options`,
then :meth:`Source.run` is awaited by the runtime's supervisor as task ``source[<id>]``.
``run`` never returns while the device is healthy: it handles its own reconnects and
back-off, hands each :class:`Reading` or :class:`Event` to ``emit`` (awaiting it: that is
the backpressure), counts every fault in ``self.counters`` (and the requests it sends in
``self.requests``, which are work, not faults) and raises only when it cannot
go on at all (an AdapterUnavailable for a missing optional dependency, say).
"""

from __future__ import annotations

import abc
import asyncio
import hashlib
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import ClassVar, Self

from agent.readings import Event, Reading, TimeStatus

Emit = Callable[[Reading | Event], Awaitable[None]]
Clock = Callable[[], tuple[int, TimeStatus]]
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def raise_if_cancelled() -> None:
    """Raise CancelledError if the running task was cancelled and that cancellation got
    lost. pymodbus awaits every reply with ``asyncio.wait_for``, which on Python 3.11
    swallows a cancellation that arrives as the reply does (CPython gh-86296): the task
    then polls on as if never cancelled and the agent's shutdown hangs. A poll loop around
    such a library calls this once per cycle; the task's ``cancelling()`` count still
    says it was asked to stop."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def system_clock() -> tuple[int, TimeStatus]:
    """Wall clock in ns. The runtime swaps in a clock that reports ``U`` until NTP sync."""
    return time.time_ns(), TimeStatus.SYNCED


class Source(abc.ABC):
    kind: ClassVar[str]

    def __init__(self, source_id: str, clock: Clock = system_clock) -> None:
        self.id = source_id
        self.clock = clock
        self.counters: Counter[str] = Counter()   # faults, by reason (alerts fire on these)
        self.requests: Counter[str] = Counter()   # work done, by kind (OBD polls): not faults

    @classmethod
    @abc.abstractmethod
    def from_options(cls, source_id: str, options: Mapping[str, object], where: str) -> Self:
        """Validate the source's config table; raise ConfigError naming ``where`` and the key."""

    @abc.abstractmethod
    async def run(self, emit: Emit) -> None:
        """Poll or listen until cancelled, handing readings and events to ``emit``."""

    def attach_state(self, directory: Path) -> None:  # noqa: B027 - an optional hook
        """The agent's state directory, before ``run``: a source that must remember
        something across restarts (the odometer's last value) keeps it under
        ``state_file(directory, ...)``. Default: nothing to remember."""

    def claims(self) -> Mapping[str, object]:
        """Exclusive resources this source uses, with the settings it needs them in
        (``{"serial:/dev/ttyUSB0": LineFormat(...)}``). The runtime refuses a config in
        which two sources claim one resource with different settings. Default: none."""
        return {}

    def identities(self) -> tuple[str, ...]:
        """The devices behind this source as its readings name them (``Reading.meter``),
        for the status. Default: none (the source is the device)."""
        return ()

    def state_file(self, directory: Path, suffix: str) -> Path:
        """``<directory>/sources/<source id>.<suffix>``; an id that is not a plain file
        name is replaced by its hash, so no config value can point outside the directory."""
        name = self.id
        if not _SAFE_NAME.fullmatch(name):
            name = "src-" + hashlib.sha256(name.encode()).hexdigest()[:16]
        return directory / "sources" / f"{name}.{suffix}"
