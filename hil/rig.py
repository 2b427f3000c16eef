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
result is a :class:`agent.report.SessionRecord` with the receipt and the verification.

Time: the meter runs ``time_scale`` times faster than the wall clock (11 kW for 20 minutes of
session in 10 seconds at 120x), so energy, power and payments stay consistent while the
demo finishes quickly.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

from agent.channel.messages import Tariff, sign_tariff
from agent.channel.protocol import Closed, StationChannel, VehicleChannel
from agent.channel.records import OpenParams, Party
from agent.channel.session import open_channel, run_station, run_vehicle
from agent.channel.store import ChannelStore
from agent.config import Table, parse_config
from agent.keys import DeviceKeys, KeyStore
from agent.live_verify import LiveVerifier, mqtt_config
from agent.readings import Reading
from agent.registry import FleetRegistry
from agent.report import (
    Receipt,
    Sample,
    SessionRecord,
    VerificationSummary,
    recorded_readings,
)
from agent.runtime import Runtime
from agent.settlement.chain import InProcessChain
from agent.settlement.client import SettlementClient
from agent.status import ChannelStatus
from agent.uplink import Uplink
from agent.verify import VerifyReport
from hil.broker import start_broker

IMPORT_WH, EXPORT_WH, POWER_W = "1-0:1.8.0", "1-0:2.8.0", "1-0:16.7.0"
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


@dataclass
class Progress:
    """What the demo prints while charging."""

    energy_wh: int = 0
    power_w: int = 0
    paid: int = 0
    paid_wh: int = 0
    nonce: int = 0
    envelopes: int = 0


