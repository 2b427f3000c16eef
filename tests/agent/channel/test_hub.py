"""The channel service's reading hub: a source's first words reach the service even when
they are said before the service has set itself up (an Eichrecht meter says its key once
per connection, while the service may still be reading the chain id from its node)."""

from __future__ import annotations

import asyncio

import pytest

from agent.channel.context import ReadingHub
from agent.errors import ConfigError
from agent.readings import Reading


class Taps:
    """The runtime's ``tap``: one queue per call, for the sources it has."""

    def __init__(self, *source_ids: str) -> None:
        self.queues: dict[str, list[asyncio.Queue[Reading]]] = {s: [] for s in source_ids}

    def __call__(self, source_id: str) -> asyncio.Queue[Reading]:
        if source_id not in self.queues:
            raise ConfigError(key="sources.id", expected="a configured source",
                              found=source_id)
        queue: asyncio.Queue[Reading] = asyncio.Queue()
        self.queues[source_id].append(queue)
        return queue

    def say(self, source_id: str, reading: Reading) -> None:
        for queue in self.queues[source_id]:
            queue.put_nowait(reading)


KEY = Reading("Meter.PublicKey", "04ab", "", 1, source="meter0")


def test_what_a_source_says_before_the_service_listens_reaches_it() -> None:
    async def scenario() -> list[Reading]:
        taps = Taps("meter0")
        hub = ReadingHub(taps, ("meter0",))   # made with the runtime, before sources run
        taps.say("meter0", KEY)               # the meter identifies itself at once
        heard: list[Reading] = []
        hub.listen("meter0", heard.append)    # the service, later
        pump = asyncio.ensure_future(hub.run())
        await asyncio.sleep(0.05)
        pump.cancel()
        return heard

    assert asyncio.run(scenario()) == [KEY]


def test_a_listener_on_a_source_that_does_not_exist_is_a_config_error() -> None:
    async def scenario() -> None:
        hub = ReadingHub(Taps("meter0"), ("meter9",))
        hub.listen("meter9", lambda reading: None)
        await hub.run()

    with pytest.raises(ExceptionGroup) as caught:
        asyncio.run(scenario())
    assert caught.group_contains(ConfigError)
