"""The asyncio driver of the payment channel: moves bytes between the MQTT uplink, the
sans-I/O core (protocol.py) and the store, and re-arms one timer (DESIGN s5, STYLE "thin
drivers").

Topics (DESIGN s4): each side publishes on ``evedge/v1/channel/<channel id hex>/<role>``
(role ``ev`` or ``cs``) and subscribes to the peer's.

Entry points for the channel service (agent/channel/service.py) and the benchmarks::

    closed = await run_station(transport, channel, store, meter, charger=None)
    closed = await run_vehicle(transport, channel, store, estimate=None, fund=None, stop=None)

``transport`` is a :class:`Transport`: an agent.channel.mux.Route (one channel's inbox on
the agent's shared uplink) fits. ``meter`` is an async iterator of cumulative
``(import_wh, export_wh)`` register values (a Modbus source or the meter simulator); when it
ends the station closes the channel. ``charger(allowed)`` is told when the credit window
pauses or resumes delivery. ``estimate`` is the vehicle's own async iterator of cumulative Wh
received; ``fund(params)`` is the vehicle's funding step (an async callable returning a
reference such as a transaction hash; default: nothing to do); ``stop`` is an asyncio.Event
that asks for a cooperative close. Both return the final co-signed state with both
secp256k1 signatures (protocol.Closed), ready for the settlement client. ``on_event``
(both) sees every event of the core after the session's own handling (the service follows
payments, withheld payments and rejections through it).

Waiting is on events, never on a poll: the driver signals each phase change
(:meth:`ChannelDriver.until`) and each message that arrives, and the transport signals each
new connection epoch (:meth:`Transport.next_epoch`), which is when REESTABLISH goes out.

Order of effects: the records of a step are written (fsync) before any message of the same
step is published, and steps leave in the order the core made them; this is what makes
"persist before a signature leaves" true. One writer task does the writing in a worker
thread and commits every step queued meanwhile with one fsync (group commit), so the core
handles the next messages while the disk flushes. """

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from typing import Any, Protocol

from agent.channel.disk import FsyncHelper
from agent.channel.protocol import (
    Action,
    Channel,
    Closed,
    DeliveryPaused,
    DeliveryResumed,
    ExportPaused,
    ExportResumed,
    Funded,
    Opened,
    Persist,
    Phase,
    Rejected,
    Role,
    Send,
)
from agent.channel.records import OpenParams
from agent.channel.station import StationChannel
from agent.channel.store import ChannelStore
from agent.channel.vehicle import VehicleChannel
from agent.errors import ChannelError, EdgeAgentError, LocalProtocolError, UplinkError
from agent.topics import channel_topic

log = logging.getLogger(__name__)


class Incoming(Protocol):
    @property
    def topic(self) -> str: ...

    @property
    def payload(self) -> bytes: ...


class Transport(Protocol):
    """What the session needs of agent.uplink.Uplink."""

    def publish_nowait(self, topic: str, payload: bytes) -> asyncio.Future[None]: ...

    async def subscribe(self, topic: str) -> None: ...

    def messages(self) -> AsyncIterator[Incoming]: ...

    async def wait_connected(self) -> int: ...

    async def next_epoch(self, seen: int | None) -> int:
        """Wait for a live connection whose epoch differs from ``seen``; return it."""
        ...


def topic_for(channel_id: bytes, role: Role) -> str:
    return channel_topic(channel_id.hex(), role.value)


def open_channel(cls: type[StationChannel] | type[VehicleChannel], store: ChannelStore,
                 **kwargs: object) -> StationChannel | VehicleChannel:
    """A fresh channel, or the one the store holds (restart)."""
    records = store.records()
    if records:
        return cls.restore(records, **kwargs)
    return cls(**kwargs)  # type: ignore[arg-type]


