"""The channel service end to end in one process: two agents started from config files
through Runtime (as `edge-agent run` starts them), mosquitto, the in-process chain, one
plant (its meter on Modbus TCP, its wallbox driven by modbus-evse, the car's battery on
CAN); sessions started through the control socket."""

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
    assert world.enable_writes()[-1] is False and True in world.enable_writes()
    # the car's own count (its BMS, battery side, scaled to AC) is what it audited with
    view = world.plant.energy(1)
    assert 0.95 < view["car_charged_wh"] * 1.04 / (view["meter_import_wh"] - 1_000_000) < 1.05
    codes = [(e.device, ev.code) for e in events for ev in e.events]
    for device in ("cs-1", "ev-1"):
        for code in ("session-started", "session-ended", "session-settled"):
            assert (device, code) in codes, (device, code, codes)


# --- refusals, hostile input ------------------------------------------------------------

def _request(keys, station: str = "cs-1", connector: int = 1, *, vehicle: str | None = None,
             max_price: int | None = None, issued_s: int | None = None) -> bytes:
    import os
    import time

    from agent.channel import offers

    request = offers.Request(os.urandom(16), station, connector, vehicle or keys.device_id,
                             keys.identity.public, keys.settlement.address, os.urandom(16),
                             None, max_price, int(time.time()) if issued_s is None else issued_s)
    return offers.encode(request, keys.identity)


async def _answers(url: str, vehicles: list[str]):  # type: ignore[no-untyped-def]
    from agent.channel import offers

    observer = Uplink(MqttConfig.from_url(url, "t-answers"))
    await observer.__aenter__()
    for name in vehicles:
        await observer.subscribe(f"evedge/v1/{name}/answer")
    got: list = []

    async def collect() -> None:
        async for message in observer.messages():
            got.append(offers.decode(message.payload).message)

    return observer, got, asyncio.create_task(collect())


def test_every_refusal_is_signed_with_its_reason(mosquitto, tmp_path: Path) -> None:
    from agent.channel import offers
    from agent.keys import KeyStore

    async def main() -> tuple[list, World, dict]:
        world = World(tmp_path, mosquitto.url, others=("ev-2", "ev-3"), revoked=("ev-3",))
        stranger, _ = KeyStore(tmp_path / "stranger").init("ev-x")
        observer, got, task = await _answers(mosquitto.url, ["ev-1", "ev-2", "ev-3", "ev-x"])
        async with world.running():
            await world.ready()
            up = world.station.runtime
            assert up is not None and up.uplink is not None
            publish = up.uplink.publish
            ev2, ev3 = world.other_keys["ev-2"], world.other_keys["ev-3"]
            world.plant.unplug(1)
            await world.connector_state("A")
            await publish("evedge/v1/cs-1/request", _request(ev2))             # free connector
            await until(lambda: len(got) == 1, 10)
            world.plant.plug(1)
            await world.connector_state("B")
            await publish("evedge/v1/cs-1/request", _request(ev2, connector=9))
            await publish("evedge/v1/cs-1/request", _request(ev3))             # revoked
            await publish("evedge/v1/cs-1/request", _request(stranger))        # not registered
            await publish("evedge/v1/cs-1/request", _request(ev2, max_price=PRICE - 1))
            await until(lambda: len(got) == 5, 10)
            # the vehicle's own limit: it refuses the offer itself, nothing is asked
            local = await world.control(op="start", station="cs-1", connector=1,
                                        max_price=PRICE - 1)
            started = await world.control(op="start", station="cs-1", connector=1)
            assert started["ok"], started
            await until(lambda: any(s.state == "active" for s in world.sessions(world.station)),
                        20)
            await publish("evedge/v1/cs-1/request", _request(ev2))             # two cars
            await until(lambda: len(got) == 7, 10)  # ev-1's ACCEPT and this refusal
            counters = dict(world.station.runtime.channel.counters)  # type: ignore[union-attr]
        task.cancel()
        await observer.__aexit__(None, None, None)
        assert local == {"ok": False, "reason": "price-above-limit",
                         "detail": local["detail"]}, local
        return got, world, counters

    got, world, counters = asyncio.run(main())
    refusals = [(m.vehicle, m.connector, m.reason) for m in got if isinstance(m, offers.Refusal)]
    assert refusals == [("ev-2", 1, "not-plugged-in"), ("ev-2", 9, "unknown-connector"),
                        ("ev-3", 1, "key-revoked"), ("ev-x", 1, "vehicle-not-allowed"),
                        ("ev-2", 1, "price-above-limit"), ("ev-2", 1, "connector-occupied")]
    accepts = [m for m in got if isinstance(m, offers.Accept)]
    assert [a.vehicle for a in accepts] == ["ev-1"]
    assert counters["refused-connector-occupied"] == 1
    # nothing was opened on chain for any refused request: only ev-1's deposit left it
    assert world.balance(world.other_keys["ev-2"]) == 0


