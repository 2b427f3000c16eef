"""The rig: a whole charging session on one machine, for ``edge-agent demo`` and HIL runs,
through the product's own path: two config files, two agents started with them through
:class:`agent.runtime.Runtime` (the channel service ``edge-agent run`` starts), and the
session started and stopped the way a driver does it, through the vehicle agent's control
socket (``edge-agent charge start|stop``). The rig wires no channel itself.

What runs (all real protocols on loopback, nothing mocked)::

    broker      mosquitto on a free port (an embedded amqtt broker if mosquitto is absent)
    chain       in-process eth-tester + py-evm: test token + channel contract deployed
                (the agents get it as their settlement node; one lock serialises it)
    plant       hil/sim/plant.py: one physical model of the site (hil/session/site.py):
                an SDM630 kWh meter and a Phoenix EV-CC wallbox on Modbus TCP, the car's
                battery and on-board charger (losses, sensor noise) on a CAN bus
    station     config station.toml: the plant's meter (modbus-tcp), its wallbox
                (modbus-evse), [channel]: fleet registry policy, the signed tariff, one
                connector
    vehicle     config vehicle.toml: a simulated ECU on a virtual CAN bus (hil-ecu) and the
                car's own battery signals (dbc on the plant's bus); [channel.energy] counts
                the BMS's charged-energy counter (never the station's data)
    verifier    a subscriber that verifies every envelope both devices publish

Time: the plant runs ``time_scale`` times faster than real time (the demo charges 3 kWh in
seconds). Its meter's energy then grows faster than power x wall time, so the one thing the
rig sets on a product driver is the meter source's plausibility clock: the plant's (the
meter's own time base), so that the check sees a consistent meter instead of flagging every
step. At ``time_scale = 1`` nothing is set (the OS-process tests run so).

The session ends when ``session_over`` says so (the demo: ``energy_wh`` delivered): the rig
sends ``charge stop``; the agents close the channel and settle it on chain by themselves
(the station submits the cooperative close); the rig reads the receipt from their status
and the chain, stops them, and returns a :class:`hil.report.SessionRecord`.

Hooks for the HIL runner (hil/scenarios/rig.py subclasses :class:`Rig`): ``session_over``,
``timeline`` (fault injection beside the agents), ``configure`` (config changes per
scenario); ``rig.broker``, ``rig.chain``, ``rig.plant`` and ``rig.agents`` (each an
:class:`Agent` that can be killed and restarted from its state directory) are reachable
while it runs. With ``charging = False`` only the vehicle agent runs (a drive, no channel).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import tomli_w

from agent.channel import control
from agent.config import Config, load_config
from agent.envelope import OpenedEnvelope, open_envelope
from agent.errors import ConfigError, EdgeAgentError
from agent.fleet_keys import FleetRegistry
from agent.keys import DeviceKeys, KeyStore
from agent.live_verify import LiveVerifier, mqtt_config
from agent.readings import Reading
from agent.runtime import Runtime, SourceRunner, build_sources
from agent.settlement.chain import InProcessChain
from agent.status import ChannelStatus
from agent.uplink import MqttConfig, Uplink
from agent.verify import VerifyReport
from firmware_adapters.base import Source
from hil.broker import EmbeddedBroker, Mosquitto, start_broker
from hil.report import (
    SOC,
    ChainTail,
    PlotSignal,
    Receipt,
    RecordedReading,
    Sample,
    SessionRecord,
    VerificationSummary,
    recorded_readings,
)
from hil.session.chain import serialised
from hil.session.site import BMS_ID, CHARGED_WH, CHARGER_ID, METER_ID, Site
from hil.sim.ecu_source import HIL_PIDS
from hil.sim.meter import ChargingProfile
from hil.sim.plant import Plant

IMPORT_WH, EXPORT_WH, POWER_W = "1-0:1.8.0", "1-0:2.8.0", "1-0:16.7.0"
ECU_ID = "ecu0"   # with METER_ID (meter0): the source ids HIL scenarios name
TOKEN_DECIMALS = 6


@dataclass(frozen=True, slots=True)
class RigSettings:
    energy_wh: int = 3_000                 # session ends when the meter has delivered this
    power_w: int = 11_000                  # what the car asks for (0: nothing until a
                                           # scenario's profile starts); its OBC takes 11 kW
    time_scale: float = 120.0              # simulated seconds per wall second
    price_per_kwh: int = 300_000           # 0.30 token per kWh (token has 6 decimals)
    export_price_per_kwh: int = 0
    deposit_ev: int = 20_000_000           # 20 tokens
    deposit_cs: int = 0
    pay_step_wh: int = 10
    credit_window_wh: int = 100
    dispute_window_s: int = 3600
    wallbox_map: str = "phoenix-ev-eth"    # any modbus-evse map the plant serves
    batch_max_readings: int = 50
    batch_max_age_ms: int = 500
    timeout_s: float = 300.0
    partial_on_timeout: bool = False       # True: a session that times out ends the run with
                                           # what was verified and no receipt (HIL: a FAIL)
    charging: bool = True                  # False: the vehicle agent alone (a drive, no chain)
    ecu_time_scale: float = 10.0           # the ECU's driving loop runs this much faster
    meter_interval_s: float = 0.05         # Modbus poll period (wall seconds)
    meter_timeout_s: float = 0.5           # Modbus reply timeout (wall seconds)
    ecu_probe_interval_s: float = 2.0      # a sleeping car is probed this often (wall s)
    ecu_poll_scale: float = 1.0            # the OBD-II PID periods are divided by this
    close_timeout_s: float = 5.0           # either side: the peer must finish a close in this
    submit: str = "station"                # who sends the cooperative close


@dataclass
class Progress:
    """What the demo prints while charging."""

    energy_wh: int = 0
    power_w: int = 0
    paid: int = 0
    paid_wh: int = 0
    nonce: int = 0
    envelopes: int = 0
    export_wh: int = 0


@dataclass
class Agent:
    """One device's agent in the rig: its config file, keys and hardware, and the Runtime
    started from them.

    ``kill()`` ends it the way a power cut would, as far as one process can: its tasks are
    cancelled mid-flight, with no flush of what the batcher holds and no channel close.
    ``start()`` again builds a new Runtime from the same config and state directory (the
    spool restores seq and chain head, the channel service its sessions). The source
    objects are kept (an odometer's or plausibility window's state, as the hardware keeps
    its own); the charger is built from the config each start, as ``run`` does.
    """

    role: str                              # "vehicle" | "station"
    keys: DeviceKeys
    config_path: Path
    node: Any = None                       # the settlement node (the in-process chain)
    runtime: Runtime | None = None
    starts: int = 0

    def __post_init__(self) -> None:
        self.config: Config = load_config(self.config_path)
        self.sources: list[SourceRunner] = build_sources(self.config)
        self._task: asyncio.Task[None] | None = None

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self, tg: asyncio.TaskGroup, stop: asyncio.Event) -> Runtime:
        sources = [SourceRunner(r.source, r.kind) for r in self.sources]  # fresh taps
        runtime = Runtime(load_config(self.config_path), self.keys, sources=sources,
                          node=self.node)
        self.runtime = runtime
        self.starts += 1
        self._task = tg.create_task(runtime.run(stop), name=f"{self.role}#{self.starts}")
        return runtime

    async def kill(self) -> None:
        """Cancel every task of this agent (no clean shutdown) and wait until it is gone."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def serving(self) -> None:
        """Until this agent's channel service (or, without one, the agent) serves."""
        assert self.runtime is not None
        await self.runtime.ready.wait()
        if self.runtime.channel is not None:
            await self.runtime.channel.ready.wait()

    def sessions(self) -> tuple[ChannelStatus, ...]:
        return self.runtime.channel.status() if self.runtime and self.runtime.channel else ()

    def source(self, source_id: str) -> Source:
        for runner in self.sources:
            if runner.source.id == source_id:
                return runner.source
        raise ConfigError(key="sources.id", expected="a configured source", found=source_id)


