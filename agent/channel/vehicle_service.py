"""The vehicle's side of charging sessions (DESIGN s5b): starting a session (the driver
through the control socket, the fleet through a signed command, or automatically at the
home station when the car's own data shows it plugged in), the audit with its own energy
count, the stop conditions, and settlement.

- Start: the station's retained OFFER for the connector is read
  (``evedge/v1/<station>/offer/<n>``) and checked: signed by the key it carries (and that
  key in the fleet registry under the station's id, when ``[channel] registry`` is set), for
  our chain and contract, its highest price within the limit (``max_price_per_kwh``, and the
  request's own), its deposit within ``max_deposit_ev``. Then a REQUEST with our keys and
  half of the salt goes to ``evedge/v1/<station>/request``; the station answers on
  ``evedge/v1/<vehicle>/answer`` (ACCEPT with its half and the channel id, or a signed
  REFUSAL), within ``answer_timeout_s``.
- Commands (``evedge/v1/<vehicle>/command``) are obeyed only when signed by one of
  ``operator_keys``, addressed to us, not older than ``request_ttl_s`` and not seen before
  (their ids are kept on disk): anything else is hostile input (counter, event, ignored).
- The session: its record is written before the channel is created; the vehicle funds the
  channel on chain (idempotent: a restart finds the deposit there), pays each METER that its
  own energy count ([channel.energy], agent/channel/energy.py) confirms, and ends on
  ``max-energy`` (the request's max_wh), ``driver-stop`` / ``fleet-stop``, the station's
  close (``station-close``: cable pulled, its policy), ``audit-mismatch`` (a METER above our
  count for longer than ``audit_grace_s``), ``closed-on-chain``, or ``close-timeout``.
- Settlement: agent/channel/jobs.py, from the final state or the latest co-signed one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from agent import dcbor
from agent.channel import offers
from agent.channel.context import HISTORY, Context, SessionView
from agent.channel.energy import EnergyCount
from agent.channel.jobs import settle_session, watch_open
from agent.channel.messages import key_id
from agent.channel.meter_proof import check_meter_proof
from agent.channel.mux import Incoming
from agent.channel.protocol import (
    Action,
    Closed,
    MeterAccepted,
    Paid,
    PaymentWithheld,
    Phase,
)
from agent.channel.records import MeterInfo, OpenParams, Party
from agent.channel.session import open_channel, run_vehicle
from agent.channel.sessions import SessionDir, SessionRecord, session_dirs, write_atomic
from agent.channel.settings import VehicleConfig
from agent.channel.state import derive_channel_id
from agent.channel.store import ChannelStore
from agent.channel.vehicle import VehicleChannel
from agent.errors import ChannelError, EdgeAgentError, RevokedKey, SettlementError, UnknownKey
from agent.readings import Reading
from agent.topics import ROOT, answer_topic, command_topic, offer_topic, request_topic

log = logging.getLogger("edge_agent.channel.vehicle")
ALL_OFFERS = f"{ROOT}/+/offer/+"
COMMANDS_FILE = "commands.cbor"
FUND_ATTEMPTS = 3
AUTO_ATTEMPTS = 3
ENERGY_SAVE_S = 1.0
FUNDING_WAIT_S = 60.0   # for the station's deposit on the ledger (V2G)


class Refused(EdgeAgentError):
    """A session that did not start: the station's signed refusal, or our own check."""


@dataclass
class VehicleSession:
    view: SessionView
    dir: SessionDir
    channel: VehicleChannel
    store: ChannelStore
    energy: EnergyCount | None
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    estimate_changed: asyncio.Event = field(default_factory=asyncio.Event)
    audit_timer: asyncio.TimerHandle | None = None
    energy_saved: float = 0.0

    def end(self, reason: str) -> None:
        if not self.view.end_reason:
            self.view.end_reason = reason
        self.stop.set()