def test_hostile_session_input_is_counted_and_the_agents_go_on(mosquitto, tmp_path: Path
                                                               ) -> None:
    from agent.channel import offers
    from agent.keys import IdentityKey

    operator = IdentityKey.generate()
    foreign = IdentityKey.generate()

    def command(key: IdentityKey, action: str = "stop", vehicle: str = "ev-1",
                issued: int | None = None) -> bytes:
        import os
        import time
        return offers.encode(offers.Command(os.urandom(16), vehicle, action, None, None, None,
                                            None, int(time.time()) if issued is None
                                            else issued), key)

    async def main() -> tuple[dict, dict, list]:
        world = World(tmp_path, mosquitto.url, others=("ev-2",),
                      vehicle_channel={"operator_keys": [operator.public.hex()]})
        observer, got, task = await _answers(mosquitto.url, ["ev-2"])
        async with world.running():
            await world.ready()
            rt = world.station.runtime
            assert rt is not None and rt.uplink is not None
            publish = rt.uplink.publish
            ev2 = world.other_keys["ev-2"]
            good = _request(ev2, connector=9)   # answered (refused), once
            await publish("evedge/v1/cs-1/request", b"\xff\x00garbage")
            await publish("evedge/v1/cs-1/request", good[:-3] + bytes(3))   # bad signature
            await publish("evedge/v1/cs-1/request", good)
            await publish("evedge/v1/cs-1/request", good)                    # replayed
            await publish("evedge/v1/cs-1/request", _request(ev2, station="cs-2"))
            await publish("evedge/v1/cs-1/request", _request(ev2, issued_s=1_000))  # stale
            await publish("evedge/v1/ev-1/command", b"\x84garbage")
            await publish("evedge/v1/ev-1/command", command(foreign))        # not an operator
            once = command(operator, vehicle="ev-9")
            await publish("evedge/v1/ev-1/command", once)                    # another vehicle
            stop = command(operator)
            await publish("evedge/v1/ev-1/command", stop)                    # obeyed (no session)
            await publish("evedge/v1/ev-1/command", stop)                    # replayed
            cs_counters = rt.channel.counters  # type: ignore[union-attr]
            ev_rt = world.vehicle.runtime
            assert ev_rt is not None
            await until(lambda: ev_rt.channel.counters.get(  # type: ignore[union-attr]
                "command-replayed-command", 0) == 1 and cs_counters.get(
                "request-stale-request", 0) == 1, 10)
            # both still serve: a normal session goes through afterwards
            started = await world.control(op="start", station="cs-1", connector=1)
            assert started["ok"], started
            await publish("evedge/v1/cs-1/offer/1", b"\x01\x02")             # garbage offer
            await until(lambda: any(k.startswith("offer-") for k in
                                    ev_rt.channel.counters), 10)  # type: ignore[union-attr]
            ev_counters = dict(ev_rt.channel.counters)  # type: ignore[union-attr]
            cs_counters = dict(cs_counters)
        task.cancel()
        await observer.__aexit__(None, None, None)
        return cs_counters, ev_counters, got

    cs, ev, got = asyncio.run(main())
    assert cs["request-malformed-cbor"] + cs.get("request-malformed-message", 0) >= 1, cs
    assert cs["request-bad-signature"] == 1, cs
    assert cs["request-replayed-request"] == 1, cs
    assert cs["request-wrong-station"] == 1, cs
    assert cs["request-stale-request"] == 1, cs
    assert [m.reason for m in got] == ["unknown-connector"]   # only the good one answered
    assert ev["command-unknown-operator"] == 1, ev
    assert ev["command-wrong-vehicle"] == 1, ev
    assert ev["command-replayed-command"] == 1, ev
    assert sum(v for k, v in ev.items() if k.startswith("command-malformed")
               or k == "command-unknown-message-type") >= 1, ev
    assert sum(v for k, v in ev.items() if k.startswith("offer-")) >= 1, ev