class ChannelDriver:
    """Runs one channel: receive loop, timer, reconnect watch. Events go to ``on_event``."""

    def __init__(self, channel: Channel, transport: Transport, store: ChannelStore,
                 on_event: Callable[[Action], None] | None = None,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.channel, self.transport, self.store = channel, transport, store
        self.wall_clock = wall_clock  # our own clock: the vehicle prices METERs by it
        peer = Role.STATION if channel.role is Role.VEHICLE else Role.VEHICLE
        self.inbox = topic_for(channel.channel_id, peer)
        self.outbox = topic_for(channel.channel_id, channel.role)
        self.on_event = on_event or (lambda action: None)
        self._loop = asyncio.get_running_loop()
        self.closed: asyncio.Future[Closed] = self._loop.create_future()
        self.sent = 0
        self.received = 0
        self.syncs = 0
        self._steps: deque[list[Action]] = deque()  # made by the core, not yet carried out
        self._syncing = False
        self._stopped = False
        self._drained = asyncio.Event()
        self._drained.set()
        self._fsync: FsyncHelper | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._last_publish: asyncio.Future[None] | None = None
        self._phase = channel.phase
        self._phase_changed = asyncio.Event()
        self.arrived = asyncio.Event()   # set on every message received

    def now(self) -> float:
        return self._loop.time()

    def execute(self, actions: list[Action]) -> None:
        """Carry out the effects of one core step, in order after every earlier step: its
        records are written (fsync'd when the core says so) before its messages are
        published and its events reported. A step that needs an fsync goes to the fsync
        helper together with every step queued behind it (group commit), and the loop goes
        on: the core keeps answering while the disk flushes, and the steps made meanwhile
        share the next fsync. Writing a record earlier than the core asked is always safe;
        publishing earlier never happens."""
        for action in actions:  # stopping the charger cannot wait for the disk
            if isinstance(action, DeliveryPaused | ExportPaused):
                self._event(action)
        if actions and not self._stopped:
            self._steps.append(actions)
            if not self._syncing:
                self._drain()
        self._arm_timer()
        if self.channel.phase is not self._phase:
            self._phase = self.channel.phase
            self._phase_changed.set()

    async def until(self, done: Callable[[Phase], bool]) -> Phase:
        """Wait until the channel's phase satisfies ``done`` (woken by each change)."""
        while not done(self.channel.phase):
            self._phase_changed.clear()
            await self._phase_changed.wait()
        return self.channel.phase

    def _drain(self) -> None:
        """Carry out queued steps until one needs the disk; hand that one, and all behind
        it, to the fsync helper (``_synced`` goes on when the fdatasync is done)."""
        while self._steps:
            step = self._steps[0]
            persists = [a for a in step if isinstance(a, Persist)]
            if self.store.sync and any(a.sync for a in persists):
                steps = list(self._steps)
                self._steps.clear()
                self.store.append([a.record for s in steps for a in s if isinstance(a, Persist)],
                                  sync=False)
                self._syncing = True
                self._drained.clear()
                if self._fsync is None:
                    self._fsync = FsyncHelper(self.store.fileno())
                self._fsync.sync(partial(self._synced, steps))
                return
            self._steps.popleft()
            if persists:  # nothing to wait for: into the page cache, a later fsync covers it
                self.store.append([a.record for a in persists], sync=False)
            self._carry_out(step)
        self._drained.set()

    def _synced(self, steps: list[list[Action]], error: BaseException | None) -> None:
        self._syncing = False
        if self._stopped:
            return  # stopped (a simulated crash, or shutdown): nothing more leaves
        if error is not None:  # the disk failed: nothing of these steps may leave
            self._stopped = True
            self._drained.set()
            if not self.closed.done():
                self.closed.set_exception(error)
            return
        self.syncs += 1
        for step in steps:
            self._carry_out(step)
        self._drain()

    def _carry_out(self, step: list[Action]) -> None:
        for action in step:
            if isinstance(action, Send):
                self._publish(action.data)
            elif not isinstance(action, Persist | DeliveryPaused | ExportPaused):
                self._event(action)

    def _publish(self, data: bytes) -> None:
        try:
            self._last_publish = self.transport.publish_nowait(self.outbox, data)
            self.sent += 1
        except UplinkError as exc:  # not connected: the timer / REESTABLISH resends
            self.channel.counters[f"publish-{exc.reason}"] += 1

    def _event(self, action: Action) -> None:
        if isinstance(action, Rejected):
            log.info("channel %s rejected %s: %s", self.channel.channel_id.hex()[:12],
                     action.msg_type.name if action.msg_type else "input", action.reason)
        if isinstance(action, Closed) and not self.closed.done():
            self.closed.set_result(action)
        self.on_event(action)

    def _arm_timer(self) -> None:
        """Keep one loop timer at or before the core's deadline. A later deadline leaves
        the armed timer alone (it fires, finds nothing due and re-arms): most steps move
        the deadline later, and this costs them nothing."""
        deadline = self.channel.get_timer()
        if deadline is None or self._stopped or (
                self._timer_at is not None and self._timer_at <= deadline):
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_at = self._loop.call_at(deadline, self._on_timer), deadline

    def _on_timer(self) -> None:
        self._timer = self._timer_at = None
        deadline = self.channel.get_timer()
        if deadline is not None and deadline <= self.now():
            self.execute(self.channel.handle_timer(self.now()))
        else:
            self._arm_timer()

    async def start(self, tg: asyncio.TaskGroup) -> list[asyncio.Task[None]]:
        await self.transport.subscribe(self.inbox)
        name = f"channel[{self.channel.channel_id.hex()[:12]}]"
        self._arm_timer()
        return [tg.create_task(self._receive_loop(), name=f"{name}.receive"),
                tg.create_task(self._reconnect_loop(), name=f"{name}.reconnect")]

    async def flush(self, timeout_s: float = 2.0) -> None:
        """Wait until every queued step is written and published, then for the broker's
        PUBACK of the last message (best effort)."""
        await self._drained.wait()
        if self._last_publish is not None:
            with contextlib.suppress(UplinkError, TimeoutError, asyncio.CancelledError):
                async with asyncio.timeout(timeout_s):  # not wait_for: gh-86296
                    await asyncio.shield(self._last_publish)

    def stop(self) -> None:
        """Nothing more is carried out (steps still waiting for the disk are dropped, as
        in a crash); the timer and the fsync helper end."""
        self._stopped = True
        self._steps.clear()
        self._drained.set()  # nothing more will be carried out: flush() must not wait
        if self._timer is not None:
            self._timer.cancel()
            self._timer = self._timer_at = None
        if self._fsync is not None:
            self._fsync.close()
            self._fsync = None

    async def _receive_loop(self) -> None:
        try:
            async for message in self.transport.messages():
                if message.topic != self.inbox:
                    continue
                self.received += 1
                self.arrived.set()
                self.execute(self.channel.receive(bytes(message.payload), self.now(),
                                                  self.wall_clock()))
        finally:
            self.stop()

    async def _reconnect_loop(self) -> None:
        """REESTABLISH on start and after every reconnect (each new epoch)."""
        seen = None
        while True:
            seen = await self.transport.next_epoch(seen)
            self.execute(self.channel.reestablish(self.now()))


async def _stop_tasks(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def run_station(uplink: Transport, channel: StationChannel, store: ChannelStore,
                      meter: AsyncIterator[tuple[int, int]], *,
                      charger: Callable[[bool], Awaitable[None] | None] | None = None,
                      wall_clock: Callable[[], float] = time.time,
                      linger_s: float = 1.0, close_timeout_s: float | None = None,
                      check_funding: Callable[[OpenParams, bytes], Awaitable[None]] | None = None,
                      on_event: Callable[[Action], None] | None = None,
                      final_proof: Callable[[], Awaitable[str]] | None = None) -> Closed:
    """Open (or resume) the channel, meter until ``meter`` ends or the vehicle asks to
    close, and return the final co-signed state.

    With ``close_timeout_s``, a vehicle that does not sign the final state within that time
    after the final METER raises ChannelError(reason="close-timeout"); ``channel.cosigned``
    then holds the latest co-signed state for a unilateral close on the ledger.

    ``final_proof`` (an Eichrecht meter) gives the record the meter signed for the session
    when metering ends; the final METER carries it."""
    pending: list[Awaitable[None]] = []
    funded: asyncio.Queue[bytes] = asyncio.Queue()

    def events(action: Action) -> None:
        if charger is not None and isinstance(action, DeliveryPaused | DeliveryResumed):
            result = charger(isinstance(action, DeliveryResumed))
            if result is not None:
                pending.append(result)
        if isinstance(action, Funded):
            funded.put_nowait(action.reference)
        if on_event is not None:
            on_event(action)

    if (done := _already_closed(channel)) is not None:
        return done
    driver = ChannelDriver(channel, uplink, store, events, wall_clock)
    refused: asyncio.Future[ChannelError] = asyncio.get_running_loop().create_future()
    if check_funding is None and not channel.funding_verified:
        log.warning("channel %s: no funding check configured; delivery stops after the "
                    "credit window until the ledger confirms the vehicle's deposit",
                    channel.channel_id.hex()[:12])
    async with asyncio.TaskGroup() as tg:
        tasks = await driver.start(tg)
        if channel.phase is Phase.IDLE:
            await uplink.wait_connected()
            driver.execute(channel.open(driver.now()))
        if check_funding is not None:
            if channel.phase is Phase.ACTIVE:  # restarted: check again, it costs one call
                funded.put_nowait(channel.funding_ref)
            tasks.append(tg.create_task(
                _verify_funding(driver, channel, funded, check_funding, charger, refused),
                name="channel.funding"))

        async def metering() -> None:
            async for import_wh, export_wh in meter:
                driver.execute(channel.meter(import_wh, export_wh, int(wall_clock()),
                                             driver.now()))
                await asyncio.sleep(0)  # let the receiver run between readings
                while pending:
                    await pending.pop(0)
                if channel.phase in (Phase.CLOSING, Phase.CLOSED):
                    return
            # nothing metered before funding
            await driver.until(lambda phase: phase is not Phase.OPENING)
            if channel.phase is Phase.ACTIVE:
                ocmf = await final_proof() if final_proof is not None else ""
                if channel.phase is Phase.ACTIVE:
                    driver.execute(channel.close(driver.now(), ocmf))

        meter_task = tg.create_task(metering(), name="channel.meter")
        waiter = tg.create_task(_closed_or_error(driver, channel, close_timeout_s))
        either: set[asyncio.Future[Any]] = {waiter, refused}
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        if refused.done():
            waiter.cancel()
            outcome: Closed | ChannelError = refused.result()
        else:
            outcome = waiter.result()
        # a ChannelError is raised below, outside the TaskGroup (so it is not wrapped)
        closed, timeout = (None, outcome) if isinstance(outcome, ChannelError) else (outcome, None)
        meter_task.cancel()
        if closed is not None:
            await driver.flush()
            await _linger(driver, linger_s)
        await _stop_tasks(tasks)
        while pending:  # the last verdict of the credit window (closing: delivery paused)
            await pending.pop(0)
    if closed is None:
        assert timeout is not None
        raise timeout
    return closed


async def _closed_or_error(driver: ChannelDriver, channel: Channel,
                           close_timeout_s: float | None) -> Closed | ChannelError:
    try:
        return await _wait_closed(driver, channel, close_timeout_s)
    except ChannelError as exc:
        return exc


async def _verify_funding(driver: ChannelDriver, channel: StationChannel,
                          funded: asyncio.Queue[bytes],
                          check: Callable[[OpenParams, bytes], Awaitable[None]],
                          charger: Callable[[bool], Awaitable[None] | None] | None,
                          refused: asyncio.Future[ChannelError]) -> None:
    """Check the vehicle's FUNDED claim on the ledger (``check`` raises if the channel is
    not open there with the agreed parties and deposits). A vehicle that says FUNDED without
    funding would otherwise charge against states that can never be settled: on failure the
    charger is stopped and ``run_station`` raises ChannelError("funding-not-verified").
    Until the answer comes the core delivers at most one credit window in total."""
    reference = await funded.get()
    assert channel.params is not None
    try:
        await check(channel.params, reference)
        driver.execute(channel.funding_checked(driver.now()))
    except EdgeAgentError as exc:
        channel.counters["funding-not-verified"] += 1
        if charger is not None:
            result = charger(False)
            if result is not None:
                await result
        refused.set_result(ChannelError(f"funding not found on the ledger: {exc}",
                                        reason="funding-not-verified"))


async def _wait_closed(driver: ChannelDriver, channel: Channel,
                       close_timeout_s: float | None) -> Closed:
    if close_timeout_s is None:
        return await driver.closed
    closing = asyncio.ensure_future(
        driver.until(lambda phase: phase in (Phase.CLOSING, Phase.CLOSED)))
    waiting: set[asyncio.Future[Any]] = {driver.closed, closing}
    try:
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
    finally:
        closing.cancel()
    done, _ = await asyncio.wait({driver.closed}, timeout=close_timeout_s)
    if not done:
        raise ChannelError(f"no final state {close_timeout_s} s after closing; settle the "
                           f"latest co-signed state (nonce {channel.nonce}) unilaterally",
                           reason="close-timeout", nonce=channel.nonce)
    return driver.closed.result()


def _already_closed(channel: Channel) -> Closed | None:
    """A channel restored after it closed: nothing to run, hand back the final state."""
    c = channel.cosigned
    if channel.phase is Phase.CLOSED and c is not None:
        return Closed(c.state, c.sig_ev, c.sig_cs)
    return None


async def _linger(driver: ChannelDriver, linger_s: float) -> None:
    """Keep answering duplicates (a lost CLOSED) for a moment after closing: until
    ``linger_s`` is over, or nothing arrived for min(0.1 s, linger_s)."""
    end = driver.now() + linger_s
    while (left := end - driver.now()) > 0:
        driver.arrived.clear()
        try:
            async with asyncio.timeout(min(0.1, linger_s, left)):  # not wait_for: gh-86296
                await driver.arrived.wait()
        except TimeoutError:
            return  # quiet


async def run_vehicle(uplink: Transport, channel: VehicleChannel, store: ChannelStore, *,
                      estimate: AsyncIterator[int | tuple[int, int]] | None = None,
                      fund: Callable[[OpenParams], Awaitable[bytes | None]] | None = None,
                      stop: asyncio.Event | None = None,
                      close_timeout_s: float | None = None,
                      on_event: Callable[[Action], None] | None = None,
                      check_funding: Callable[[OpenParams], Awaitable[None]] | None = None,
                      export: Callable[[bool], Awaitable[None] | None] | None = None,
                      wall_clock: Callable[[], float] = time.time) -> Closed:
    """Accept the station's OPEN, fund, pay per METER, and return the final state.

    ``estimate`` yields the vehicle's own cumulative Wh received, or ``(received,
    exported)`` with V2G. ``check_funding(params)`` reads the ledger after funding (raises
    if the station's deposit or the channel's terms differ from OPEN); until it passes the
    vehicle does not export. ``export(allowed)`` is told when export may run or must stop
    (ExportResumed / ExportPaused: the export credit window, the funding check).

    With ``close_timeout_s``, a station that does not complete the close within that time
    after it began (our CLOSE request, or its final METER) raises
    ChannelError(reason="close-timeout"); ``channel.cosigned`` is then the latest co-signed
    state, for a unilateral close on the ledger."""
    opened: asyncio.Queue[OpenParams] = asyncio.Queue()
    pending: list[Awaitable[None]] = []

    def events(action: Action) -> None:
        if isinstance(action, Opened):
            opened.put_nowait(action.params)
        if export is not None and isinstance(action, ExportPaused | ExportResumed):
            result = export(isinstance(action, ExportResumed))
            if result is not None:
                pending.append(result)
        if on_event is not None:
            on_event(action)

    if (done := _already_closed(channel)) is not None:
        return done
    driver = ChannelDriver(channel, uplink, store, events, wall_clock)
    async with asyncio.TaskGroup() as tg:
        tasks = await driver.start(tg)
        if channel.phase is Phase.OPENING and channel.params is not None:
            opened.put_nowait(channel.params)  # restarted before funding finished

        async def funding() -> None:
            if channel.phase is Phase.ACTIVE:  # restarted after funding: check again
                params = channel.params
            else:
                params = await opened.get()
                reference = (await fund(params)) if fund is not None else None
                with contextlib.suppress(LocalProtocolError):
                    driver.execute(channel.funded(reference or b"", driver.now()))
            assert params is not None
            if check_funding is None:
                return
            try:
                await check_funding(params)
            except EdgeAgentError as exc:
                channel.counters["funding-not-verified"] += 1
                log.warning("channel %s: the ledger does not show the station's deposit "
                            "(%s); no export", channel.channel_id.hex()[:12], exc.reason)
                return
            driver.execute(channel.funding_checked(driver.now()))

        async def estimating() -> None:
            assert estimate is not None
            async for value in estimate:
                received, exported = value if isinstance(value, tuple) else (value, None)
                driver.execute(channel.estimate(received, driver.now(), exported))
                while pending:
                    await pending.pop(0)

        async def stopping() -> None:
            assert stop is not None
            await stop.wait()
            await driver.until(lambda phase: phase not in (Phase.IDLE, Phase.OPENING))
            with contextlib.suppress(LocalProtocolError):
                driver.execute(channel.close(driver.now()))

        helpers = [tg.create_task(funding(), name="channel.fund")]
        if estimate is not None:
            helpers.append(tg.create_task(estimating(), name="channel.estimate"))
        if stop is not None:
            helpers.append(tg.create_task(stopping(), name="channel.stop"))
        outcome = await _closed_or_error(driver, channel, close_timeout_s)
        if isinstance(outcome, Closed):
            await driver.flush()
        await _stop_tasks(helpers + tasks)
        for result in pending:
            await result
    if isinstance(outcome, ChannelError):
        raise outcome
    return outcome
