"""One agent with a payment channel AND `keep_until = "fleet-commit"`: the uplink has one
queue of incoming messages, and both the channel service and the commit follower read it
through the same topic router (agent.channel.mux), so neither takes the other's messages.
A whole charging session settles while a fleet ingest's commit marks let the station's
spool go."""

from __future__ import annotations

import asyncio
import tomllib
from pathlib import Path

import tomli_w

from agent.fleet import registry as fleet_registry
from agent.fleet.db import open_database
from agent.fleet.ingest import Ingest, IngestConfig
from agent.fleet.mqtt import BrokerConfig
from agent.keys import IdentityKey
from tests.agent.channel.test_service import settled
from tests.agent.channel.world import World, until

COMMIT_KEY = IdentityKey(bytes([11]) * 32)


def test_channel_and_commit_follower_share_one_agent(mosquitto, tmp_path: Path) -> None:
    world = World(tmp_path, mosquitto.url)
    config = tomllib.loads(world.station.config_path.read_text())
    config["spool"] = {"keep_until": "fleet-commit", "commit_keys": [COMMIT_KEY.public.hex()]}
    world.station.config_path.write_bytes(tomli_w.dumps(config).encode())
    db_url = f"sqlite:///{tmp_path / 'fleet.db'}"
    db = open_database(db_url)
    fleet_registry.import_toml(db, tmp_path / "fleet.toml")

    async def main() -> tuple[dict[str, int], dict[str, int]]:
        stop = asyncio.Event()
        ingest = Ingest(IngestConfig(BrokerConfig(mosquitto.url, "ingest-mux"), db_url,
                                     mark_interval_s=0.2), COMMIT_KEY)
        ingest_task = asyncio.create_task(ingest.run(stop))
        try:
            await asyncio.wait_for(ingest.ready.wait(), 20)
            async with world.running():
                await world.ready()
                answer = await world.control(op="start", station="cs-1", connector=1)
                assert answer["ok"], answer
                await until(lambda: any(s.energy_wh >= 100
                                        for s in world.sessions(world.station)), 60)
                assert (await world.control(op="stop"))["ok"]
                await until(lambda: settled(world), 60)
                runtime = world.station.runtime
                assert runtime is not None and runtime.commits is not None
                follower = runtime.commits
                await until(lambda: follower.counters["deleted"] > 0, 30)
                counters = dict(follower.counters)
                await world.vehicle.finish()
                await world.station.finish()
            return counters, dict(ingest.counters)
        finally:
            stop.set()
            await asyncio.wait_for(ingest_task, 20)

    follower, ingest = asyncio.run(main())
    # the channel's messages reached the channel service (the session settled, above) and
    # the marks reached the follower, which deleted what they cover from the spool
    assert follower["marks"] > 0 and follower["deleted"] > 0
    assert not any(k.startswith("mark_refused") for k in follower), follower
    assert ingest["commit_marks"] > 0 and ingest["stored"] > 0
    (cs_session,) = world.sessions(world.station)
    assert cs_session.settlement == "settled" and cs_session.energy_wh >= 100
    db.close()
