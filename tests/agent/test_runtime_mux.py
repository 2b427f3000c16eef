"""One agent with a payment channel AND `keep_until = "fleet-commit"`: the uplink has one
queue of incoming messages, and both the channel service and the commit follower read it
through the same topic router (agent.channel.mux), so neither takes the other's messages
(with one shared queue each took about half of the other's). The station answers every
charging request with its signed refusal while a fleet ingest's commit marks let its
spool go."""

from __future__ import annotations

import asyncio
import tomllib
from pathlib import Path

import tomli_w

from agent.channel import offers
from agent.fleet import registry as fleet_registry
from agent.fleet.db import open_database
from agent.fleet.ingest import Ingest, IngestConfig
from agent.fleet.mqtt import BrokerConfig
from agent.keys import IdentityKey, KeyStore
from agent.uplink import MqttConfig, Uplink
from tests.agent.channel.test_service import _request
from tests.agent.channel.world import Agent, World, until

COMMIT_KEY = IdentityKey(bytes([11]) * 32)
REQUESTS = 8


class StationOnly(World):
    """The channel tests' world (its plant's meter and wallbox, an idle vehicle agent: only
    a stranger's requests are sent), the station's spool kept until the fleet commits it."""

    def _station(self) -> Agent:
        agent = super()._station()
        config = tomllib.loads(agent.config_path.read_text())
        config["spool"] = {"keep_until": "fleet-commit",
                           "commit_keys": [COMMIT_KEY.public.hex()]}
        agent.config_path.write_bytes(tomli_w.dumps(config).encode())
        return agent


def test_channel_and_commit_follower_share_one_agent(mosquitto, tmp_path: Path) -> None:
    # no session runs: a slow meter keeps the one event loop (station, ingest) free for
    # the requests and marks under test
    world = StationOnly(tmp_path, mosquitto.url, meter_interval_s=1.0)
    stranger, _ = KeyStore(tmp_path / "stranger").init("ev-x")
    db_url = f"sqlite:///{tmp_path / 'fleet.db'}"
    db = open_database(db_url)
    fleet_registry.import_toml(db, tmp_path / "fleet.toml")

    async def main() -> tuple[list[object], dict[str, int], dict[str, int]]:
        stop = asyncio.Event()
        ingest = Ingest(IngestConfig(BrokerConfig(mosquitto.url, "ingest-mux"), db_url,
                                     mark_interval_s=0.2), COMMIT_KEY)
        ingest_task = asyncio.create_task(ingest.run(stop))
        answers: list[object] = []
        try:
            await asyncio.wait_for(ingest.ready.wait(), 20)
            async with Uplink(MqttConfig.from_url(mosquitto.url, "t-answers")) as observer:
                await observer.subscribe("evedge/v1/ev-x/answer")

                async def collect() -> None:
                    async for message in observer.messages():
                        answers.append(offers.decode(message.payload).message)

                collector = asyncio.create_task(collect())
                async with world.running():
                    runtime = world.station.runtime
                    assert runtime is not None
                    await asyncio.wait_for(runtime.ready.wait(), 30)
                    assert runtime.channel is not None and runtime.uplink is not None
                    await asyncio.wait_for(runtime.channel.ready.wait(), 30)
                    for _ in range(REQUESTS):
                        await runtime.uplink.publish("evedge/v1/cs-1/request",
                                                     _request(stranger))
                    try:
                        await until(lambda: len(answers) == REQUESTS, 60)
                    except TimeoutError:
                        raise AssertionError(f"{len(answers)} answers; channel counters "
                                             f"{dict(runtime.channel.counters)}") from None
                    follower = runtime.commits
                    assert follower is not None
                    try:
                        await until(lambda: follower.counters["deleted"] > 0, 60)
                    except TimeoutError:
                        raise AssertionError(f"follower {dict(follower.counters)}, ingest "
                                             f"{dict(ingest.counters)}") from None
                    counters = dict(follower.counters)
                    await world.station.finish()
                collector.cancel()
            return answers, counters, dict(ingest.counters)
        finally:
            stop.set()
            await asyncio.wait_for(ingest_task, 20)

    answers, follower, ingest = asyncio.run(main())
    # every request reached the channel service, which signed a refusal for each...
    assert [(a.vehicle, a.reason) for a in answers  # type: ignore[attr-defined]
            if isinstance(a, offers.Refusal)] == [("ev-x", "vehicle-not-allowed")] * REQUESTS
    # ...and the marks reached the follower, which deleted what they cover from the spool
    assert follower["marks"] > 0 and follower["deleted"] > 0
    assert not any(k.startswith("mark_refused") for k in follower), follower
    assert ingest["commit_marks"] > 0 and ingest["stored"] > 0
    db.close()
