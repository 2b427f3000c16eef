"""One reader of the uplink's incoming messages, routed by topic to whoever asked for them.

The uplink has one queue of incoming messages for the whole agent (agent/uplink.py); the
channel service runs many consumers on it (offers, requests, answers, commands, one inbox
per channel), so exactly one task reads it and hands each message to the queue of its
topic. A channel driver gets a :class:`Route`: the Transport of agent/channel/session.py
for its inbox alone.

Connection epochs are events here too, not a poll: the uplink publishes a retained
"online" status on every (re)connect (agent/uplink.py), and the mux subscribes to its own
status topic, so each new connection arrives as a message; :meth:`next_epoch` wakes on it.
Without a status topic (a bare test uplink) the first connection is the only epoch.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator
from typing import Protocol

MAX_QUEUED = 10_000   # per topic; beyond it the oldest message of that topic is dropped


class Incoming(Protocol):
    @property
    def topic(self) -> str: ...

    @property
    def payload(self) -> bytes: ...


class Uplink(Protocol):
    """What the mux needs of agent.uplink.Uplink (its public surface)."""

    epoch: int

    def publish_nowait(self, topic: str, payload: bytes, *,
                       retain: bool = False) -> asyncio.Future[None]: ...

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False,
                      retry: bool = True) -> None: ...

    async def subscribe(self, topic: str) -> None: ...

    def messages(self) -> AsyncIterator[Incoming]: ...

    async def wait_connected(self) -> int: ...


def matches(pattern: str, topic: str) -> bool:
    """MQTT topic filter matching (MQTT 5 s4.7): ``+`` one level, ``#`` the rest."""
    want, have = pattern.split("/"), topic.split("/")
    for index, level in enumerate(want):
        if level == "#":
            return True
        if index >= len(have) or (level != "+" and level != have[index]):
            return False
    return len(want) == len(have)


class TopicMux:
    """Routes incoming messages to per-filter queues. ``run()`` is the reader task."""

    def __init__(self, uplink: Uplink, status_topic: str | None = None) -> None:
        self.uplink = uplink
        self.status_topic = status_topic
        self.counters: Counter[str] = Counter()
        self._routes: dict[str, asyncio.Queue[Incoming]] = {}   # exact topics
        self._wild: dict[str, asyncio.Queue[Incoming]] = {}     # filters with + or #
        self._epoch_changed = asyncio.Event()

    def route(self, pattern: str) -> asyncio.Queue[Incoming]:
        """The queue of every message matching ``pattern`` (created once per pattern)."""
        routes = self._wild if "+" in pattern or "#" in pattern else self._routes
        queue = routes.get(pattern)
        if queue is None:
            queue = routes[pattern] = asyncio.Queue()
        return queue

    def drop(self, pattern: str) -> None:
        self._routes.pop(pattern, None)
        self._wild.pop(pattern, None)

    async def subscribe(self, pattern: str) -> asyncio.Queue[Incoming]:
        queue = self.route(pattern)
        await self.uplink.subscribe(pattern)
        return queue

    async def run(self) -> None:
        if self.status_topic is not None:
            await self.uplink.subscribe(self.status_topic)
        async for message in self.uplink.messages():
            if message.topic == self.status_topic:
                self._epoch_changed.set()
                continue
            queues = [q for p, q in self._wild.items() if matches(p, message.topic)]
            exact = self._routes.get(message.topic)
            if exact is not None:
                queues.append(exact)
            if not queues:
                self.counters["unrouted"] += 1
            for queue in queues:
                if queue.qsize() >= MAX_QUEUED:
                    queue.get_nowait()
                    self.counters["dropped-backlog"] += 1
                queue.put_nowait(message)

    async def next_epoch(self, seen: int | None) -> int:
        """Wait for a live connection whose epoch is not ``seen``; return its epoch."""
        while True:
            epoch = await self.uplink.wait_connected()
            if epoch != seen:
                return epoch
            if self.status_topic is None:
                await asyncio.Event().wait()  # no reconnect notice without a status topic
            self._epoch_changed.clear()
            if self.uplink.epoch == seen:  # not reconnected meanwhile: wait for the notice
                await self._epoch_changed.wait()

    def transport(self) -> Route:
        """A fresh Transport for one channel driver (bound to its inbox on subscribe)."""
        return Route(self)


@contextlib.asynccontextmanager
async def serving(uplink: Uplink, status_topic: str | None = None) -> AsyncIterator[TopicMux]:
    """A mux with its reader task running for the duration of the block."""
    mux = TopicMux(uplink, status_topic)
    task = asyncio.create_task(mux.run(), name="channel.mux")
    try:
        yield mux
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


class Route:
    """The Transport (agent/channel/session.py) of one channel driver: the inbox it
    subscribes to, the uplink's publishing, the mux's connection epochs."""

    def __init__(self, mux: TopicMux) -> None:
        self.mux = mux
        self.inbox: str | None = None
        self._queue: asyncio.Queue[Incoming] | None = None

    def publish_nowait(self, topic: str, payload: bytes) -> asyncio.Future[None]:
        return self.mux.uplink.publish_nowait(topic, payload)

    async def subscribe(self, topic: str) -> None:
        if self.inbox not in (None, topic):
            raise ValueError(f"this route already carries {self.inbox}")
        self.inbox = topic
        self._queue = await self.mux.subscribe(topic)

    async def messages(self) -> AsyncIterator[Incoming]:
        if self._queue is None:
            raise ValueError("subscribe to the inbox first")
        while True:
            yield await self._queue.get()

    async def wait_connected(self) -> int:
        return await self.mux.uplink.wait_connected()

    async def next_epoch(self, seen: int | None) -> int:
        return await self.mux.next_epoch(seen)

    def close(self) -> None:
        if self.inbox is not None:
            self.mux.drop(self.inbox)
