"""Two agents in one process for the channel-service tests: config files written as a
user would write them, both started through agent.runtime.Runtime (the channel service
`edge-agent run` starts), a real mosquitto, the in-process chain, and one plant
(hil/sim/plant.py, hil/session/site.py): its kWh meter read with ``modbus-tcp``, its
wallbox driven with ``modbus-evse``, the car's battery read with ``dbc`` on a virtual CAN
bus. The plant runs ``time_scale`` times faster than real time: the meter source's
plausibility clock is the plant's (the meter's own time base, as the rig does)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from agent.channel import control
from agent.config import load_config
from agent.fleet_keys import FleetRegistry
from agent.keys import DeviceKeys, KeyStore
from agent.runtime import Runtime, SourceRunner, build_sources
from agent.settlement.chain import InProcessChain
from hil.session.chain import serialised
from hil.session.site import CHARGER_ID, METER_ID, Site
from hil.sim.meter import ChargingProfile
from hil.sim.plant import Plant

PRICE = 300_000          # 0.3 token per kWh
DEPOSIT = 20_000_000


def write_toml(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(tomli_w.dumps(data).encode())
    return path


@dataclass
class Agent:
    name: str
    config_path: Path
    keys: DeviceKeys
    sources: list[SourceRunner]
    runtime: Runtime | None = None
    task: asyncio.Task[None] | None = None
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    def start(self, node: object) -> Runtime:
        config = load_config(self.config_path)
        runtime = Runtime(config, self.keys, sources=[SourceRunner(r.source, r.kind)
                                                      for r in self.sources],
                          node=node)  # type: ignore[arg-type]
        self.stop = asyncio.Event()
        self.runtime = runtime
        self.task = asyncio.create_task(runtime.run(self.stop), name=self.name)
        return runtime

    async def kill(self) -> None:
        assert self.task is not None
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task

    async def finish(self) -> None:
        self.stop.set()
        assert self.task is not None
        await asyncio.wait_for(self.task, 30)


@dataclass
class World:
    tmp: Path
    broker_url: str
    demand_w: int = 22_000             # what the car asks for (negative: it feeds back)
    time_scale: float = 10.0
    meter_map: str = "sdm630"          # "wm3m4": an Eichrecht meter (signed_meter = true)
    export_price: int = 0
    deposit_cs: int = 0
    station_channel: dict[str, Any] = field(default_factory=dict)
    vehicle_channel: dict[str, Any] = field(default_factory=dict)
    settlement: dict[str, Any] = field(default_factory=dict)
    others: tuple[str, ...] = ()       # more vehicles in the registry (keys in .other_keys)
    revoked: tuple[str, ...] = ()      # ... of which these are revoked
    meter_interval_s: float = 0.05     # the station's meter poll (plant time is x10)

    def __post_init__(self) -> None:
        self.chain = InProcessChain.start()
        self.node = serialised(self.chain)   # both agents call it from worker threads
        self.registry = FleetRegistry()
        self.cs_keys, record = KeyStore(self.tmp / "cs").init("cs-1")
        self.registry.add_record(record)
        self.ev_keys, record = KeyStore(self.tmp / "ev").init("ev-1")
        self.registry.add_record(record)
        self.other_keys: dict[str, DeviceKeys] = {}
        for name in self.others:
            keys, record = KeyStore(self.tmp / name).init(name)
            self.registry.add_record(record)
            self.other_keys[name] = keys
            if name in self.revoked:
                self.registry.revoke(keys.identity.kid)
        self.registry.save(self.tmp / "fleet.toml")
        self.chain.fund(self.ev_keys.settlement.address, tokens=2 * DEPOSIT)
        self.chain.fund(self.cs_keys.settlement.address, tokens=self.deposit_cs)
        self.site = Site(time_scale=self.time_scale, obc_max_current_a=32.0,
                         meter_interval_s=self.meter_interval_s, meter_map=self.meter_map)
        self.plant = Plant(self.site.plant())
        self.plant.set_profile(1, ChargingProfile.constant(self.demand_w))
        self.station: Agent
        self.vehicle: Agent

    def _common(self, name: str) -> dict[str, Any]:
        return {
            "mqtt": {"url": self.broker_url, "backoff_initial_s": 0.1, "backoff_max_s": 1.0},
            "batch": {"max_readings": 50, "max_age_ms": 200},
            "status": {"path": str(self.tmp / name / "status.json"), "interval_s": 0.5},
            "settlement": {"contract": "0x" + self.chain.contract.hex(), "poll_s": 0.2,
                           "coop_grace_s": 3.0, **self.settlement},
        }

    def _station(self) -> Agent:
        data = {"device": {"id": "cs-1", "role": "station", "state_dir": str(self.tmp / "cs")},
                "sources": [self.site.meter_source(
                    self.plant.ports["meter"],
                    **({"signed_meter": True} if self.meter_map == "wm3m4" else {}))],
                "chargers": [self.site.charger(self.plant.ports["wallbox"])],
                "channel": {"policy": "registry", "registry": str(self.tmp / "fleet.toml"),
                            "price_per_kwh": PRICE, "export_price_per_kwh": self.export_price,
                            "deposit_ev": DEPOSIT, "deposit_cs": self.deposit_cs,
                            "dispute_window_s": 5, "credit_window_wh": 100,
                            "pay_step_wh": 10, "close_timeout_s": 3.0,
                            "funding_timeout_s": 20.0, "offer_interval_s": 5.0,
                            "connectors": [{"id": 1, "charger": CHARGER_ID,
                                            "meter": METER_ID, "max_current_a": 32.0}],
                            **self.station_channel},
                **self._common("cs")}
        path = write_toml(self.tmp / "station.toml", data)
        config = load_config(path)
        agent = Agent("station", path, self.cs_keys, build_sources(config))
        plant = self.plant
        for runner in agent.sources:   # the meter's own time base (module docstring)
            runner.source.monotonic_ns = (  # type: ignore[attr-defined]
                lambda: int(plant.clock() * 1e9))
        return agent

    def _vehicle(self) -> Agent:
        data = {"device": {"id": "ev-1", "role": "vehicle", "state_dir": str(self.tmp / "ev")},
                "sources": [self.site.car_source()],
                "channel": {"max_price_per_kwh": 400_000, "max_deposit_ev": DEPOSIT,
                            "registry": str(self.tmp / "fleet.toml"),
                            "close_timeout_s": 3.0, "answer_timeout_s": 5.0,
                            "min_dispute_window_s": 5,   # the station's short test window
                            "energy": self.site.energy(),
                            **self.vehicle_channel},
                **self._common("ev")}
        path = write_toml(self.tmp / "vehicle.toml", data)
        config = load_config(path)
        return Agent("vehicle", path, self.ev_keys, build_sources(config))

    def enable_writes(self) -> list[bool]:
        """Every enable / disable the wallbox was sent (its coil, Phoenix EV-CC map)."""
        return [bool(w.values[0]) for _, w in self.plant.wallbox_server.writes
                if w.function == 5]

    async def connector_state(self, letter: str) -> None:
        """Until the station has seen the connector in IEC 61851 state ``letter``."""
        def seen() -> bool:
            rt = self.station.runtime
            role = rt.channel.role if rt is not None and rt.channel is not None else None
            status = role.connectors[1].status if role is not None else None  # type: ignore[union-attr]
            return status is not None and status.state.value == letter
        await until(seen, 10)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[World]:
        await self.plant.start()
        self.station = self._station()
        self.vehicle = self._vehicle()
        self.station.start(self.node)
        self.vehicle.start(self.node)
        try:
            yield self
        finally:
            for agent in (self.vehicle, self.station):
                if agent.task is not None and not agent.task.done():
                    agent.task.cancel()
                    done, _ = await asyncio.wait({agent.task}, timeout=20)
                    assert done, f"{agent.name} did not stop when cancelled"
                    if not agent.task.cancelled():
                        agent.task.exception()  # retrieved: a test failure shows it
            await self.plant.stop()

    async def ready(self) -> None:
        for agent in (self.station, self.vehicle):
            assert agent.runtime is not None
            await asyncio.wait_for(agent.runtime.ready.wait(), 30)
            assert agent.runtime.channel is not None
            await asyncio.wait_for(agent.runtime.channel.ready.wait(), 30)
        await until(lambda: self.vehicle_socket().exists(), 30)

    def vehicle_socket(self) -> Path:
        return self.tmp / "ev" / "control.sock"

    async def control(self, **message: object) -> dict[str, object]:
        return await asyncio.to_thread(control.request, self.vehicle_socket(), dict(message),
                                       60.0)

    def sessions(self, agent: Agent) -> tuple:  # type: ignore[type-arg]
        assert agent.runtime is not None
        return agent.runtime.status().channels

    def balance(self, keys: DeviceKeys) -> int:
        from agent.settlement.client import SettlementClient

        return SettlementClient(self.node, self.chain.contract, keys.settlement).balance(
            keys.settlement.address)


async def until(done: Callable[[], bool], timeout_s: float, step_s: float = 0.05) -> None:
    """Poll a condition the test cannot wait on as an event (a status snapshot)."""
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout_s} s")
        await asyncio.sleep(step_s)