def test_cable_pulled_ends_and_settles_the_session(mosquitto, tmp_path: Path) -> None:
    async def main() -> World:
        world = World(tmp_path, mosquitto.url)
        async with world.running():
            await world.ready()
            assert (await world.control(op="start", station="cs-1", connector=1))["ok"]
            await until(lambda: any(s.energy_wh >= 200 for s in world.sessions(world.station)),
                        60)
            world.plant.unplug(1)
            await until(lambda: settled(world), 60)
        return world

    world = asyncio.run(main())
    (cs,), (ev,) = world.sessions(world.station), world.sessions(world.vehicle)
    assert cs.end_reason == "cable-pulled" and ev.end_reason == "station-close"
    assert cs.t_ev == cs.energy_wh * PRICE // 1000 > 0
    assert world.balance(world.cs_keys) == cs.t_ev
    assert world.enable_writes()[-1] is False
    assert world.plant.energy(1)["state"] == "A"


def test_v2g_the_station_pays_the_car_at_the_export_price(mosquitto, tmp_path: Path) -> None:
    export_price = 250_000

    async def main() -> World:
        world = World(tmp_path, mosquitto.url, export_price=export_price, deposit_cs=5_000_000,
                      demand_w=-22_000)   # the car feeds the grid
        async with world.running():
            await world.ready()
            assert (await world.control(op="start", station="cs-1", connector=1))["ok"]
            await until(lambda: any(s.t_cs >= 50_000 for s in world.sessions(world.station)),
                        60)
            assert (await world.control(op="stop"))["ok"]
            await until(lambda: settled(world), 60)
        return world

    world = asyncio.run(main())
    (cs,) = world.sessions(world.station)
    assert cs.t_cs > 0 and cs.t_ev == 0
    assert world.balance(world.ev_keys) == 2 * DEPOSIT + cs.t_cs
    assert world.balance(world.cs_keys) == 5_000_000 - cs.t_cs


def test_a_connector_numbered_apart_from_its_charger(mosquitto, tmp_path: Path) -> None:
    """Station connector 7 is connector 1 of its wallbox (charger_connector): offered,
    requested and paid as 7, driven as 1."""
    from hil.session.site import CHARGER_ID, METER_ID

    async def main() -> World:
        world = World(tmp_path, mosquitto.url, station_channel={"connectors": [
            {"id": 7, "charger": CHARGER_ID, "meter": METER_ID, "charger_connector": 1,
             "max_current_a": 32.0}]})
        async with world.running():
            await world.ready()
            answer = await world.control(op="start", station="cs-1", connector=7)
            assert answer["ok"], answer
            await until(lambda: any(s.energy_wh >= 100 for s in world.sessions(world.station)),
                        60)
            assert (await world.control(op="stop"))["ok"]
            await until(lambda: settled(world), 60)
        return world

    world = asyncio.run(main())
    (cs,) = world.sessions(world.station)
    assert cs.connector == 7 and cs.t_ev == cs.energy_wh * PRICE // 1000 > 0
    assert world.enable_writes()[-1] is False and True in world.enable_writes()


