"""The channel service end to end in one process: two agents started from config files
through Runtime (as `edge-agent run` starts them), mosquitto, the in-process chain, meters
on Modbus TCP, the stand-in wallbox; sessions started through the control socket."""

from __future__ import annotations

import asyncio
from pathlib import Path

from agent.envelope import open_envelope
from agent.uplink import MqttConfig, Uplink
from tests.agent.channel.world import DEPOSIT, PRICE, World, until


def settled(world: World) -> bool:
    return all(s.settlement in ("settled",) for agent in (world.station, world.vehicle)
               for s in world.sessions(agent)) and bool(world.sessions(world.station)) \
        and bool(world.sessions(world.vehicle))


async def _session(tmp: Path, url: str) -> tuple[World, list]:
    world = World(tmp, url)
    events: list = []
    async with Uplink(MqttConfig.from_url(url, "t-observer")) as observer:
        await observer.subscribe("evedge/v1/+/event")

        async def collect() -> None:
            async for message in observer.messages():
                events.append(open_envelope(message.payload, world.registry.lookup))

        collector = asyncio.create_task(collect())
        async with world.running():
            await world.ready()
            answer = await world.control(op="start", station="cs-1", connector=1)
            assert answer["ok"], answer
            await until(lambda: any(s.energy_wh >= 300 for s in world.sessions(world.station)),
                        60)
            stopped = await world.control(op="stop")
            assert stopped["ok"], stopped
            await until(lambda: settled(world), 60)
            await world.vehicle.finish()
            await world.station.finish()
        await until(lambda: sum(e.kind == "event" for e in events) >= 6, 10)
        collector.cancel()
    return world, events


def test_a_whole_session_started_stopped_and_settled(mosquitto, tmp_path: Path) -> None:
    world, events = asyncio.run(_session(tmp_path, mosquitto.url))
    (cs_session,) = world.sessions(world.station)
    (ev_session,) = world.sessions(world.vehicle)
    assert cs_session.channel_id == ev_session.channel_id
    assert (cs_session.t_ev, cs_session.nonce) == (ev_session.t_ev, ev_session.nonce)
    assert ev_session.end_reason == "driver-stop" and cs_session.end_reason == "vehicle-stop"
    wh = cs_session.energy_wh
    assert wh >= 300 and cs_session.t_ev == wh * PRICE // 1000
    # on chain: the station got exactly what was paid, the vehicle the rest of its deposit
    assert world.balance(world.cs_keys) == cs_session.t_ev
    assert world.balance(world.ev_keys) == 2 * DEPOSIT - cs_session.t_ev
    assert world.wallbox.switches[-1] is False and True in world.wallbox.switches
    codes = [(e.device, ev.code) for e in events for ev in e.events]
    for device in ("cs-1", "ev-1"):
        for code in ("session-started", "session-ended", "session-settled"):
            assert (device, code) in codes, (device, code, codes)
