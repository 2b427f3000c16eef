"""The one abstract base every data source plugs into (the python-can model).

A source is built from its ``[[sources]]`` table in config by :meth:`Source.from_options`,
then :meth:`Source.run` is awaited by the runtime's supervisor as task ``source[<id>]``.
``run`` never returns while the device is healthy: it handles its own reconnects and
back-off, hands each :class:`Reading` or :class:`Event` to ``emit`` (awaiting it: that is
the backpressure), counts every fault in ``self.counters`` and raises only when it cannot
go on at all (an AdapterUnavailable for a missing optional dependency, say).
"""

from __future__ import annotations

import abc
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from typing import ClassVar, Self

from agent.readings import Event, Reading, TimeStatus

Emit = Callable[[Reading | Event], Awaitable[None]]
Clock = Callable[[], tuple[int, TimeStatus]]


def system_clock() -> tuple[int, TimeStatus]:
    """Wall clock in ns. The runtime swaps in a clock that reports ``U`` until NTP sync."""
    return time.time_ns(), TimeStatus.SYNCED


class Source(abc.ABC):
    kind: ClassVar[str]

    def __init__(self, source_id: str, clock: Clock = system_clock) -> None:
        self.id = source_id
        self.clock = clock
        self.counters: Counter[str] = Counter()

    @classmethod
    @abc.abstractmethod
    def from_options(cls, source_id: str, options: Mapping[str, object], where: str) -> Self:
        """Validate the source's config table; raise ConfigError naming ``where`` and the key."""

    @abc.abstractmethod
    async def run(self, emit: Emit) -> None:
        """Poll or listen until cancelled, handing readings and events to ``emit``."""