# --- Eichrecht: the meter's own signed record backs the final METER ---------------------

def _final_meter(world: World):  # type: ignore[no-untyped-def]
    from agent.channel.records import MeterRecord
    from agent.channel.sessions import session_dirs
    from agent.channel.store import ChannelStore

    (directory,) = session_dirs(world.tmp / "cs")
    store = ChannelStore(directory.store_path)
    try:
        finals = [r.meter for r in store.records()
                  if isinstance(r, MeterRecord) and r.meter.final]
    finally:
        store.close()
    return finals[-1]


def test_signed_meter_record_rides_the_final_meter_and_the_car_checks_it(
        mosquitto, tmp_path: Path) -> None:
    from agent.channel.meter_proof import check_meter_proof

    async def main() -> World:
        world = World(tmp_path, mosquitto.url, meter_map="wm3m4")
        async with world.running():
            await world.ready()
            assert (await world.control(op="start", station="cs-1", connector=1))["ok"]
            await until(lambda: any(s.energy_wh >= 100 for s in world.sessions(world.station)),
                        60)
            assert (await world.control(op="stop"))["ok"]
            await until(lambda: settled(world), 60)
        return world

    world = asyncio.run(main())
    (cs,), (ev,) = world.sessions(world.station), world.sessions(world.vehicle)
    assert cs.end_reason == "vehicle-stop" and ev.end_reason == "driver-stop"
    signer = world.plant.meter.signed[1]
    assert signer.transactions == 1                       # begun and ended once, by the session
    final = _final_meter(world)
    assert final.ocmf == signer.records[-1]               # the meter's record, unchanged
    # what the car checked (its audit tolerance: the billing register is coarser)
    record = check_meter_proof(final, signer.public_key_der.hex(), tolerance_wh=50)
    assert record.readings[0].kind == "B" and final.import_wh == cs.energy_wh >= 100
    signed = record.readings[-1].energy_wh - record.readings[0].energy_wh  # type: ignore[operator]
    assert abs(signed - final.import_wh) <= 10        # the register's 10 Wh resolution
    assert world.balance(world.cs_keys) == cs.t_ev == cs.energy_wh * PRICE // 1000


def test_a_meter_record_that_does_not_check_is_not_signed_by_the_car(mosquitto, tmp_path: Path
                                                                     ) -> None:
    """The meter's record is signed with another key than the one the offer named (a swapped
    meter): the car does not sign the final state; the latest co-signed one is settled."""
    from cryptography.hazmat.primitives.asymmetric import ec

    async def main() -> tuple[World, dict[str, int]]:
        world = World(tmp_path, mosquitto.url, meter_map="wm3m4")
        async with world.running():
            await world.ready()
            # the meter still reports its registered key, and signs with another
            world.plant.meter.signed[1].key = ec.generate_private_key(ec.SECP256R1())
            assert (await world.control(op="start", station="cs-1", connector=1))["ok"]
            await until(lambda: any(s.energy_wh >= 100 for s in world.sessions(world.station)),
                        60)
            assert (await world.control(op="stop"))["ok"]
            await until(lambda: settled(world), 60)
            role = world.vehicle.runtime.channel.role  # type: ignore[union-attr]
            counters = dict(role.history[-1].channel.counters)  # type: ignore[union-attr]
            station = world.station.runtime.channel.role  # type: ignore[union-attr]
            counters["close-" + station.history[-1].job.close] = 1  # type: ignore[union-attr]
        return world, counters

    world, counters = asyncio.run(main())
    assert counters.get("meter-proof-invalid") == 1, (counters, world.sessions(world.station))
    assert "close-unilateral" in counters, counters       # no final state was co-signed
    (cs,) = world.sessions(world.station)
    assert cs.settlement == "settled" and cs.nonce > 0
    assert _final_meter(world).ocmf                       # the record was there, and refused
    assert world.balance(world.cs_keys) == cs.t_ev == cs.energy_wh * PRICE // 1000
