"""The rig: a whole charging session on one machine, for ``edge-agent demo`` and HIL runs.

What runs (all real protocols on loopback, nothing mocked)::

    broker      mosquitto on a free port (an embedded amqtt broker if mosquitto is absent)
    chain       in-process eth-tester + py-evm: test token + channel contract deployed
    station     a Runtime (role station) polling a simulated SDM630 over Modbus TCP
                (hil-meter), plus the station side of the payment channel fed by that meter
    vehicle     a Runtime (role vehicle) polling a simulated ECU over a virtual CAN bus
                (hil-ecu), plus the vehicle side of the channel, which funds the channel on
                chain and cross-checks the metered energy against its own estimate
    verifier    a subscriber that verifies every envelope both devices publish

The session ends when the meter has delivered ``energy_wh``; the station closes the channel,
the final co-signed state is settled on chain (cooperative close), the agents stop, and the
result is a :class:`hil.report.SessionRecord` with the receipt and the verification.

Hooks for the HIL runner (hil/scenarios/runner.py subclasses :class:`Rig`): ``session_over`` decides
when the station stops metering, ``timeline`` runs beside the agents (fault injection),
``settle`` puts the final state on chain; ``rig.broker``, ``rig.chain`` and ``rig.agents``
(each an :class:`Agent` that can be killed and restarted from its state directory) are
reachable while it runs. With ``charging = False`` only the vehicle agent runs (a drive).

Time: the meter runs ``time_scale`` times faster than the wall clock (11 kW for 20 minutes of
session in 10 seconds at 120x), so energy, power and payments stay consistent while the
demo finishes quickly.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

from agent.channel.messages import Tariff, sign_tariff
from agent.channel.protocol import Closed
from agent.channel.records import CosignedRecord, OpenParams, Party
from agent.channel.session import open_channel, run_station, run_vehicle
from agent.channel.station import StationChannel
from agent.channel.store import ChannelStore
from agent.channel.vehicle import VehicleChannel
from agent.config import Config, parse_config
from agent.envelope import OpenedEnvelope, open_envelope
from agent.errors import ConfigError, EdgeAgentError
from agent.fleet_keys import FleetRegistry
from agent.keys import DeviceKeys, KeyStore
from agent.live_verify import LiveVerifier, mqtt_config
from agent.options import Table
from agent.readings import Reading
from agent.runtime import Runtime, SourceRunner, build_sources
from agent.settlement.chain import InProcessChain
from agent.settlement.client import SettlementClient
from agent.settlement.funding import check_channel_funded
from agent.settlement.model import TxResult
from agent.status import ChannelStatus
from agent.uplink import MqttConfig, Uplink
from agent.verify import VerifyReport
from firmware_adapters.base import Source
from hil.broker import EmbeddedBroker, Mosquitto, start_broker
from hil.report import (
    Receipt,
    RecordedReading,
    Sample,
    SessionRecord,
    VerificationSummary,
    recorded_readings,
)
from hil.sim.ecu_source import HIL_PIDS

IMPORT_WH, EXPORT_WH, POWER_W = "1-0:1.8.0", "1-0:2.8.0", "1-0:16.7.0"
METER_ID, ECU_ID = "meter0", "ecu0"     # the source ids HIL scenarios name
TOKEN_DECIMALS = 6


@dataclass(frozen=True, slots=True)
class RigSettings:
    energy_wh: int = 3_000                 # session ends when the meter has delivered this
    power_w: int = 11_000                  # charging power of the simulated station
    time_scale: float = 120.0              # simulated seconds per wall second
    price_per_kwh: int = 300_000           # 0.30 token per kWh (token has 6 decimals)
    export_price_per_kwh: int = 0
    deposit_ev: int = 20_000_000           # 20 tokens
    deposit_cs: int = 0
    pay_step_wh: int = 10
    credit_window_wh: int = 100
    dispute_window_s: int = 3600
    estimate_ratio_ppm: int = 995_000      # the car's own estimate: 0.5 % below the meter
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


@dataclass(frozen=True, slots=True)
class Settlement:
    """How the channel ended on chain: what the receipt reports."""

    close: str                             # cooperative | unilateral | challenged
    settled_nonce: int
    tx: TxResult


@dataclass
class Progress:
    """What the demo prints while charging."""

    energy_wh: int = 0
    power_w: int = 0
    paid: int = 0
    paid_wh: int = 0
    nonce: int = 0
    envelopes: int = 0


Session = Callable[["Agent", Runtime], Awaitable[Closed]]


@dataclass
class Agent:
    """One device's agent in the rig: a Runtime plus its side of the payment channel.

    ``kill()`` ends it the way a power cut would, as far as one process can: its tasks are
    cancelled mid-flight, with no flush of what the batcher holds and no channel close.
    ``start()`` again builds a new Runtime from the same state directory (the spool restores
    seq and chain head; the channel store restores the channel). The sources are kept: they
    are the hardware (meter, ECU), which a crash of the agent does not reset.
    """

    role: str                              # "vehicle" | "station"
    keys: DeviceKeys
    config: Config
    peer: str = ""
    session: Session | None = None         # the channel side; None: telemetry only
    make_channel: Callable[[ChannelStore], StationChannel | VehicleChannel] | None = None
    runtime: Runtime | None = None
    channel: StationChannel | VehicleChannel | None = None
    store: ChannelStore | None = None
    closed: Closed | None = None
    starts: int = 0

    def __post_init__(self) -> None:
        self.sources: list[SourceRunner] = build_sources(self.config)
        self._task: asyncio.Task[None] | None = None

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self, tg: asyncio.TaskGroup, stop: asyncio.Event) -> Runtime:
        sources = [SourceRunner(r.source, r.kind) for r in self.sources]  # fresh taps
        runtime = Runtime(self.config, self.keys, sources=sources)
        if self.session is not None and self.make_channel is not None:
            self.store = ChannelStore(Path(self.config.device.state_dir) / "channel.log")
            self.channel = self.make_channel(self.store)
            session = self.session

            async def channel_task(rt: Runtime) -> None:
                self.closed = await session(self, rt)

            runtime.add_task(f"channel[{self.channel.channel_id.hex()[:12]}]", channel_task)
            runtime.set_channel_status(_channel_status(self.channel, self.peer))
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
        if self.store is not None:
            self.store.close()

    def source(self, source_id: str) -> Source:
        for runner in self.sources:
            if runner.source.id == source_id:
                return runner.source
        raise ConfigError(key="sources.id", expected="a configured source", found=source_id)


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
        self.balances: dict[str, int] = {}
        self._base_import: int | None = None
        self._estimate_base: int | None = None
        self.timed_out = False

    # -- hooks for the HIL runner (hil/scenarios/runner.py); the demo uses these defaults ----------
    def session_over(self, delivered_wh: int) -> bool:
        """The station stops metering (and closes the channel) once this holds."""
        return delivered_wh >= self.settings.energy_wh

    async def timeline(self, tg: asyncio.TaskGroup, stop: asyncio.Event) -> None:
        """Runs beside the agents while the session lasts (the runner injects faults here).
        Without a channel the session ends when this returns."""

    async def settle(self, closed: Closed, ev_client: SettlementClient,
                     cs_client: SettlementClient) -> Settlement:
        """Put the final co-signed state on chain: a cooperative close, settled at once."""
        settled = await asyncio.to_thread(
            cs_client.cooperative_close, closed.state, closed.sig_ev, closed.sig_cs)
        self.say(f"settled on chain: cooperative close, tx 0x{settled.tx_hash.hex()}, gas "
                 f"{settled.gas_used:,}, block {settled.block_number}")
        return Settlement("cooperative", closed.state.nonce, settled)

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

    def _config(self, role: str, keys: DeviceKeys, broker_url: str, source: dict) -> Table:
        s = self.settings
        data = {
            "device": {"id": keys.device_id, "role": role, "state_dir": str(self.out / role)},
            "batch": {"max_readings": s.batch_max_readings, "max_age_ms": s.batch_max_age_ms},
            "sources": [source],
            "mqtt": {"url": broker_url, "backoff_initial_s": 0.1, "backoff_max_s": 2.0},
            "status": {"path": str(self.out / role / "status.json"), "interval_s": 1.0},
        }
        return Table(data, f"<{role} demo config>")

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
                self.say(f"chain: in-process eth-tester (chain id {chain.chain_id}), token "
                         f"0x{chain.token.hex()}, channel contract 0x{chain.contract.hex()}")
                for keys, tokens in ((vehicle_keys, self.settings.deposit_ev * 2),
                                     (station_keys, self.settings.deposit_cs)):
                    await asyncio.to_thread(chain.fund, keys.settlement.address, tokens=tokens)
                record = await self._session(broker.url, chain, vehicle_keys, station_keys,
                                             registry)
            else:
                record = await self._drive(broker.url, vehicle_keys, registry)
        finally:
            await asyncio.to_thread(broker.stop)
        return SessionRecord(title=self.record_title(),
                             started_ns=started, ended_ns=time.time_ns(),
                             samples=tuple(self.samples), readings=record[0],
                             receipt=record[1], verification=record[2])

    def _vehicle_agent(self, ev: DeviceKeys, broker_url: str) -> Agent:
        s = self.settings
        source: dict[str, object] = {"id": ECU_ID, "kind": "hil-ecu",
                                     "time_scale": s.ecu_time_scale,
                                     "probe_interval_s": s.ecu_probe_interval_s}
        if s.ecu_poll_scale != 1.0:  # poll as often in simulated time as a real car would
            source["pids"] = {pid: period / s.ecu_poll_scale for pid, period in HIL_PIDS.items()}
        return Agent("vehicle", ev, parse_config(self._config("vehicle", ev, broker_url, source)))

    async def _drive(self, broker_url: str, ev: DeviceKeys, registry: FleetRegistry):
        """No charging: the vehicle agent alone, telemetry only, until ``timeline`` ends."""
        vehicle = self._vehicle_agent(ev, broker_url)
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

    async def _session(self, broker_url: str, chain: InProcessChain, ev: DeviceKeys,
                       cs: DeviceKeys, registry: FleetRegistry):
        s = self.settings
        salt = os.urandom(32)
        tariff = Tariff(s.price_per_kwh, s.export_price_per_kwh)
        ev_party = Party(ev.identity.public, ev.settlement.address)
        cs_party = Party(cs.identity.public, cs.settlement.address)
        common = dict(chain_id=chain.chain_id, contract=chain.contract, salt=salt)
        ev_client = SettlementClient(chain.w3, chain.contract, ev.settlement)
        cs_client = SettlementClient(chain.w3, chain.contract, cs.settlement)
        self.clients = {"vehicle": ev_client, "station": cs_client}

        def station_channel(store: ChannelStore) -> StationChannel:
            return open_channel(  # type: ignore[return-value]
                StationChannel, store, identity=cs.identity, settlement=cs.settlement,
                vehicle=ev_party, tariff=tariff, tariff_sig=sign_tariff(tariff, cs.identity),
                deposit_ev=s.deposit_ev, deposit_cs=s.deposit_cs,
                dispute_window_s=s.dispute_window_s, credit_window_wh=s.credit_window_wh,
                pay_step_wh=s.pay_step_wh, **common)

        def vehicle_channel(store: ChannelStore) -> VehicleChannel:
            return open_channel(  # type: ignore[return-value]
                VehicleChannel, store, identity=ev.identity, settlement=ev.settlement,
                station=cs_party, max_price_per_kwh=s.price_per_kwh,
                max_deposit_ev=s.deposit_ev, **common,
                # the rig's own window (stale-state-close runs it in seconds)
                min_dispute_window_s=min(s.dispute_window_s, 3600))

        async def fund(params: OpenParams) -> bytes:
            opened = await asyncio.to_thread(
                ev_client.open_channel, ev_party.address, cs_party.address, params.salt,
                params.dispute_window_s, params.deposit_ev)
            self.say(f"vehicle funded the channel on chain: deposit "
                     f"{_money(params.deposit_ev)}, tx 0x{opened.tx.tx_hash.hex()[:16]}...")
            return opened.tx.tx_hash

        station = Agent("station", cs, parse_config(self._config("station", cs, broker_url, {
            "id": METER_ID, "kind": "hil-meter", "map": "sdm630", "power_w": s.power_w,
            "interval_s": s.meter_interval_s, "timeout_s": s.meter_timeout_s,
            "time_scale": s.time_scale})), peer=ev.device_id, make_channel=station_channel)
        meter_source = station.source(METER_ID)

        async def check_funding(params: OpenParams, reference: bytes) -> None:
            # the station reads the channel's record on the contract before it trusts FUNDED
            await asyncio.to_thread(check_channel_funded, cs_client, params)
            self.say("station checked the funding on chain: channel open, deposit in place")

        async def station_session(agent: Agent, runtime: Runtime) -> Closed:
            assert agent.channel is not None and agent.store is not None
            return await run_station(runtime.uplink, agent.channel, agent.store,  # type: ignore[arg-type]
                                     self._meter_until_over(runtime.tap(METER_ID)),
                                     check_funding=check_funding)

        async def vehicle_session(agent: Agent, runtime: Runtime) -> Closed:
            assert agent.channel is not None and agent.store is not None
            return await run_vehicle(runtime.uplink, agent.channel, agent.store,  # type: ignore[arg-type]
                                     estimate=self._vehicle_estimate(meter_source), fund=fund)

        station.session = station_session
        vehicle = self._vehicle_agent(ev, broker_url)
        vehicle.peer, vehicle.session, vehicle.make_channel = (cs.device_id, vehicle_session,
                                                               vehicle_channel)
        self.agents = {"vehicle": vehicle, "station": station}

        live = LiveVerifier(registry)
        stop = asyncio.Event()
        try:
            async with self._verifier(broker_url) as verifier:
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(self._collect(verifier, live), name="verifier")
                    station.start(tg, stop)
                    vehicle.start(tg, stop)
                    watch = tg.create_task(self._show_progress(), name="progress")
                    timeline = tg.create_task(self.timeline(tg, stop), name="timeline")
                    if not await self._wait(lambda: station.closed is not None
                                            and vehicle.closed is not None):
                        watch.cancel()
                        timeline.cancel()
                        await self._finish(stop, live)
                    watch.cancel()
                    closed = station.closed
                    settlement = await self.settle(closed, ev_client, cs_client)
                    await timeline  # a fault still in force (a restart) finishes first
                    await self._finish(stop, live)  # both flush their spools and stop
        except* _Done:
            pass
        if self.timed_out:  # what was verified, no receipt: the run failed
            readings, summary = self._verified(live)
            return readings, None, summary
        self.balances = {name: await asyncio.to_thread(ev_client.balance, addr)
                         for name, addr in (("vehicle", ev.settlement.address),
                                            ("station", cs.settlement.address))}
        readings, summary = self._verified(live)
        return readings, self._receipt(closed, settlement, chain, ev, cs), summary

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
        """Until ``done()``. After ``timeout_s``: TimeoutError, or with
        ``partial_on_timeout`` (the HIL runner) False, and the rig reports what it has."""
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
    async def _meter_until_over(self, readings: asyncio.Queue[Reading]
                                ) -> AsyncIterator[tuple[int, int]]:
        """Cumulative (import, export) Wh from the station's meter source, until
        ``session_over``; records a sample per poll for the report. The session's base
        reading survives a restart of the station agent."""
        pending: dict[str, int] = {}
        while True:
            reading = await readings.get()
            if reading.name == POWER_W:
                self.progress.power_w = int(reading.value)
            if reading.name not in (IMPORT_WH, EXPORT_WH):
                continue
            pending[reading.name] = int(reading.value)
            if len(pending) < 2:
                continue
            import_wh, export_wh = pending[IMPORT_WH], pending[EXPORT_WH]
            pending.clear()
            if self._base_import is None:
                self._base_import = import_wh
            delivered = import_wh - self._base_import
            self.progress.energy_wh = delivered
            cosigned = self.latest_cosigned()  # paid so far, at this reading (not per second)
            paid, paid_wh = (cosigned.state.t_ev, cosigned.state.wh) if cosigned else (0, 0)
            self.samples.append(Sample(reading.ts_ns, self.progress.power_w, delivered,
                                       paid, paid_wh))
            yield import_wh, export_wh
            if self.session_over(delivered):
                return

    async def _vehicle_estimate(self, meter_source: Source) -> AsyncIterator[int]:
        """The car's own view of energy received (its BMS), a little below the meter. The
        BMS is hardware: its count since the session began survives a restart of the agent."""
        simulator = None
        while simulator is None:
            simulator = getattr(meter_source, "simulator", None)
            await asyncio.sleep(0.05)
        if self._estimate_base is None:
            self._estimate_base = simulator.energy_wh()[0]
        while True:
            await asyncio.sleep(0.2)
            delivered = simulator.energy_wh()[0] - self._estimate_base
            yield delivered * self.settings.estimate_ratio_ppm // 1_000_000

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

    def latest_cosigned(self) -> CosignedRecord | None:
        """The highest co-signed state either party holds."""
        held = [a.channel.cosigned for a in self.agents.values()
                if a.channel is not None and a.channel.cosigned is not None]
        return max(held, key=lambda c: c.state.nonce) if held else None

    async def _show_progress(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            p = self.progress
            cosigned = self.latest_cosigned()
            if cosigned is not None:
                p.paid, p.paid_wh, p.nonce = (cosigned.state.t_ev, cosigned.state.wh,
                                              cosigned.state.nonce)
            if self.settings.energy_wh:
                target = f" of {self.settings.energy_wh / 1000:.2f}"
            else:
                target = ""
            self.say(f"charging: {p.energy_wh / 1000:6.2f} kWh{target}, {p.power_w / 1000:5.1f} "
                     f"kW, paid {_money(p.paid)} (nonce {p.nonce}), {p.envelopes} envelopes "
                     f"verified")

    def _receipt(self, closed: Closed, settlement: Settlement, chain: InProcessChain,
                 ev: DeviceKeys, cs: DeviceKeys) -> Receipt:
        state = closed.state
        latest = self.latest_cosigned()
        tx = settlement.tx
        return Receipt(
            channel_id=state.channel_id.hex(), vehicle=ev.device_id, station=cs.device_id,
            energy_wh=self.progress.energy_wh, paid_wh=state.wh,
            price_per_kwh=self.settings.price_per_kwh, payments=state.nonce,
            paid=state.t_ev, refunded=state.t_cs, deposit=self.settings.deposit_ev,
            token="EVT", decimals=TOKEN_DECIMALS,
            latest_nonce=max(state.nonce, latest.state.nonce if latest else 0),
            settled_nonce=settlement.settled_nonce, close=settlement.close, settled=True,
            settlement_tx="0x" + tx.tx_hash.hex(), settlement_block=tx.block_number,
            chain="in-process (eth-tester)")

    def _verified(self, live: LiveVerifier
                  ) -> tuple[tuple[RecordedReading, ...], VerificationSummary]:
        report: VerifyReport = live.report()
        readings: list[RecordedReading] = []
        self.opened: list[OpenedEnvelope] = []
        for data in dict.fromkeys(self.captured):
            with contextlib.suppress(EdgeAgentError):
                opened = open_envelope(data, live.registry.lookup)
                self.opened.append(opened)
                readings.extend(recorded_readings(opened))
        (self.out / "capture.cbor").write_bytes(b"".join(dict.fromkeys(self.captured)))
        self.verify_report = report
        return tuple(readings), VerificationSummary.from_verify_report(report)


class _Done(Exception):
    pass


def _money(amount: int) -> str:
    return f"{amount / 10**TOKEN_DECIMALS:,.6f} EVT"


def _channel_status(channel, peer: str) -> Callable[[], tuple[ChannelStatus, ...]]:
    def snapshot() -> tuple[ChannelStatus, ...]:
        c = channel.cosigned
        state = c.state if c is not None else None
        return (ChannelStatus(
            channel_id=channel.channel_id.hex(), peer=peer, state=channel.phase.name.lower(),
            nonce=state.nonce if state else 0, energy_wh=state.wh if state else 0,
            t_ev=state.t_ev if state else 0, t_cs=state.t_cs if state else 0),)
    return snapshot
