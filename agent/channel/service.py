"""The channel service: what ``edge-agent run`` starts when ``[channel]`` is configured
(DESIGN s5b). The runtime creates it and runs it as its task ``channel``.

It owns: the settlement client (``[settlement] node`` over JSON-RPC; a Web3 the caller
passes, such as the demo's in-process chain, stands in when no node is configured), the
topic mux (one reader of the uplink's messages, agent/channel/mux.py), the reading hub (its
own sources' readings: a connector's meter, the vehicle's energy count and plug signal),
the role's service (agent/channel/station_service.py or vehicle_service.py) and, on a
vehicle, the local control socket (agent/channel/control.py). Modules::

    settings.py  [channel] / [settlement] session keys       offers.py  session messages
    context.py   what the roles share, the charger interface  energy.py  the car's own count
    sessions.py  session directories, job records             jobs.py    settlement jobs
    mux.py       topic routing, connection epochs              control.py the control socket

Status: :meth:`status` gives one ChannelStatus per session (running, settling, and the last
ten finished), for ``edge-agent status`` and the metrics.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from agent.channel.context import Charger, Context, ReadingHub, TransactionMeter
from agent.channel.mux import TopicMux
from agent.channel.settings import ChannelSettings
from agent.config import Config
from agent.errors import ConfigError
from agent.fleet_keys import FleetRegistry
from agent.keys import DeviceKeys
from agent.readings import Event, Reading
from agent.status import ChannelStatus

if TYPE_CHECKING:
    from web3 import Web3

    from agent.channel.mux import Uplink
    from agent.channel.station_service import StationService
    from agent.channel.vehicle_service import VehicleService
    from agent.settlement.settings import SettlementConfig

log = logging.getLogger("edge_agent.channel")


@dataclass(frozen=True, slots=True)
class ServiceSettings:
    channel: ChannelSettings
    settlement: SettlementConfig

    @classmethod
    def from_config(cls, config: Config) -> ServiceSettings | None:
        """``[channel]`` and ``[settlement]`` validated (None: no [channel] section)."""
        table = config.section("channel")
        if not table.data:
            return None
        from agent.settlement.settings import SettlementConfig

        settlement_table = config.section("settlement")
        channel = ChannelSettings.from_tables(
            table, settlement_table, config.device.role, config.device.state_dir,
            frozenset(s.id for s in config.sources), frozenset(c.id for c in config.chargers))
        settlement = SettlementConfig.from_table(settlement_table)
        if settlement.contract is None:
            raise settlement_table.error("contract", "the channel contract's address (charging "
                                         "needs it)", None)
        if config.device.role == "station":
            used = {c.charger for c in channel.station.connectors} if channel.station else set()
            for charger in config.chargers:
                if charger.id not in used:
                    raise ConfigError(file=config.path, key=f"chargers.{charger.id}",
                                      expected="a charger that a [[channel.connectors]] names",
                                      found="unused")
        return cls(channel, settlement)


class ChannelService:
    def __init__(self, settings: ServiceSettings, *, device_id: str, keys: DeviceKeys,
                 config: Config, chargers: Mapping[str, Charger],
                 tap: Callable[[str], asyncio.Queue[Reading]],
                 emit: Callable[[Event], Awaitable[None]],
                 on_error: Callable[[str, BaseException], None],
                 node: Web3 | None = None,
                 meters: Mapping[str, TransactionMeter] | None = None) -> None:
        self.settings = settings
        self.device_id, self.keys, self.config = device_id, keys, config
        self.chargers = dict(chargers)
        self.meters = dict(meters or {})   # sources with an Eichrecht meter
        self.hub = ReadingHub(tap, _sources_read(settings.channel))
        self.emit, self.on_error = emit, on_error
        self.node = node
        self.role: StationService | VehicleService | None = None
        self.context: Context | None = None
        self.ready = asyncio.Event()   # subscribed and serving (and, vehicle, the socket)

    def _client(self) -> object:
        from agent.settlement.client import SettlementClient

        s = self.settings.settlement
        node = self.node if self.node is not None else s.node
        if node is None:
            raise ConfigError(file=self.config.path, key="settlement.node",
                              expected="the JSON-RPC URL of the settlement node", found=None)
        assert s.contract is not None
        return SettlementClient(node, s.contract, self.keys.settlement, policy=s.policy,
                                from_block=s.from_block)

    async def run(self, uplink: Uplink, status_topic: str | None,
                  mux: TopicMux | None = None) -> None:
        """``mux``: the agent's topic router when others read through it too (the
        fleet-commit follower); it is run here all the same, at the point it always was."""
        from agent.channel.station_service import StationService
        from agent.channel.vehicle_service import VehicleService

        client = await asyncio.to_thread(self._client)
        channel = self.settings.channel
        registry_path = (channel.station.registry if channel.station is not None
                         else channel.vehicle.registry if channel.vehicle is not None else None)
        registry = FleetRegistry.load(registry_path) if registry_path is not None else None
        mux = TopicMux(uplink, status_topic) if mux is None else mux
        ctx = Context(self.device_id, self.keys, channel, self.settings.settlement,
                      client, mux, self.config.device.state_dir,  # type: ignore[arg-type]
                      self.hub, self.emit, self.on_error, registry)
        from agent.channel.jobs import NewBlocks

        ctx.blocks = NewBlocks(client, self.settings.settlement.poll_s)  # type: ignore[arg-type]
        self.context = ctx
        role: StationService | VehicleService
        if channel.station is not None:
            role = StationService(ctx, channel.station, self.chargers, self.meters)
        else:
            assert channel.vehicle is not None
            role = VehicleService(ctx, channel.vehicle)
        self.role = role
        async with asyncio.TaskGroup() as tg:
            tg.create_task(mux.run(), name="channel.mux")
            tg.create_task(ctx.blocks.run(), name="channel.blocks")
            tg.create_task(role.run(), name=f"channel.{channel.role}")
            await asyncio.sleep(0)  # the role registers its listeners first
            tg.create_task(self.hub.run(), name="channel.readings")
            if isinstance(role, VehicleService):
                from agent.channel import control

                assert channel.vehicle is not None
                tg.create_task(control.serve(channel.vehicle.control_socket, self._control),
                               name="channel.control")
            await ctx.ready.wait()
            self.ready.set()

    async def _control(self, request: dict[str, object]) -> dict[str, object]:
        from agent.channel.vehicle_service import VehicleService

        role = self.role
        op = request["op"]
        if op == "status":
            return {"ok": True, "sessions": [
                {"channel": s.channel_id, "state": s.state, "nonce": s.nonce,
                 "energy_wh": s.energy_wh, "t_ev": s.t_ev, "t_cs": s.t_cs,
                 "connector": s.connector, "settlement": s.settlement,
                 "end_reason": s.end_reason} for s in self.status()]}
        if not isinstance(role, VehicleService):
            return {"ok": False, "reason": "not-ready", "detail": "the service is starting"}
        if op == "stop":
            return role.stop("driver-stop")
        return await role.start(str(request["station"]), int(request["connector"]),  # type: ignore[call-overload]
                                max_wh=request.get("max_wh"),  # type: ignore[arg-type]
                                max_price_per_kwh=request.get("max_price"),  # type: ignore[arg-type]
                                origin="driver")

    def status(self) -> tuple[ChannelStatus, ...]:
        role = self.role
        if role is None:
            return ()
        out = []
        for view in role.views():
            record = view.record
            peer = record.vehicle if record.role == "station" else record.station
            out.append(view.status(peer))
        return tuple(out)

    @property
    def counters(self) -> dict[str, int]:
        return dict(self.context.counters) if self.context is not None else {}


def _sources_read(channel: ChannelSettings) -> tuple[str, ...]:
    """The sources the role listens to: each connector's meter; the car's energy count and
    plug signal."""
    if channel.station is not None:
        return tuple(c.meter for c in channel.station.connectors)
    vehicle = channel.vehicle
    if vehicle is None:
        return ()
    ids = [vehicle.energy.source] if vehicle.energy is not None else []
    if vehicle.plugged_source is not None:
        ids.append(vehicle.plugged_source)
    return tuple(ids)
