"""The station's side of charging sessions (DESIGN s5b): offers, requests, refusals, one
runner per session that drives the charger from the credit window, and settlement.

Per connector ([[channel.connectors]]): the charger adapter's IEC 61851 state (watched),
the meter source whose readings the channel meters, at most one session.

- Offers: one retained, signed OFFER per connector on ``evedge/v1/<station>/offer/<n>``,
  republished when the connector's state changes and every ``offer_interval_s``.
- Requests (``evedge/v1/<station>/request``): a request that does not decode, is not
  signed by the key it carries, names another station, is older than ``request_ttl_s`` or
  repeats a request id is hostile input (counter, rate-limited event, no answer). Any other
  is answered: ACCEPT, or a signed REFUSAL with a reason code (offers.REFUSALS), checked in
  this order: unknown connector, key revoked / vehicle not allowed (fleet registry unless
  ``policy = "open"``), price above the vehicle's limit, vehicle busy, connector occupied,
  connector faulted, not plugged in.
- A session: the record is written (fsync) before ACCEPT leaves; the channel runs
  (session.run_station) on the connector's meter readings; the charger is enabled only
  while the credit window allows delivery (and the vehicle's funding checked on chain), with
  the connector's current limit. It ends when the vehicle asks (``vehicle-stop``), the cable
  is pulled (state A: ``cable-pulled``), the charger faults or goes silent
  (``charger-fault``), delivery stays paused by the credit window for ``stall_timeout_s``
  (``credit-window``), funding does not come (``funding-timeout``) or does not check
  (``funding-not-verified``), or the channel is closed on chain (``closed-on-chain``). Then
  the charger is disabled and the settlement job (agent/channel/jobs.py) runs.
- Restart: every session not settled is resumed from its directory (agent/channel/sessions.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from agent.channel import offers
from agent.channel.context import (
    FAULT_STATES,
    HISTORY,
    PLUGGED_STATES,
    Charger,
    ChargerStatus,
    Context,
    SessionView,
    TransactionMeter,
    cp_state,
)
from agent.channel.jobs import settle_session, watch_open
from agent.channel.messages import key_id, sign_tariff
from agent.channel.protocol import Action, Closed, CloseRequested, Phase
from agent.channel.records import OpenParams, Party
from agent.channel.session import open_channel, run_station
from agent.channel.sessions import SessionDir, SessionRecord, session_dirs
from agent.channel.settings import ConnectorConfig, StationConfig
from agent.channel.state import derive_channel_id
from agent.channel.station import StationChannel
from agent.channel.store import ChannelStore
from agent.errors import (
    AdapterError,
    ChannelError,
    EdgeAgentError,
    RevokedKey,
    SettlementError,
    UnknownKey,
)
from agent.readings import Event, Reading
from agent.topics import answer_topic, offer_topic, request_topic

log = logging.getLogger("edge_agent.channel.station")
IMPORT_WH, EXPORT_WH = "1-0:1.8.0", "1-0:2.8.0"
METER_KEY = "Meter.PublicKey"   # an Eichrecht meter's key, read by its source (docs/station.md)
METER_TX_TIMEOUT_S = 30.0
WATCH_INTERVAL_S = 0.5
CHARGER_RETRY_S = 2.0
FIRST_POLL_S = 10.0   # ready waits this long at most for each charger's and meter's first word
FUNDING_CHECKS = 5


@dataclass
class StationSession:
    view: SessionView
    dir: SessionDir
    channel: StationChannel
    store: ChannelStore
    feed: asyncio.Queue[tuple[int, int, int] | None] = field(default_factory=asyncio.Queue)
    paused_since: float | None = None

    def end(self, reason: str) -> None:
        """Ask the session to close (first reason wins)."""
        if not self.view.end_reason:
            self.view.end_reason = reason
            self.feed.put_nowait(None)


@dataclass
class Connector:
    config: ConnectorConfig
    charger: Charger
    status: ChargerStatus | None = None
    silent: bool = False
    session: StationSession | None = None
    pending: dict[str, int] = field(default_factory=dict)  # this poll's counters so far
    meter_key: str = ""              # its Eichrecht meter's public key (Meter.PublicKey)
    meter_unit: int = 1              # that meter's Modbus unit on its source

    @property
    def id(self) -> int:
        return self.config.id

    @property
    def on_charger(self) -> int:
        """Its number on its charger (``charger_connector``; the charger's events and
        statuses use it)."""
        return self.config.on_charger

    @property
    def faulted(self) -> bool:
        state = cp_state(self.status)
        return self.silent or state in FAULT_STATES or (
            self.status is not None and self.status.fault is not None)

    @property
    def offer_state(self) -> str:
        if self.faulted:
            return "faulted"
        return "occupied" if self.session is not None or \
            cp_state(self.status) in PLUGGED_STATES else "available"


class StationService:
    def __init__(self, ctx: Context, config: StationConfig, chargers: dict[str, Charger],
                 meters: dict[str, TransactionMeter] | None = None) -> None:
        self.ctx, self.config = ctx, config
        self.chargers = chargers
        self.meters = meters or {}   # source id -> its Eichrecht meter's transactions
        self.connectors = {c.id: Connector(c, chargers[c.charger]) for c in config.connectors}
        self.sessions: dict[bytes, StationSession] = {}
        self.history: deque[SessionView] = deque(maxlen=HISTORY)
        self._seen: dict[bytes, float] = {}          # request id -> wall time it expires
        self._offers_changed = asyncio.Event()
        # set by a charger's first answer or failure: requests are taken only once every
        # connector's state is known (a request before the first poll is not "unplugged")
        self._polled = {charger_id: asyncio.Event() for charger_id in chargers}
        # ... and every meter's first reading (an Eichrecht meter has said its key by then)
        self._metered = {c.id: asyncio.Event() for c in config.connectors}
        keys = ctx.keys
        self.tariff_sig = sign_tariff(config.tariff, keys.identity)

    # -- status ------------------------------------------------------------------------
    def views(self) -> list[SessionView]:
        return [*self.history] + [s.view for s in self.sessions.values()]

    # -- the service ------------------------------------------------------------------
    async def run(self) -> None:
        for connector in self.connectors.values():
            self.ctx.hub.listen(connector.config.meter, self._meter_listener(connector))
        try:
            async with asyncio.TaskGroup() as tg:
                for index, (charger_id, charger) in enumerate(self.chargers.items()):
                    # spread over one poll interval: many wallboxes are not polled at once
                    offset = WATCH_INTERVAL_S * index / len(self.chargers)
                    tg.create_task(self._watch(charger_id, charger, offset),
                                   name=f"channel.charger[{charger_id}]")
                requests = await self.ctx.mux.subscribe(request_topic(self.ctx.device_id))
                for directory in session_dirs(self.ctx.state_dir):
                    self._resume(directory, tg)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(FIRST_POLL_S):
                        for first in (*self._polled.values(), *self._metered.values()):
                            await first.wait()
                # the first offers say what the connectors and their meters said
                tg.create_task(self._publish_offers(), name="channel.offers")
                self.ctx.ready.set()
                while True:
                    message = await requests.get()
                    await self._on_request(message.payload, tg)
        finally:
            for session in self.sessions.values():
                session.store.close()
            for connector in self.connectors.values():
                with contextlib.suppress(AdapterError):
                    await connector.charger.set_enabled(connector.on_charger, False)
            for charger in self.chargers.values():
                charger.close()

    # -- chargers ----------------------------------------------------------------------
    async def _watch(self, charger_id: str, charger: Charger, offset_s: float = 0.0) -> None:
        """The charger's watch (it opens, polls, reconnects and says when it falls silent);
        its events become signed events, and silence ends the connector's session."""
        await asyncio.sleep(offset_s)
        mine = [c for c in self.connectors.values() if c.charger is charger]
        events: asyncio.Queue[Event] = asyncio.Queue()
        forward = asyncio.ensure_future(self._forward(events, mine))
        polled = self._polled[charger_id]

        def on_status(status: ChargerStatus) -> None:
            polled.set()
            self._on_status_of(mine, status)

        def on_event(event: Event) -> None:
            polled.set()
            events.put_nowait(event)

        try:
            while True:
                try:
                    await charger.watch(on_status, WATCH_INTERVAL_S, on_event)
                except AdapterError as exc:  # a kind that gives up: retried, and said
                    self.ctx.on_error(f"charger[{charger_id}]", exc)
                    events.put_nowait(Event("charger-silent", str(exc)[:500], time.time_ns(),
                                            charger_id, (("reason", exc.reason),)))
                await asyncio.sleep(CHARGER_RETRY_S)
        finally:
            forward.cancel()

    async def _forward(self, events: asyncio.Queue[Event], mine: list[Connector]) -> None:
        while True:
            event = await events.get()
            await self.ctx.emit(event)
            connector_id = dict(event.details).get("connector")
            hit = [c for c in mine if connector_id in (None, c.on_charger)]
            if event.code == "charger-silent":
                for connector in hit:
                    connector.silent = True
                    if connector.session is not None:
                        connector.session.end("charger-fault")
                self._offers_changed.set()
            elif event.code == "charger-recovered":
                for connector in hit:
                    connector.silent = False
                self._offers_changed.set()

    def _on_status_of(self, connectors: list[Connector], status: ChargerStatus) -> None:
        for connector in connectors:
            if connector.on_charger == status.connector:
                self._on_status(connector, status)

    def _on_status(self, connector: Connector, status: ChargerStatus) -> None:
        before = connector.offer_state
        connector.status, connector.silent = status, False  # it answered
        session = connector.session
        if session is not None and session.channel.phase in (Phase.OPENING, Phase.ACTIVE):
            if cp_state(status) == "A":
                session.end("cable-pulled")
            elif connector.faulted:
                session.end("charger-fault")
        if connector.offer_state != before:
            self._offers_changed.set()

    async def _switch(self, connector: Connector, session: StationSession,
                      allowed: bool) -> None:
        """The credit window's verdict, to the charger. A charger that does not take it is a
        fault: the session ends (delivery cannot be trusted to stop otherwise)."""
        try:
            await connector.charger.set_enabled(connector.on_charger, allowed)
        except AdapterError as exc:
            self.ctx.on_error(f"connector[{connector.id}]", exc)
            session.end("charger-fault")

    # -- meter readings ----------------------------------------------------------------
    def _meter_listener(self, connector: Connector):  # type: ignore[no-untyped-def]
        def listen(reading: Reading) -> None:
            if reading.name == METER_KEY and isinstance(reading.value, str):
                self._meter_key(connector, reading)
                return
            if reading.name not in (IMPORT_WH, EXPORT_WH) or not isinstance(reading.value, int):
                return
            self._metered[connector.id].set()
            poll = connector.pending
            if reading.flags:  # implausible: not metered now (the counter is cumulative)
                poll.clear()
                return
            # One poll gives both counters, one after the other (each reading has its own
            # timestamp): a pair is complete when both came since the last pair.
            poll[reading.name] = reading.value
            if len(poll) < 2:
                return
            pair = (poll.pop(IMPORT_WH), poll.pop(EXPORT_WH), reading.ts_ns)
            session = connector.session
            if session is not None:
                session.feed.put_nowait(pair)
        return listen

    def _meter_key(self, connector: Connector, reading: Reading) -> None:
        """An Eichrecht meter identified itself: its key goes into the connector's offer
        (the meter is the reading's ``unit/serial``), if its source can run transactions."""
        if connector.config.meter not in self.meters or reading.value == connector.meter_key:
            return
        unit = (reading.meter or "1").partition("/")[0]
        connector.meter_unit = int(unit) if unit.isdigit() else 1
        connector.meter_key = str(reading.value)
        self._offers_changed.set()

    async def _begin_transaction(self, connector: Connector, session: StationSession) -> None:
        meter = self.meters.get(connector.config.meter)
        if meter is None:
            return
        record = session.view.record
        try:
            async with asyncio.timeout(METER_TX_TIMEOUT_S):   # not wait_for: gh-86296
                await meter.begin_transaction(connector.meter_unit, {
                    "FV": "1.0", "GI": "ev-edge-agent", "ID": record.vehicle})
        except (AdapterError, TimeoutError) as exc:   # the final METER then has no record
            self.ctx.counters["meter-transaction-failed"] += 1
            await self.ctx.event("meter-transaction-failed", f"connector {connector.id}: the "
                                 f"meter's signed transaction did not start: {exc}",
                                 connector=connector.id)

    async def _final_proof(self, connector: Connector) -> str:
        """The record the Eichrecht meter signs when its transaction ends ("" if it does
        not answer: the vehicle then does not sign the final state, and the latest
        co-signed one is settled)."""
        meter = self.meters.get(connector.config.meter)
        if meter is None:
            return ""
        try:
            async with asyncio.timeout(METER_TX_TIMEOUT_S):   # not wait_for: gh-86296
                return await meter.end_transaction(connector.meter_unit)
        except (AdapterError, TimeoutError) as exc:
            self.ctx.counters["meter-transaction-failed"] += 1
            await self.ctx.event("meter-transaction-failed", f"connector {connector.id}: no "
                                 f"signed record from the meter: {exc}", connector=connector.id)
            return ""

    async def _feed(self, session: StationSession) -> AsyncIterator[tuple[int, int]]:
        """The connector's cumulative (import, export) Wh, until the session is to end."""
        while True:
            item = await session.feed.get()
            if item is None:
                return
            channel = session.channel
            if channel.phase is Phase.ACTIVE and not channel.delivering:
                now = time.monotonic()
                session.paused_since = session.paused_since or now
                if now - session.paused_since > self.config.stall_timeout_s:
                    session.end("credit-window")
                    return
            else:
                session.paused_since = None
            yield item[0], item[1]

    # -- offers ------------------------------------------------------------------------
    def offer(self, connector: Connector) -> offers.Offer:
        c, keys = self.config, self.ctx.keys
        return offers.Offer(
            station=self.ctx.device_id, connector=connector.id, identity=keys.identity.public,
            address=keys.settlement.address, tariff=c.tariff, tariff_sig=self.tariff_sig,
            chain_id=self.ctx.client.chain_id, contract=self.ctx.client.address,
            dispute_window_s=c.dispute_window_s, credit_window_wh=c.credit_window_wh,
            pay_step_wh=c.pay_step_wh, deposit_ev=c.deposit_ev, state=connector.offer_state,
            issued_s=int(time.time()), meter_key=connector.meter_key)

    async def _publish_offers(self) -> None:
        uplink = self.ctx.mux.uplink
        while True:
            self._offers_changed.clear()
            for connector in self.connectors.values():
                data = offers.encode(self.offer(connector), self.ctx.keys.identity)
                await uplink.publish(offer_topic(self.ctx.device_id, connector.id), data,
                                     retain=True)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.offer_interval_s):   # gh-86296
                    await self._offers_changed.wait()

    # -- requests ----------------------------------------------------------------------
    async def _on_request(self, payload: bytes, tg: asyncio.TaskGroup) -> None:
        try:
            request = offers.open_as(payload, offers.Request)
        except EdgeAgentError as exc:
            await self.ctx.hostile("request", exc.reason)
            return
        now = time.time()
        if request.station != self.ctx.device_id:
            await self.ctx.hostile("request", "wrong-station", request.station)
            return
        if abs(now - request.issued_s) > self.ctx.settings.request_ttl_s:
            await self.ctx.hostile("request", "stale-request", request.vehicle)
            return
        self._seen = {k: v for k, v in self._seen.items() if v > now}
        if request.request_id in self._seen:
            await self.ctx.hostile("request", "replayed-request", request.vehicle)
            return
        self._seen[request.request_id] = now + self.ctx.settings.request_ttl_s
        refusal = self._refusal(request)
        if refusal is not None:
            await self._refuse(request, *refusal)
            return
        await self._accept(request, tg)

    def _refusal(self, request: offers.Request) -> tuple[str, str] | None:
        connector = self.connectors.get(request.connector)
        if connector is None:
            return "unknown-connector", f"connectors: {sorted(self.connectors)}"
        registry = self.ctx.registry
        if self.config.policy == "registry":
            kid = key_id(request.identity)
            try:
                if registry is None:
                    raise UnknownKey("no fleet registry", kid=kid)
                registry.lookup(kid)
                if registry.device_of(kid) != request.vehicle:
                    raise UnknownKey("key registered for another device", kid=kid)
            except RevokedKey:
                return "key-revoked", f"key {kid.hex()}"
            except UnknownKey:
                return "vehicle-not-allowed", f"key {kid.hex()}"
        offer = self.offer(connector)
        if request.max_price_per_kwh is not None and offer.highest_price > \
                request.max_price_per_kwh:
            return "price-above-limit", f"tariff up to {offer.highest_price} per kWh"
        for other in self.connectors.values():
            if other.session is not None and other.session.view.record.vehicle == request.vehicle:
                return "vehicle-busy", f"session on connector {other.id}"
        if connector.session is not None:
            return "connector-occupied", ""
        state = cp_state(connector.status)
        if connector.faulted:
            return "connector-faulted", f"state {state}" if state else "charger silent"
        if state not in PLUGGED_STATES:
            return "not-plugged-in", f"state {state}" if state else "state unknown"
        return None

    async def _refuse(self, request: offers.Request, reason: str, detail: str) -> None:
        self.ctx.counters[f"refused-{reason}"] += 1
        refusal = offers.Refusal(request.request_id, self.ctx.device_id, request.connector,
                                 request.vehicle, reason, detail[:200], int(time.time()))
        await self.ctx.mux.uplink.publish(answer_topic(request.vehicle),
                                          offers.encode(refusal, self.ctx.keys.identity))
        await self.ctx.event("session-refused", f"refused {request.vehicle} at connector "
                             f"{request.connector}: {reason}", vehicle=request.vehicle,
                             connector=request.connector, reason=reason)

    async def _accept(self, request: offers.Request, tg: asyncio.TaskGroup) -> None:
        connector = self.connectors[request.connector]
        offer = self.offer(connector)
        half = os.urandom(offers.ID_BYTES)
        salt = offers.channel_salt(request.salt_half, half)
        keys = self.ctx.keys
        channel_id = derive_channel_id(offer.chain_id, offer.contract, request.address,
                                       keys.settlement.address, salt)
        record = SessionRecord(
            "station", channel_id, request.request_id, self.ctx.device_id, request.vehicle,
            connector.id, request.identity, request.address, salt,
            offers.encode(offer, keys.identity), time.time_ns(), request.max_wh,
            request.max_price_per_kwh)
        directory = SessionDir(self.ctx.state_dir, channel_id)
        directory.create(record)  # durable before the ACCEPT leaves
        session = self._session(directory, record)
        accept = offers.Accept(request.request_id, self.ctx.device_id, connector.id,
                               request.vehicle, half, channel_id, int(time.time()))
        await self.ctx.mux.uplink.publish(answer_topic(request.vehicle),
                                          offers.encode(accept, keys.identity))
        await self.ctx.event("session-started", f"session with {request.vehicle} at connector "
                             f"{connector.id}, channel 0x{channel_id.hex()}",
                             vehicle=request.vehicle, connector=connector.id,
                             channel=channel_id.hex(),
                             price_per_kwh=offer.tariff.price_per_kwh,
                             export_price_per_kwh=offer.tariff.export_price_per_kwh)
        tg.create_task(self._run(session), name=f"channel[{channel_id.hex()[:12]}]")

    # -- sessions ----------------------------------------------------------------------
    def _session(self, directory: SessionDir, record: SessionRecord) -> StationSession:
        offer = offers.open_as(record.offer, offers.Offer, self.ctx.keys.identity.public)
        keys = self.ctx.keys
        store = ChannelStore(directory.store_path)
        channel = open_channel(
            StationChannel, store, identity=keys.identity, settlement=keys.settlement,
            vehicle=Party(record.peer_identity, record.peer_address), chain_id=offer.chain_id,
            contract=offer.contract, salt=record.salt, tariff=offer.tariff,
            tariff_sig=offer.tariff_sig, deposit_ev=offer.deposit_ev,
            deposit_cs=self.config.deposit_cs, dispute_window_s=offer.dispute_window_s,
            credit_window_wh=offer.credit_window_wh, pay_step_wh=offer.pay_step_wh)
        assert isinstance(channel, StationChannel)
        channel.defer_close = bool(offer.meter_key)   # the final METER waits for the record
        session = StationSession(SessionView(record, channel, directory.job()), directory,
                                 channel, store)
        self.sessions[record.channel_id] = session
        self._seen[record.request_id] = float("inf")   # its request is never taken twice
        connector = self.connectors.get(record.connector)
        if connector is not None and session.view.job is None:
            connector.session = session
            self._offers_changed.set()
        return session

    def _resume(self, directory: SessionDir, tg: asyncio.TaskGroup) -> None:
        try:
            record = directory.session()
            job = directory.job()
            if job is not None and job.done:
                self._seen[record.request_id] = float("inf")
                # still shown by `status` after a restart, as before it
                self.history.append(SessionView(record, job=job))
                return
            session = self._session(directory, record)
        except EdgeAgentError as exc:
            self.ctx.on_error("channel.resume", exc)
            return
        log.info("resuming session 0x%s (%s)", record.channel_id.hex()[:12],
                 job.state if job else "running")
        tg.create_task(self._run(session), name=f"channel[{record.channel_id.hex()[:12]}]")

    async def _run(self, session: StationSession) -> None:
        record = session.view.record
        connector = self.connectors.get(record.connector)
        final: Closed | None = None
        if session.view.job is None and connector is not None:
            final = await self._charge(session, connector)
        elif session.channel.phase is Phase.CLOSED and session.channel.cosigned is not None:
            c = session.channel.cosigned
            final = Closed(c.state, c.sig_ev, c.sig_cs)
        if connector is not None and connector.session is session:
            connector.session = None
            self._offers_changed.set()
        await self._settle(session, final)

    async def _charge(self, session: StationSession, connector: Connector) -> Closed | None:
        """Run the channel until it closes or the session is to end; the final state or
        None (then the latest co-signed state is settled unilaterally)."""
        channel = session.channel
        # a resumed session starts with the service: the charger's watch opens the line
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(FIRST_POLL_S):   # not wait_for: gh-86296
                await self._polled[connector.config.charger].wait()
        with contextlib.suppress(AdapterError):
            await connector.charger.set_current_limit(connector.on_charger,
                                                      connector.config.max_current_a)
        # a resumed channel may already allow delivery (no new verdict will come for it)
        await self._switch(connector, session, channel.delivering)

        signed = channel.defer_close and connector.config.meter in self.meters
        if signed and channel.phase in (Phase.IDLE, Phase.OPENING):   # not on a resume
            await self._begin_transaction(connector, session)

        def on_event(action: Action) -> None:
            if isinstance(action, CloseRequested):
                session.end("vehicle-stop")   # the feed ends; the close follows

        route = self.ctx.mux.transport()
        runner = asyncio.ensure_future(run_station(
            route, channel, session.store, self._feed(session),
            charger=lambda allowed: self._switch(connector, session, allowed),
            check_funding=self._check_funding,
            close_timeout_s=self.ctx.settings.close_timeout_s, on_event=on_event,
            final_proof=(lambda: self._final_proof(connector)) if signed else None))
        assert self.ctx.blocks is not None   # the service made it (service.py)
        watch = asyncio.ensure_future(watch_open(
            self.ctx.client, channel.channel_id, self.ctx.blocks,
            lambda: channel.phase is not Phase.OPENING))
        funding = asyncio.ensure_future(self._funding_deadline(session))
        try:
            await asyncio.wait({runner, watch, funding}, return_when=asyncio.FIRST_COMPLETED)
            if watch.done():
                session.end("closed-on-chain")
            if not runner.done() and session.view.end_reason in ("closed-on-chain",
                                                                 "funding-timeout"):
                runner.cancel()   # ours to cancel: the channel cannot finish by itself
            await asyncio.wait({runner})  # raises only if we are cancelled ourselves
            if runner.cancelled():
                return None
            try:
                return runner.result()
            except ChannelError as exc:   # close-timeout, funding-not-verified
                session.view.end_reason = session.view.end_reason or exc.reason
                return None
        finally:
            for task in (watch, funding, runner):
                task.cancel()
            route.close()
            session.store.close()
            with contextlib.suppress(AdapterError):
                await connector.charger.set_enabled(connector.on_charger, False)

    async def _funding_deadline(self, session: StationSession) -> None:
        await asyncio.sleep(self.config.funding_timeout_s)
        if session.channel.phase in (Phase.IDLE, Phase.OPENING):
            session.end("funding-timeout")
            return
        await asyncio.Event().wait()

    async def _check_funding(self, params: OpenParams, reference: bytes) -> None:
        from agent.settlement.funding import check_channel_funded

        client = self.ctx.client
        for attempt in range(FUNDING_CHECKS):  # a second node may lag the vehicle's
            try:
                record = await asyncio.to_thread(check_channel_funded, client, params)
                break
            except SettlementError as exc:
                if attempt == FUNDING_CHECKS - 1 or exc.reason == "funding-mismatch":
                    raise
                await asyncio.sleep(self.ctx.settlement.poll_s)
        if params.deposit_cs > 0:  # what V2G pay-outs come from: ours to put in, once
            if record.dep_cs < params.deposit_cs:
                await asyncio.to_thread(client.deposit, params.channel_id,
                                        params.deposit_cs - record.dep_cs)

    async def _settle(self, session: StationSession, final: Closed | None) -> None:
        channel, view = session.channel, session.view
        reason = view.end_reason or (view.job.end_reason if view.job else "") or "closed"
        if final is not None and not view.end_reason:
            view.end_reason = reason
        await settle_session(self.ctx, session.dir, channel, view, final, reason,
                             submitter=self.ctx.settings.submit == "station")
        self.sessions.pop(channel.channel_id, None)
        self.history.append(view)
