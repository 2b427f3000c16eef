"""One channel party as its own process, for the end-to-end test.

    python -m tests.agent.channel.peer CONFIG.json

CONFIG (written by the test, throw-away test keys): role ("cs" or "ev"), broker port,
identity seed / settlement secret (hex), the peer's public keys, salt, tariff, deposits,
store path, result path; the station also gets ``target_wh`` and serves a simulated meter
(hil.sim.meter, ABB B23 map, 10 Wh register resolution) over Modbus TCP on loopback, read by
the real Modbus TCP source. Each second of simulated time at 36 kW is exactly 10 Wh; the
simulated clock advances only while the channel allows delivery (credit window), which is
the station's charger control. The result (final state, both signatures, counters, the
meter's own energy counters) is written as JSON.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from agent.channel.messages import Tariff, sign_tariff
from agent.channel.mux import Route, serving
from agent.channel.records import Party
from agent.channel.session import open_channel, run_station, run_vehicle
from agent.channel.station import StationChannel
from agent.channel.store import ChannelStore
from agent.channel.vehicle import VehicleChannel
from agent.keys import IdentityKey, SettlementKey
from agent.readings import Reading
from agent.uplink import MqttConfig, Uplink
from firmware_adapters.modbus.driver import ModbusTcpSource
from hil.sim.meter import ChargingProfile, ManualClock, MeterSimulator

POWER_W = 36_000  # 10 Wh per simulated second


async def station(cfg: dict, up: Uplink) -> dict:
    identity = IdentityKey(bytes.fromhex(cfg["identity_seed"]))
    settlement = SettlementKey(bytes.fromhex(cfg["settlement_secret"]))
    tariff = Tariff(cfg["price_per_kwh"], cfg["export_price_per_kwh"])
    store = ChannelStore(cfg["store"])
    channel = open_channel(
        StationChannel, store, identity=identity, settlement=settlement,
        vehicle=Party(bytes.fromhex(cfg["peer_identity"]), bytes.fromhex(cfg["peer_address"])),
        chain_id=cfg["chain_id"], contract=bytes.fromhex(cfg["contract"]),
        salt=bytes.fromhex(cfg["salt"]), tariff=tariff, tariff_sig=sign_tariff(tariff, identity),
        deposit_ev=cfg["deposit_ev"], deposit_cs=cfg["deposit_cs"], dispute_window_s=3600,
        credit_window_wh=cfg["credit_window_wh"], pay_step_wh=cfg["pay_step_wh"],
        require_funding_check=False)  # no ledger in these runs (test_session checks the hook)
    clock = ManualClock(0.0)
    sim = MeterSimulator({1: "abb_b23"}, ChargingProfile.constant(POWER_W), clock=clock)
    port = await sim.start_tcp()
    source = ModbusTcpSource.from_options(
        "meter0", {"host": "127.0.0.1", "port": port, "unit": 1, "map": "abb_b23",
                   "interval_s": 0.0, "timeout_s": 2.0}, "e2e")
    source.clock = lambda: (int(1_700_000_000e9 + clock() * 1e9), "S")  # the meter's time
    delivering = asyncio.Event()
    first: list[int] = []

    def charger(allowed: bool) -> None:
        delivering.set() if allowed else delivering.clear()

    async def meter():  # type: ignore[no-untyped-def]
        values: dict[str, int] = {}

        async def emit(item: object) -> None:
            if isinstance(item, Reading):
                values[item.name] = int(item.value)  # type: ignore[arg-type]

        if not await source.ensure_line(emit):
            raise RuntimeError("meter simulator not reachable")
        while True:
            values.clear()
            if not await source.poll_once(emit):
                continue
            imp, exp = values["1-0:1.8.0"], values["1-0:2.8.0"]
            first[:] = first or [imp]
            yield imp, exp
            if imp - first[0] >= cfg["target_wh"]:
                return
            await delivering.wait()
            clock.advance(1.0)

    try:
        closed = await run_station(up, channel, store, meter(), charger=charger,
                                   wall_clock=lambda: 1_700_000_000 + clock())
    finally:
        source.link.close()
        await sim.stop()
        store.close()
    served = sim.served_values(1)
    return {"closed": closed, "channel": channel,
            "meter_delta_wh": served["1-0:1.8.0"] - first[0]}


async def vehicle(cfg: dict, up: Route) -> dict:
    store = ChannelStore(cfg["store"])
    resumed_at = max((getattr(r, "state", None).nonce for r in store.records()  # type: ignore[union-attr]
                      if getattr(r, "state", None) is not None), default=None)
    channel = open_channel(
        VehicleChannel, store, identity=IdentityKey(bytes.fromhex(cfg["identity_seed"])),
        settlement=SettlementKey(bytes.fromhex(cfg["settlement_secret"])),
        station=Party(bytes.fromhex(cfg["peer_identity"]), bytes.fromhex(cfg["peer_address"])),
        chain_id=cfg["chain_id"], contract=bytes.fromhex(cfg["contract"]),
        salt=bytes.fromhex(cfg["salt"]), max_price_per_kwh=cfg["price_per_kwh"],
        max_deposit_ev=cfg["deposit_ev"],
        # The station's METER times are its simulated meter's (from 2023-11-14, hours per
        # minute); a flat tariff, so the vehicle only needs them roughly in range.
        clock_tolerance_s=10**6)
    try:
        closed = await run_vehicle(up, channel, store, wall_clock=lambda: 1_700_000_000)
    finally:
        store.close()
    return {"closed": closed, "channel": channel, "resumed_at_nonce": resumed_at}


async def main(path: str) -> None:
    cfg = json.loads(Path(path).read_text())
    up = Uplink(MqttConfig(host="127.0.0.1", port=cfg["port"], client_id=f"e2e-{cfg['role']}"))
    async with up, serving(up) as mux:
        run = station if cfg["role"] == "cs" else vehicle
        out = await run(cfg, mux.transport())
    closed, channel = out.pop("closed"), out.pop("channel")
    state = closed.state
    out.update(nonce=state.nonce, t_ev=state.t_ev, t_cs=state.t_cs, wh=state.wh,
               final=state.final, state=state.encode().hex(), sig_ev=closed.sig_ev.hex(),
               sig_cs=closed.sig_cs.hex(), counters=dict(channel.counters),
               duplicates=channel.duplicates)
    Path(cfg["result"]).write_text(json.dumps(out))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