class VehicleService:
    def __init__(self, ctx: Context, config: VehicleConfig) -> None:
        self.ctx, self.config = ctx, config
        self.offers: dict[tuple[str, int], tuple[offers.Offer, bytes]] = {}
        self._offer_seen = asyncio.Event()
        self._pending: dict[bytes, tuple[offers.Offer, asyncio.Future[offers.Message]]] = {}
        self.session: VehicleSession | None = None
        self.history: deque[SessionView] = deque(maxlen=HISTORY)
        self.plugged: bool | None = None
        self._starting = False
        self._tg: asyncio.TaskGroup | None = None
        self._commands_path = ctx.state_dir / COMMANDS_FILE
        self._commands_seen = self._load_commands()
        self._operators = {key_id(k): k for k in config.operator_keys}

    def views(self) -> list[SessionView]:
        now = [self.session.view] if self.session is not None else []
        return [*self.history] + now

    # -- the service ------------------------------------------------------------------
    async def run(self) -> None:
        energy = self.config.energy
        if energy is not None:
            self.ctx.hub.listen(energy.source, self._on_reading)
        else:
            log.warning("no [channel.energy]: the station's METERs are paid without an audit")
        if self.config.plugged_source is not None:
            self.ctx.hub.listen(self.config.plugged_source, self._on_plug)
        mux = self.ctx.mux
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                answers = await mux.subscribe(answer_topic(self.ctx.device_id))
                commands = await mux.subscribe(command_topic(self.ctx.device_id))
                all_offers = mux.route(ALL_OFFERS)
                if self.config.home_station is not None:
                    await mux.uplink.subscribe(offer_topic(self.config.home_station, "+"))
                tg.create_task(self._read(answers, self._on_answer), name="channel.answers")
                tg.create_task(self._read(commands, self._on_command), name="channel.commands")
                tg.create_task(self._read(all_offers, self._on_offer), name="channel.offers")
                for directory in session_dirs(self.ctx.state_dir):
                    self._resume(directory, tg)
                self.ctx.ready.set()
                await asyncio.Event().wait()
        finally:
            if self.session is not None:
                self._save_energy(self.session, force=True)

    @staticmethod
    async def _read(queue: asyncio.Queue[Incoming],
                    handle: Callable[[bytes], Awaitable[None]]) -> None:
        while True:
            message = await queue.get()
            await handle(message.payload)

    # -- what the driver, the fleet and the plug ask for ----------------------------------
    async def start(self, station: str, connector: int, *, max_wh: int | None = None,
                    max_price_per_kwh: int | None = None, origin: str = "driver"
                    ) -> dict[str, object]:
        """Ask ``station`` for a session at ``connector``; the answer as a dict (``ok``,
        ``channel`` or ``reason``). Refusals are events (session-refused)."""
        if self.session is not None or self._starting:
            return {"ok": False, "reason": "session-active",
                    "detail": "stop the running session first"}
        self._starting = True
        try:
            channel_id = await self._start(station, connector, max_wh, max_price_per_kwh,
                                           origin)
            return {"ok": True, "channel": channel_id.hex(), "station": station,
                    "connector": connector}
        except Refused as exc:
            await self.ctx.event("session-refused", f"{station} connector {connector}: "
                                 f"{exc.reason}: {exc}", station=station, connector=connector,
                                 reason=exc.reason, origin=origin)
            return {"ok": False, "reason": exc.reason, "detail": str(exc)}
        finally:
            self._starting = False

    def stop(self, reason: str = "driver-stop") -> dict[str, object]:
        session = self.session
        if session is None:
            return {"ok": False, "reason": "no-session", "detail": "no session is running"}
        session.end(reason)
        return {"ok": True, "channel": session.channel.channel_id.hex(), "reason": reason}

    async def _start(self, station: str, connector: int, max_wh: int | None,
                     max_price: int | None, origin: str) -> bytes:
        limit = min(self.config.max_price_per_kwh, max_price or self.config.max_price_per_kwh)
        offer, offer_bytes = await self._offer(station, connector)
        self._check_offer(offer, limit)
        request = offers.Request(os.urandom(offers.ID_BYTES), station, connector,
                                 self.ctx.device_id, self.ctx.keys.identity.public,
                                 self.ctx.keys.settlement.address,
                                 os.urandom(offers.ID_BYTES), max_wh, limit, int(time.time()))
        answer: asyncio.Future[offers.Message] = asyncio.get_running_loop().create_future()
        self._pending[request.request_id] = (offer, answer)
        try:
            await self.ctx.mux.uplink.publish(request_topic(station),
                                              offers.encode(request, self.ctx.keys.identity))
            try:
                async with asyncio.timeout(self.config.answer_timeout_s):  # gh-86296
                    reply = await answer
            except TimeoutError:
                raise Refused(f"no answer within {self.config.answer_timeout_s:g} s",
                              reason="no-answer") from None
        finally:
            self._pending.pop(request.request_id, None)
        if isinstance(reply, offers.Refusal):
            raise Refused(reply.detail or offers.REFUSALS[reply.reason], reason=reply.reason)
        assert isinstance(reply, offers.Accept)
        salt = offers.channel_salt(request.salt_half, reply.salt_half)
        channel_id = derive_channel_id(offer.chain_id, offer.contract,
                                       self.ctx.keys.settlement.address, offer.address, salt)
        if channel_id != reply.channel_id:
            await self.ctx.hostile("answer", "wrong-channel-id", station)
            raise Refused("the station's channel id does not derive from the salt",
                          reason="bad-answer")
        record = SessionRecord("vehicle", channel_id, request.request_id, station,
                               self.ctx.device_id, connector, offer.identity, offer.address,
                               salt, offer_bytes, time.time_ns(), max_wh, limit)
        directory = SessionDir(self.ctx.state_dir, channel_id)
        directory.create(record)
        session = self._session(directory, record)
        await self.ctx.event("session-started", f"session at {station} connector {connector}, "
                             f"channel 0x{channel_id.hex()}", station=station,
                             connector=connector, channel=channel_id.hex(), origin=origin,
                             price_per_kwh=offer.tariff.price_per_kwh,
                             export_price_per_kwh=offer.tariff.export_price_per_kwh)
        assert self._tg is not None
        self._tg.create_task(self._run(session), name=f"channel[{channel_id.hex()[:12]}]")
        return channel_id

    async def _offer(self, station: str, connector: int) -> tuple[offers.Offer, bytes]:
        await self.ctx.mux.uplink.subscribe(offer_topic(station, "+"))
        deadline = time.monotonic() + self.config.answer_timeout_s
        while (station, connector) not in self.offers:
            self._offer_seen.clear()
            left = deadline - time.monotonic()
            try:
                async with asyncio.timeout(max(left, 0)):  # not wait_for: gh-86296
                    await self._offer_seen.wait()
            except TimeoutError:
                raise Refused(f"no offer from {station} for connector {connector}",
                              reason="no-offer") from None
        return self.offers[(station, connector)]

    def _check_offer(self, offer: offers.Offer, limit: int) -> None:
        client = self.ctx.client
        if (offer.chain_id, offer.contract) != (client.chain_id, client.address):
            raise Refused("the station settles on another chain or contract",
                          reason="wrong-chain")
        if offer.highest_price > limit:
            raise Refused(f"tariff up to {offer.highest_price} per kWh, limit {limit}",
                          reason="price-above-limit")
        if offer.deposit_ev > self.config.max_deposit_ev:
            raise Refused(f"deposit {offer.deposit_ev} above {self.config.max_deposit_ev}",
                          reason="deposit-too-large")
        if offer.state == "faulted":
            raise Refused("the station reports the connector faulted",
                          reason="connector-faulted")

    # -- incoming ------------------------------------------------------------------------
    async def _on_offer(self, payload: bytes) -> None:
        try:
            offer = offers.open_as(payload, offers.Offer)
        except EdgeAgentError as exc:
            await self.ctx.hostile("offer", exc.reason)
            return
        registry = self.ctx.registry
        if self.config.registry is not None:
            kid = key_id(offer.identity)
            try:
                if registry is None:
                    raise UnknownKey("no registry", kid=kid)
                registry.lookup(kid)
                if registry.device_of(kid) != offer.station:
                    raise UnknownKey("station key registered to another device", kid=kid)
            except (UnknownKey, RevokedKey) as exc:
                await self.ctx.hostile("offer", exc.reason, offer.station)
                return
        key = (offer.station, offer.connector)
        held = self.offers.get(key)
        if held is not None and held[0].issued_s > offer.issued_s:
            return  # an older copy (QoS 1 redelivery)
        self.offers[key] = (offer, bytes(payload))
        self._offer_seen.set()

    async def _on_answer(self, payload: bytes) -> None:
        try:
            signed = offers.decode(payload)
            message = signed.message
            if not isinstance(message, offers.Accept | offers.Refusal):
                raise ChannelError("not an answer", reason="unexpected-message")
            pending = self._pending.get(message.request_id)
            if pending is None:
                raise ChannelError("answer to no request of ours", reason="unknown-request")
            offer, future = pending
            offers.verify(signed, offer.identity)
            if message.vehicle != self.ctx.device_id or message.station != offer.station:
                raise ChannelError("answer names other parties", reason="wrong-vehicle")
        except EdgeAgentError as exc:
            await self.ctx.hostile("answer", exc.reason)
            return
        if not future.done():
            future.set_result(message)

    async def _on_command(self, payload: bytes) -> None:
        try:
            signed = offers.decode(payload)
            public = self._operators.get(signed.kid)
            if public is None:
                raise UnknownKey("not an operator key of this vehicle", kid=signed.kid,
                                 reason="unknown-operator")
            offers.verify(signed, public)
            command = signed.message
            if not isinstance(command, offers.Command):
                raise ChannelError("not a command", reason="unexpected-message")
            if command.vehicle != self.ctx.device_id:
                raise ChannelError("command for another vehicle", reason="wrong-vehicle")
            now = time.time()
            if abs(now - command.issued_s) > self.ctx.settings.request_ttl_s:
                raise ChannelError("command too old", reason="stale-command")
            self._commands_seen = {k: v for k, v in self._commands_seen.items() if v > now}
            if command.command_id in self._commands_seen:
                raise ChannelError("command seen before", reason="replayed-command")
            self._commands_seen[command.command_id] = now + self.ctx.settings.request_ttl_s
            self._save_commands()
        except EdgeAgentError as exc:
            await self.ctx.hostile("command", exc.reason)
            return
        await self.ctx.event("session-command", f"fleet command {command.action}",
                             action=command.action, command=command.command_id.hex())
        if command.action == "stop":
            self.stop("fleet-stop")
            return
        assert command.station is not None and command.connector is not None
        assert self._tg is not None
        self._tg.create_task(self.start(command.station, command.connector,
                                        max_wh=command.max_wh,
                                        max_price_per_kwh=command.max_price_per_kwh,
                                        origin="fleet"), name="channel.start")

    def _on_plug(self, reading: Reading) -> None:
        if reading.name != self.config.plugged_reading:
            return
        plugged = bool(reading.value) and reading.value not in ("0", b"\0")
        was, self.plugged = self.plugged, plugged
        if plugged and not was and self.config.home_station is not None and \
                self.session is None and self._tg is not None:
            self._tg.create_task(self._auto_start(), name="channel.auto-start")

    async def _auto_start(self) -> None:
        assert self.config.home_station is not None
        for attempt in range(AUTO_ATTEMPTS):
            if not self.plugged or self.session is not None:
                return
            result = await self.start(self.config.home_station, self.config.home_connector,
                                      origin="auto")
            if result["ok"] or result["reason"] not in ("not-plugged-in", "no-offer",
                                                        "no-answer"):
                return
            await asyncio.sleep(self.config.answer_timeout_s * (attempt + 1))

    def _on_reading(self, reading: Reading) -> None:
        session = self.session
        if session is None or session.energy is None:
            return
        value = reading.value
        if isinstance(value, int | float) and session.energy.observe(
                reading.name, float(value), reading.unit, reading.ts_ns):
            session.estimate_changed.set()
            self._save_energy(session)

    # -- sessions ----------------------------------------------------------------------
    def _session(self, directory: SessionDir, record: SessionRecord) -> VehicleSession:
        store = ChannelStore(directory.store_path)
        keys = self.ctx.keys
        offer = offers.open_as(record.offer, offers.Offer)
        channel = open_channel(
            VehicleChannel, store, identity=keys.identity, settlement=keys.settlement,
            station=Party(record.peer_identity, record.peer_address), chain_id=offer.chain_id,
            contract=offer.contract, salt=record.salt,
            max_price_per_kwh=record.max_price_per_kwh or self.config.max_price_per_kwh,
            max_deposit_ev=self.config.max_deposit_ev, tolerance_wh=self.config.tolerance_wh,
            tolerance_ppm=self.config.tolerance_ppm,
            min_dispute_window_s=self.config.min_dispute_window_s,
            clock_tolerance_s=self.config.clock_tolerance_s,
            export_credit_window_wh=self.config.export_credit_window_wh)
        assert isinstance(channel, VehicleChannel)
        if offer.meter_key:   # an Eichrecht meter: its own record must back the final METER
            channel.final_meter_check = self._meter_proof(offer.meter_key)
        energy = None
        if self.config.energy is not None:
            start, accumulated = directory.energy()
            energy = EnergyCount(self.config.energy, start, accumulated)
            channel.counts_energy = True
        session = VehicleSession(SessionView(record, channel, directory.job()), directory,
                                 channel, store, energy)
        self.session = session
        return session

    def _meter_proof(self, meter_key: str) -> Callable[[MeterInfo], object]:
        """The check of the final METER against the meter's own signed record, within the
        audit's tolerance: the station bills from the meter's Modbus energy register, which
        is coarser than the 1 Wh of its signed record (the WM3M4's is 10 Wh)."""
        c = self.config

        def check(meter: MeterInfo) -> object:
            tolerance = c.tolerance_wh + meter.import_wh * c.tolerance_ppm // 1_000_000
            return check_meter_proof(meter, meter_key, tolerance_wh=tolerance)
        return check

    def _resume(self, directory: SessionDir, tg: asyncio.TaskGroup) -> None:
        try:
            record = directory.session()
            job = directory.job()
            if job is not None and job.done:
                # still shown by `status` after a restart, as before it
                self.history.append(SessionView(record, job=job))
                return
            session = self._session(directory, record)
        except EdgeAgentError as exc:
            self.ctx.on_error("channel.resume", exc)
            return
        log.info("resuming session 0x%s", record.channel_id.hex()[:12])
        tg.create_task(self._run(session), name=f"channel[{record.channel_id.hex()[:12]}]")

    async def _run(self, session: VehicleSession) -> None:
        final: Closed | None = None
        channel = session.channel
        try:
            if session.view.job is None:
                final = await self._charge(session)
            elif channel.phase is Phase.CLOSED and channel.cosigned is not None:
                c = channel.cosigned
                final = Closed(c.state, c.sig_ev, c.sig_cs)
        finally:
            session.store.close()
            self._save_energy(session, force=True)
        await self._settle(session, final)

    async def _charge(self, session: VehicleSession) -> Closed | None:
        channel, record = session.channel, session.view.record
        loop = asyncio.get_running_loop()

        def audit_failed() -> None:
            session.end("audit-mismatch")

        def on_event(action: Action) -> None:
            if isinstance(action, MeterAccepted):
                if record.max_wh is not None and action.meter.import_wh >= record.max_wh:
                    session.end("max-energy")
                if action.meter.final:
                    session.view.end_reason = session.view.end_reason or "station-close"
            elif isinstance(action, PaymentWithheld) and session.audit_timer is None:
                session.audit_timer = loop.call_later(self.config.audit_grace_s, audit_failed)
            elif isinstance(action, Paid) and session.audit_timer is not None:
                session.audit_timer.cancel()
                session.audit_timer = None

        route = self.ctx.mux.transport()
        estimate = self._estimates(session) if session.energy is not None else None
        runner = asyncio.ensure_future(run_vehicle(
            route, channel, session.store,
            estimate=estimate, fund=self._fund, stop=session.stop,
            check_funding=self._check_funding,
            close_timeout_s=self.ctx.settings.close_timeout_s, on_event=on_event))
        assert self.ctx.blocks is not None   # the service made it (service.py)
        watch = asyncio.ensure_future(watch_open(
            self.ctx.client, channel.channel_id, self.ctx.blocks,
            lambda: channel.phase not in (Phase.IDLE, Phase.OPENING)))
        reason = ""
        closed: Closed | None = None
        try:
            await asyncio.wait({runner, watch}, return_when=asyncio.FIRST_COMPLETED)
            if watch.done() and not runner.done():
                session.end("closed-on-chain")
                runner.cancel()   # ours to cancel: the peer closed the channel on chain
            await asyncio.wait({runner})  # raises only if we are cancelled ourselves
            if not runner.cancelled():
                try:
                    closed = runner.result()
                except* ChannelError as group:
                    reason = getattr(group.exceptions[0], "reason", "channel-error")
                except* SettlementError:
                    reason = "funding-failed"
        finally:
            watch.cancel()
            runner.cancel()
            route.close()
            if session.audit_timer is not None:
                session.audit_timer.cancel()
        if reason:
            session.view.end_reason = session.view.end_reason or reason
        return closed

    async def _estimates(self, session: VehicleSession) -> AsyncIterator[int]:
        assert session.energy is not None
        while True:
            value = session.energy.delivered_wh
            if value is not None:
                yield value
            session.estimate_changed.clear()
            await session.estimate_changed.wait()

    async def _check_funding(self, params: OpenParams) -> None:
        """The ledger shows the channel as OPEN said, with the station's deposit in (V2G
        pay-outs come from it: the vehicle exports only then). The station deposits after it
        has checked ours, so this waits for it up to FUNDING_WAIT_S; SettlementError if it
        does not come or the channel differs from OPEN."""
        from agent.settlement.funding import check_channel_funded

        client = self.ctx.client
        deadline = time.monotonic() + FUNDING_WAIT_S
        while True:
            try:
                record = await asyncio.to_thread(check_channel_funded, client, params)
                if record.dep_cs >= params.deposit_cs:
                    return
                raise SettlementError("the station's deposit is not on the ledger",
                                      reason="no-station-deposit")
            except SettlementError as exc:
                if exc.reason == "funding-mismatch" or time.monotonic() > deadline:
                    raise
            await asyncio.sleep(self.ctx.settlement.poll_s)

    async def _fund(self, params: OpenParams) -> bytes:
        """Deposit on chain: once. A restart finds the channel open and goes on."""
        client = self.ctx.client
        for attempt in range(FUND_ATTEMPTS):
            view = await asyncio.to_thread(client.view, params.channel_id)
            if view.status.value == "open":
                return b""
            if view.status.value != "unknown":
                raise SettlementError(f"channel is {view.status.value} on chain",
                                      reason="channel-not-open")
            try:
                opened = await asyncio.to_thread(
                    client.open_channel, params.ev.address, params.cs.address, params.salt,
                    params.dispute_window_s, params.deposit_ev)
                return opened.tx.tx_hash
            except SettlementError as exc:
                if attempt == FUND_ATTEMPTS - 1:
                    raise
                log.warning("funding 0x%s: %s; trying again", params.channel_id.hex()[:12],
                            exc.reason)
                await asyncio.sleep(self.ctx.settlement.poll_s)
        raise AssertionError("unreachable")

    async def _settle(self, session: VehicleSession, final: Closed | None) -> None:
        channel, view = session.channel, session.view
        reason = view.end_reason or (view.job.end_reason if view.job else "") or "closed"
        view.end_reason = reason

        def ended() -> None:
            self.session = None if self.session is session else self.session
            self.history.append(view)

        await settle_session(self.ctx, session.dir, channel, view, final, reason,
                             submitter=self.ctx.settings.submit == "vehicle", ended=ended)

    # -- small state files ---------------------------------------------------------------
    def _save_energy(self, session: VehicleSession, force: bool = False) -> None:
        energy = session.energy
        now = time.monotonic()
        if energy is None or (not force and now - session.energy_saved < ENERGY_SAVE_S):
            return
        session.energy_saved = now
        with contextlib.suppress(EdgeAgentError):
            session.dir.save_energy(energy.start_value, energy.accumulated_wh)

    def _load_commands(self) -> dict[bytes, float]:
        try:
            item = dcbor.loads(Path(self._commands_path).read_bytes(), max_bytes=1 << 20)
        except (OSError, EdgeAgentError):
            return {}
        if not isinstance(item, dict):
            return {}
        return {k: float(v) for k, v in item.items()
                if isinstance(k, bytes) and isinstance(v, int | float)}

    def _save_commands(self) -> None:
        self.ctx.state_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(self._commands_path, dcbor.dumps(
            {k: int(v) for k, v in self._commands_seen.items()}))