@dataclass
class Rig:
    out: Path
    settings: RigSettings = field(default_factory=RigSettings)
    say: Callable[[str], None] = print

    def __post_init__(self) -> None:
        self.progress = Progress()
        self.samples: list[Sample] = []
        self.captured: list[bytes] = []

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
        try:
            self.say(f"broker: {type(broker).__name__.lower()} at {broker.url}")
            chain = await asyncio.to_thread(InProcessChain.start)
            self.say(f"chain: in-process eth-tester (chain id {chain.chain_id}), token "
                     f"0x{chain.token.hex()}, channel contract 0x{chain.contract.hex()}")
            for keys, tokens in ((vehicle_keys, self.settings.deposit_ev * 2),
                                 (station_keys, self.settings.deposit_cs)):
                await asyncio.to_thread(chain.fund, keys.settlement.address, tokens=tokens)
            record = await self._session(broker.url, chain, vehicle_keys, station_keys,
                                         registry)
        finally:
            await asyncio.to_thread(broker.stop)
        return SessionRecord(title="ev-edge-agent demo: one charging session",
                             started_ns=started, ended_ns=time.time_ns(),
                             samples=tuple(self.samples), readings=record[0],
                             receipt=record[1], verification=record[2])

    async def _session(self, broker_url: str, chain: InProcessChain, ev: DeviceKeys,
                       cs: DeviceKeys, registry: FleetRegistry):
        s = self.settings
        station = Runtime(parse_config(self._config("station", cs, broker_url, {
            "id": "meter0", "kind": "hil-meter", "map": "sdm630", "power_w": s.power_w,
            "interval_s": 0.05, "time_scale": s.time_scale})), cs)
        vehicle = Runtime(parse_config(self._config("vehicle", ev, broker_url, {
            "id": "car0", "kind": "hil-ecu", "time_scale": 10.0})), ev)
        salt = os.urandom(32)
        tariff = Tariff(s.price_per_kwh, s.export_price_per_kwh)
        ev_party = Party(ev.identity.public, ev.settlement.address)
        cs_party = Party(cs.identity.public, cs.settlement.address)
        common = dict(chain_id=chain.chain_id, contract=chain.contract, salt=salt)
        cs_store = ChannelStore(self.out / "station" / "channel.log")
        ev_store = ChannelStore(self.out / "vehicle" / "channel.log")
        cs_channel = open_channel(
            StationChannel, cs_store, identity=cs.identity, settlement=cs.settlement,
            vehicle=ev_party, tariff=tariff, tariff_sig=sign_tariff(tariff, cs.identity),
            deposit_ev=s.deposit_ev, deposit_cs=s.deposit_cs,
            dispute_window_s=s.dispute_window_s, credit_window_wh=s.credit_window_wh,
            pay_step_wh=s.pay_step_wh, **common)
        ev_channel = open_channel(
            VehicleChannel, ev_store, identity=ev.identity, settlement=ev.settlement,
            station=cs_party, max_price_per_kwh=s.price_per_kwh, max_deposit_ev=s.deposit_ev,
            **common)
        ev_client = SettlementClient(chain.w3, chain.contract, ev.settlement)
        cs_client = SettlementClient(chain.w3, chain.contract, cs.settlement)
        meter_source = station.sources[0].source
        meter_readings = station.tap("meter0")
        results: dict[str, Closed] = {}

        async def fund(params: OpenParams) -> bytes:
            opened = await asyncio.to_thread(
                ev_client.open_channel, ev_party.address, cs_party.address, params.salt,
                params.dispute_window_s, params.deposit_ev)
            self.say(f"vehicle funded the channel on chain: deposit "
                     f"{_money(params.deposit_ev)}, tx 0x{opened.tx.tx_hash.hex()[:16]}...")
            return opened.tx.tx_hash

        async def station_channel(runtime: Runtime) -> None:
            results["cs"] = await run_station(runtime.uplink, cs_channel, cs_store,
                                              self._meter_until_target(meter_readings))

        async def vehicle_channel(runtime: Runtime) -> None:
            results["ev"] = await run_vehicle(runtime.uplink, ev_channel, ev_store,
                                              estimate=self._vehicle_estimate(meter_source),
                                              fund=fund)

        channel_name = f"channel[{cs_channel.channel_id.hex()[:12]}]"
        for runtime, channel, task, peer in (
                (station, cs_channel, station_channel, ev.device_id),
                (vehicle, ev_channel, vehicle_channel, cs.device_id)):
            runtime.add_task(channel_name, task)
            runtime.set_channel_status(_channel_status(channel, peer))

        live = LiveVerifier(registry)
        stop = asyncio.Event()
        try:
            async with Uplink(mqtt_config(broker_url, client_id="demo-verifier")) as verifier:
                for topic in ("evedge/v1/+/telemetry", "evedge/v1/+/event"):
                    await verifier.subscribe(topic)
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(self._collect(verifier, live), name="verifier")
                    tg.create_task(station.run(stop), name="station")
                    tg.create_task(vehicle.run(stop), name="vehicle")
                    watch = tg.create_task(self._show_progress(cs_channel), name="progress")
                    async with asyncio.timeout(s.timeout_s):
                        while "cs" not in results or "ev" not in results:
                            await asyncio.sleep(0.1)
                    watch.cancel()
                    closed = results["cs"]
                    settled = await asyncio.to_thread(
                        cs_client.cooperative_close, closed.state, closed.sig_ev, closed.sig_cs)
                    self.say(f"settled on chain: cooperative close, tx "
                             f"0x{settled.tx_hash.hex()}, gas {settled.gas_used:,}, block "
                             f"{settled.block_number}")
                    stop.set()  # both agents flush their spools and stop
                    while station.state != "stopped" or vehicle.state != "stopped":
                        await asyncio.sleep(0.1)
                    await self._quiet(live, 1.0)
                    raise _Done
        except* _Done:
            pass
        balances = {name: await asyncio.to_thread(ev_client.balance, addr)
                    for name, addr in (("vehicle", ev.settlement.address),
                                       ("station", cs.settlement.address))}
        return self._results(closed, settled, chain, live, balances, ev, cs, cs_channel)

    # -- the pieces -----------------------------------------------------------------------
    async def _meter_until_target(self, readings: asyncio.Queue[Reading]
                                  ) -> AsyncIterator[tuple[int, int]]:
        """Cumulative (import, export) Wh from the station's meter source, until the session
        has delivered ``energy_wh``; records a sample per poll for the report."""
        base = None
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
            base = base or import_wh
            delivered = import_wh - base
            self.progress.energy_wh = delivered
            self.samples.append(Sample(reading.ts_ns, self.progress.power_w, delivered,
                                       self.progress.paid, self.progress.paid_wh))
            yield import_wh, export_wh
            if delivered >= self.settings.energy_wh:
                return

    async def _vehicle_estimate(self, meter_source) -> AsyncIterator[int]:
        """The car's own view of energy received (its BMS), a little below the meter."""
        simulator = None
        while simulator is None:
            simulator = getattr(meter_source, "simulator", None)
            await asyncio.sleep(0.05)
        base = simulator.energy_wh()[0]
        while True:
            await asyncio.sleep(0.2)
            delivered = simulator.energy_wh()[0] - base
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

    async def _show_progress(self, channel: StationChannel) -> None:
        while True:
            await asyncio.sleep(1.0)
            p = self.progress
            cosigned = channel.cosigned
            if cosigned is not None:
                p.paid, p.paid_wh, p.nonce = (cosigned.state.t_ev, cosigned.state.wh,
                                              cosigned.state.nonce)
            self.say(f"charging: {p.energy_wh / 1000:6.2f} kWh of "
                     f"{self.settings.energy_wh / 1000:.2f}, {p.power_w / 1000:5.1f} kW, paid "
                     f"{_money(p.paid)} (nonce {p.nonce}), {p.envelopes} envelopes verified")

    def _results(self, closed: Closed, settled, chain: InProcessChain, live: LiveVerifier,
                 balances: dict[str, int], ev: DeviceKeys, cs: DeviceKeys,
                 channel: StationChannel):
        report: VerifyReport = live.report()
        state = closed.state
        receipt = Receipt(
            channel_id=state.channel_id.hex(), vehicle=ev.device_id, station=cs.device_id,
            energy_wh=self.progress.energy_wh, paid_wh=state.wh,
            price_per_kwh=self.settings.price_per_kwh, payments=state.nonce,
            paid=state.t_ev, refunded=state.t_cs, deposit=self.settings.deposit_ev,
            token="EVT", decimals=TOKEN_DECIMALS, latest_nonce=state.nonce,
            settled_nonce=state.nonce, close="cooperative", settled=True,
            settlement_tx="0x" + settled.tx_hash.hex(),
            settlement_block=settled.block_number, chain="in-process (eth-tester)")
        readings = []
        from agent.envelope import open_envelope

        for data in self.captured:
            with contextlib.suppress(Exception):
                readings.extend(recorded_readings(open_envelope(data, live.registry.lookup)))
        (self.out / "capture.cbor").write_bytes(b"".join(dict.fromkeys(self.captured)))
        self.balances = balances
        self.verify_report = report
        return tuple(readings), receipt, VerificationSummary.from_verify_report(report)


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