def write_toml(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"# written by the rig (hil/session/rig.py)\n" + tomli_w.dumps(data).encode())
    return path


@dataclass
class Rig:
    out: Path
    settings: RigSettings = field(default_factory=RigSettings)
    say: Callable[[str], None] = print

    def __post_init__(self) -> None:
        self.progress = Progress()
        self.samples: list[Sample] = []
        self.captured: list[bytes] = []
        self.agents: dict[str, Agent] = {}
        self.broker: Mosquitto | EmbeddedBroker | None = None
        self.chain: InProcessChain | None = None
        self.plant: Plant | None = None
        self.site = Site(wallbox_map=self.settings.wallbox_map,
                         time_scale=self.settings.time_scale,
                         meter_interval_s=self.settings.meter_interval_s,
                         meter_timeout_s=self.settings.meter_timeout_s)
        self.node: Any = None
        self.balances: dict[str, int] = {}
        self.timed_out = False
        self.final: ChannelStatus | None = None
        self.opened: list[OpenedEnvelope] = []
        self._base: tuple[int, int] | None = None   # meter (import, export) at the start

    # -- hooks for the HIL runner (hil/scenarios/rig.py); the demo uses these defaults -----
    def session_over(self, delivered_wh: int) -> bool:
        """The driver stops the session (``charge stop``) once this holds."""
        return delivered_wh >= self.settings.energy_wh

    async def timeline(self, tg: asyncio.TaskGroup, stop: asyncio.Event) -> None:
        """Runs beside the agents while the session lasts (the runner injects faults here).
        Without a channel the session ends when this returns."""

    def configure(self, role: str, data: dict[str, Any]) -> None:
        """Change an agent's config before it is written (the runner's per-scenario keys)."""

    def record_title(self) -> str:
        return "ev-edge-agent demo: one charging session"

    # -- set-up ------------------------------------------------------------------------
    def _provision(self) -> tuple[DeviceKeys, DeviceKeys, FleetRegistry]:
        registry = FleetRegistry()
        devices = []
        for name in ("vehicle", "station"):
            keys, record = KeyStore(self.out / name).init(f"demo-{name}")
            registry.add_record(record)  # the technician's step: proof of possession
            devices.append(keys)
        registry.save(self.out / "fleet.toml")
        return devices[0], devices[1], registry

    def _common(self, role: str, keys: DeviceKeys, broker_url: str) -> dict[str, Any]:
        s = self.settings
        return {
            "device": {"id": keys.device_id, "role": role, "state_dir": str(self.out / role)},
            "batch": {"max_readings": s.batch_max_readings, "max_age_ms": s.batch_max_age_ms},
            "mqtt": {"url": broker_url, "backoff_initial_s": 0.1, "backoff_max_s": 2.0},
            "status": {"path": str(self.out / role / "status.json"), "interval_s": 1.0},
        }

    def _settlement(self) -> dict[str, Any]:
        assert self.chain is not None
        return {"contract": "0x" + self.chain.contract.hex(), "poll_s": 0.2,
                "submit": self.settings.submit, "coop_grace_s": 10.0}

    def _ecu(self) -> dict[str, Any]:
        s = self.settings
        source: dict[str, Any] = {"id": ECU_ID, "kind": "hil-ecu",
                                  "time_scale": s.ecu_time_scale,
                                  "probe_interval_s": s.ecu_probe_interval_s}
        if s.ecu_poll_scale != 1.0:  # poll as often in simulated time as a real car would
            source["pids"] = {pid: period / s.ecu_poll_scale for pid, period in HIL_PIDS.items()}
        return source

    def _vehicle_config(self, keys: DeviceKeys, broker_url: str) -> Path:
        s = self.settings
        data = self._common("vehicle", keys, broker_url)
        data["sources"] = [self._ecu()]
        if s.charging:
            data["sources"].append(self.site.car_source())
            data["channel"] = {
                "max_price_per_kwh": s.price_per_kwh, "max_deposit_ev": s.deposit_ev,
                "registry": str(self.out / "fleet.toml"),
                "control_socket": str(self.out / "vehicle" / "control.sock"),
                "close_timeout_s": s.close_timeout_s, "answer_timeout_s": 10.0,
                "min_dispute_window_s": min(3600, s.dispute_window_s),
                "energy": self.site.energy()}
            data["settlement"] = self._settlement()
        self.configure("vehicle", data)
        return write_toml(self.out / "vehicle.toml", data)

    def _station_config(self, keys: DeviceKeys, broker_url: str) -> Path:
        s = self.settings
        data = self._common("station", keys, broker_url)
        assert self.plant is not None
        data["sources"] = [self.site.meter_source(self.plant.ports["meter"])]
        data["chargers"] = [self.site.charger(self.plant.ports["wallbox"])]
        data["channel"] = {
            "policy": "registry", "registry": str(self.out / "fleet.toml"),
            "price_per_kwh": s.price_per_kwh, "export_price_per_kwh": s.export_price_per_kwh,
            "deposit_ev": s.deposit_ev, "deposit_cs": s.deposit_cs,
            "dispute_window_s": s.dispute_window_s, "credit_window_wh": s.credit_window_wh,
            "pay_step_wh": s.pay_step_wh, "close_timeout_s": s.close_timeout_s,
            "connectors": [{"id": 1, "charger": CHARGER_ID, "meter": METER_ID}]}
        data["settlement"] = self._settlement()
        self.configure("station", data)
        return write_toml(self.out / "station.toml", data)

    # -- the session -------------------------------------------------------------------
    async def run(self) -> SessionRecord:
        self.out.mkdir(parents=True, exist_ok=True)
        started = time.time_ns()
        vehicle_keys, station_keys, registry = self._provision()
        self.say(f"provisioned {vehicle_keys.device_id} and {station_keys.device_id}; "
                 f"both admitted to {self.out / 'fleet.toml'} after proof of possession")
        broker = await asyncio.to_thread(start_broker, self.out / "broker")
        self.broker = broker
        try:
            self.say(f"broker: {type(broker).__name__.lower()} at {broker.url}")
            if self.settings.charging:
                chain = await asyncio.to_thread(InProcessChain.start)
                self.chain = chain
                node = self.node = serialised(chain)
                self.say(f"chain: in-process eth-tester (chain id {chain.chain_id}), token "
                         f"0x{chain.token.hex()}, channel contract 0x{chain.contract.hex()}")
                for keys, tokens in ((vehicle_keys, self.settings.deposit_ev * 2),
                                     (station_keys, self.settings.deposit_cs)):
                    await asyncio.to_thread(chain.fund, keys.settlement.address, tokens=tokens)
                self.plant = Plant(self.site.plant())
                ports = await self.plant.start()
                self.say(f"plant: meter on port {ports['meter']}, wallbox "
                         f"({self.settings.wallbox_map}) on port {ports['wallbox']}, the car "
                         f"on CAN {self.site.bus['channel']}")
                try:
                    record = await self._session(broker.url, node, vehicle_keys,
                                                 station_keys, registry)
                finally:
                    await self.plant.stop()
            else:
                record = await self._drive(broker.url, vehicle_keys, registry)
        finally:
            await asyncio.to_thread(broker.stop)
        return SessionRecord(title=self.record_title(),
                             started_ns=started, ended_ns=time.time_ns(),
                             samples=tuple(self.samples), readings=record[0],
                             receipt=record[1], verification=record[2],
                             time_scale=self.settings.time_scale if self.settings.charging
                             else self.settings.ecu_time_scale,
                             signals=self._signals(), tails=self.tails())

    def _signals(self) -> tuple[PlotSignal, ...]:
        """The vehicle's own signals for the report, beside the station meter's."""
        vehicle = self.agents.get("vehicle")
        if vehicle is None:
            return ()
        ev = vehicle.keys.device_id
        own = (PlotSignal("energy", "car's own count", "Wh", ev, BMS_ID, CHARGED_WH,
                          relative=True),) if self.settings.charging else ()
        return (*own, PlotSignal("soc", "State of charge", "%", ev, ECU_ID, SOC))

    def tails(self) -> tuple[ChainTail, ...]:
        """Each agent's final chain head (its spool's: the last envelope committed), and
        whether the capture holds that envelope (a lost tail is invisible otherwise)."""
        out = []
        for role, agent in self.agents.items():
            pipeline = agent.runtime.pipeline if agent.runtime is not None else None
            device = agent.keys.device_id
            if pipeline is None or pipeline.spool.next_seq == 0:
                out.append(ChainTail(role, device, -1, "", True))
                continue
            seq, head = pipeline.spool.next_seq - 1, pipeline.spool.head
            captured = any((o.device, o.seq, o.hash) == (device, seq, head)
                           for o in self.opened)
            out.append(ChainTail(role, device, seq, head.hex(), captured))
        return tuple(out)

    async def _drive(self, broker_url: str, ev: DeviceKeys, registry: FleetRegistry
                     ) -> tuple[tuple[RecordedReading, ...], None, VerificationSummary]:
        """No charging: the vehicle agent alone, telemetry only, until ``timeline`` ends."""
        vehicle = Agent("vehicle", ev, self._vehicle_config(ev, broker_url))
        self.agents = {"vehicle": vehicle}
        live = LiveVerifier(registry)
        stop = asyncio.Event()
        try:
            async with self._verifier(broker_url) as verifier:
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(self._collect(verifier, live), name="verifier")
                    vehicle.start(tg, stop)
                    timeline = tg.create_task(self.timeline(tg, stop), name="timeline")
                    await self._wait(timeline.done)
                    timeline.cancel()
                    await self._finish(stop, live)
        except* _Done:
            pass
        readings, summary = self._verified(live)
        return readings, None, summary

    def _agents(self, broker_url: str, node: Any, ev: DeviceKeys, cs: DeviceKeys) -> None:
        plant = self.plant
        assert plant is not None
        station = Agent("station", cs, self._station_config(cs, broker_url), node)
        vehicle = Agent("vehicle", ev, self._vehicle_config(ev, broker_url), node)
        if self.settings.time_scale != 1.0:   # the meter's own time base (module docstring)
            meter = station.source(METER_ID)
            meter.monotonic_ns = lambda: int(plant.clock() * 1e9)  # type: ignore[attr-defined]
        plant.set_profile(1, ChargingProfile.constant(self.settings.power_w))
        self.agents = {"vehicle": vehicle, "station": station}

    async def _session(self, broker_url: str, node: Any, ev: DeviceKeys, cs: DeviceKeys,
                       registry: FleetRegistry
                       ) -> tuple[tuple[RecordedReading, ...], Receipt | None,
                                  VerificationSummary]:
        self._agents(broker_url, node, ev, cs)
        station, vehicle = self.agents["station"], self.agents["vehicle"]
        live = LiveVerifier(registry)
        stop = asyncio.Event()
        try:
            async with self._verifier(broker_url) as verifier:
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(self._collect(verifier, live), name="verifier")
                    station.start(tg, stop)
                    vehicle.start(tg, stop)
                    await asyncio.wait_for(asyncio.gather(station.serving(), vehicle.serving()),
                                           self.settings.timeout_s)
                    tg.create_task(self._meter_samples(), name="samples")
                    watch = tg.create_task(self._show_progress(), name="progress")
                    await self._charge_start(cs.device_id)
                    timeline = tg.create_task(self.timeline(tg, stop), name="timeline")
                    if not await self._wait(self._settled):
                        watch.cancel()
                        timeline.cancel()
                        await self._finish(stop, live)
                    watch.cancel()
                    await timeline  # a fault still in force (a restart) finishes first
                    self.final = self._final()
                    await self._finish(stop, live)  # both flush their spools and stop
        except* _Done:
            pass
        readings, summary = self._verified(live)
        if self.timed_out or self.final is None:  # what was verified, no receipt: a FAIL
            return readings, None, summary
        assert self.chain is not None
        from agent.settlement.client import SettlementClient

        client = SettlementClient(node, self.chain.contract, ev.settlement)
        self.balances = {name: await asyncio.to_thread(client.balance, addr)
                         for name, addr in (("vehicle", ev.settlement.address),
                                            ("station", cs.settlement.address))}
        return readings, await self._receipt(node, ev, cs), summary

    async def _charge_start(self, station_id: str) -> None:
        """The driver's ``edge-agent charge start``, through the vehicle's control socket."""
        socket = self.out / "vehicle" / "control.sock"
        answer = await asyncio.to_thread(control.request, socket, {
            "op": "start", "station": station_id, "connector": 1}, 60.0)
        if not answer.get("ok"):
            raise EdgeAgentError(f"charge start refused: {answer.get('reason')}: "
                                 f"{answer.get('detail')}", reason="rig-start")
        self.say(f"charge start: session 0x{answer['channel']} at {station_id} connector 1")

    async def charge_stop(self) -> None:
        """The driver's ``edge-agent charge stop``."""
        socket = self.out / "vehicle" / "control.sock"
        answer = await asyncio.to_thread(control.request, socket, {"op": "stop"}, 30.0)
        self.say(f"charge stop: {answer.get('reason') if answer.get('ok') else answer}")

    def _settled(self) -> bool:
        """Both agents report the session's settlement job done."""
        sessions = [s for agent in self.agents.values() for s in agent.sessions()]
        return len(sessions) >= 2 and all(s.settlement in ("settled", "nothing-to-settle")
                                          for s in sessions)

    def _final(self) -> ChannelStatus | None:
        station = self.agents["station"].sessions()
        return station[-1] if station else None

    @contextlib.asynccontextmanager
    async def _verifier(self, broker_url: str) -> AsyncIterator[Uplink]:
        """A subscriber to every device's telemetry and events, for the live verifier."""
        async with Uplink(self._verifier_config(broker_url)) as verifier:
            for topic in ("evedge/v1/+/telemetry", "evedge/v1/+/event"):
                await verifier.subscribe(topic)
            yield verifier

    async def _finish(self, stop: asyncio.Event, live: LiveVerifier) -> NoReturn:
        """Stop the agents (they flush their spools), let the verifier go quiet, and end
        the session's TaskGroup."""
        await self._stop_agents(stop)
        await self._quiet(live, 1.0)
        raise _Done

    @staticmethod
    def _verifier_config(broker_url: str) -> MqttConfig:
        # persistent: what the agents replay while the verifier is reconnecting after a
        # broker restart is queued for it, so a gap it reports is a real loss
        return mqtt_config(broker_url, client_id="demo-verifier", persistent=True)

    async def _wait(self, done: Callable[[], bool]) -> bool:
        """Until ``done()`` (a status snapshot: polled). After ``timeout_s``: TimeoutError,
        or with ``partial_on_timeout`` (the HIL runner) False, and the rig reports what it
        has."""
        try:
            async with asyncio.timeout(self.settings.timeout_s):
                while not done():
                    await asyncio.sleep(0.1)
            return True
        except TimeoutError:
            if not self.settings.partial_on_timeout:
                raise
            self.timed_out = True
            self.say(f"the session did not end within {self.settings.timeout_s:g} s; stopping")
            return False

    async def _stop_agents(self, stop: asyncio.Event) -> None:
        stop.set()
        while any(a.alive for a in self.agents.values()):
            await asyncio.sleep(0.1)

    # -- the pieces -----------------------------------------------------------------------
    async def _meter_samples(self) -> None:
        """The report's time series, from the station's signed meter readings (a tap, as
        any observer; restarted with the station agent), and the driver's stop."""
        stopped = False
        while True:
            station = self.agents["station"]
            runtime = station.runtime
            assert runtime is not None
            readings = runtime.tap(METER_ID)
            pending: dict[str, int] = {}
            while station.runtime is runtime and station.alive:
                try:
                    reading: Reading = await asyncio.wait_for(readings.get(), 1.0)
                except TimeoutError:
                    continue
                if reading.name == POWER_W:
                    self.progress.power_w = int(reading.value)  # type: ignore[arg-type]
                if reading.name not in (IMPORT_WH, EXPORT_WH):
                    continue
                pending[reading.name] = int(reading.value)  # type: ignore[arg-type]
                if len(pending) < 2:
                    continue
                import_wh, export_wh = pending.pop(IMPORT_WH), pending.pop(EXPORT_WH)
                if self._base is None:
                    self._base = (import_wh, export_wh)
                delivered = import_wh - self._base[0]
                self.progress.energy_wh = delivered
                self.progress.export_wh = export_wh - self._base[1]
                paid, paid_wh = self.progress.paid, self.progress.paid_wh
                self.samples.append(Sample(reading.ts_ns, self.progress.power_w, delivered,
                                           paid, paid_wh))
                self._update_paid()
                if not stopped and self.session_over(delivered):
                    stopped = True
                    asyncio.get_running_loop().create_task(self.charge_stop())
            while station.runtime is runtime:   # killed: wait for the restart
                await asyncio.sleep(0.05)

    def _update_paid(self) -> None:
        held = [s for agent in self.agents.values() for s in agent.sessions()]
        if held:
            best = max(held, key=lambda s: s.nonce)
            p = self.progress
            p.paid, p.paid_wh, p.nonce = best.t_ev, best.energy_wh, best.nonce

    async def _collect(self, verifier: Uplink, live: LiveVerifier) -> None:
        async for message in verifier.messages():
            self.captured.append(message.payload)
            live.add(message.payload)
            self.progress.envelopes = len(live.arrivals)

    @staticmethod
    async def _quiet(live: LiveVerifier, seconds: float) -> None:
        last = -1
        while last != live.messages:
            last = live.messages
            await asyncio.sleep(seconds)

    async def _show_progress(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self._update_paid()
            p = self.progress
            target = f" of {self.settings.energy_wh / 1000:.2f}" if self.settings.energy_wh \
                else ""
            self.say(f"charging: {p.energy_wh / 1000:6.2f} kWh{target}, {p.power_w / 1000:5.1f} "
                     f"kW, paid {_money(p.paid)} (nonce {p.nonce}), {p.envelopes} envelopes "
                     f"verified")

    async def _receipt(self, node: Any, ev: DeviceKeys, cs: DeviceKeys) -> Receipt:
        final = self.final
        assert final is not None
        vehicle = self.agents["vehicle"].sessions()
        latest = max([final.nonce] + [s.nonce for s in vehicle])
        tx_hash = _job_tx(self.agents)
        block = None
        if tx_hash:
            receipt = await asyncio.to_thread(node.eth.get_transaction_receipt, tx_hash)
            block = int(receipt["blockNumber"])
        return Receipt(
            channel_id=final.channel_id, vehicle=ev.device_id, station=cs.device_id,
            energy_wh=self.progress.energy_wh, paid_wh=final.energy_wh,
            price_per_kwh=self.settings.price_per_kwh, payments=final.nonce,
            paid=final.t_ev, refunded=final.t_cs, deposit=self.settings.deposit_ev,
            token="EVT", decimals=TOKEN_DECIMALS, latest_nonce=latest,
            settled_nonce=_settled_nonce(self.agents), close=_close_kind(self.agents),
            settled=all(s.settlement == "settled" for s in [final, *vehicle]),
            settlement_tx=tx_hash or None, settlement_block=block,
            chain="in-process (eth-tester)", export_wh=self.progress.export_wh,
            export_price_per_kwh=self.settings.export_price_per_kwh)

    def _verified(self, live: LiveVerifier
                  ) -> tuple[tuple[RecordedReading, ...], VerificationSummary]:
        report: VerifyReport = live.report()
        readings: list[RecordedReading] = []
        self.opened = []
        for data in dict.fromkeys(self.captured):
            with contextlib.suppress(EdgeAgentError):
                opened = open_envelope(data, live.registry.lookup)
                self.opened.append(opened)
                readings.extend(recorded_readings(opened))
        (self.out / "capture.cbor").write_bytes(b"".join(dict.fromkeys(self.captured)))
        self.verify_report = report
        return tuple(readings), VerificationSummary.from_verify_report(report)


def _jobs(agents: dict[str, Agent]) -> list[Any]:
    out = []
    for agent in agents.values():
        runtime = agent.runtime
        if runtime is None or runtime.channel is None or runtime.channel.role is None:
            continue
        for view in runtime.channel.role.views():
            if view.job is not None:
                out.append(view.job)
    return out


def _job_tx(agents: dict[str, Agent]) -> str:
    """The transaction that settled the channel: the last one a job sent."""
    jobs = [j for j in _jobs(agents) if j.tx and j.state == "settled"
            and j.close not in ("by-peer",)]
    return "0x" + jobs[-1].tx.hex() if jobs else ""


def _close_kind(agents: dict[str, Agent]) -> str:
    kinds = {j.close for j in _jobs(agents)}
    for kind in ("challenged", "unilateral", "cooperative"):
        if kind in kinds:
            return kind
    return "open"


def _settled_nonce(agents: dict[str, Agent]) -> int | None:
    nonces = [j.nonce for j in _jobs(agents) if j.state == "settled"]
    return max(nonces) if nonces else None


class _Done(Exception):
    pass


def _money(amount: int) -> str:
    return f"{amount / 10**TOKEN_DECIMALS:,.6f} EVT"
