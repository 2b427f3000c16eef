"""What both roles of the channel service share: the context they run in (keys, uplink,
settlement client, signed events), the hub that hands them their own sources' readings, the
charger interface they drive, and the per-session view for ``edge-agent status``.

The charger objects come from the runtime (firmware_adapters/evse through the registry of
kinds: agent never imports firmware_adapters, DESIGN s2); :class:`Charger` is what the
service needs of them (firmware_adapters/evse/base.py's Charger has this shape).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from agent.channel.mux import TopicMux
from agent.channel.protocol import Channel
from agent.channel.sessions import JobRecord, SessionRecord
from agent.channel.settings import ChannelSettings
from agent.errors import ConfigError
from agent.fleet_keys import FleetRegistry
from agent.keys import DeviceKeys
from agent.readings import Event, Reading
from agent.status import ChannelStatus

if TYPE_CHECKING:
    from agent.channel.jobs import NewBlocks
    from agent.settlement.client import SettlementClient
    from agent.settlement.settings import SettlementConfig

log = logging.getLogger("edge_agent.channel")
PLUGGED_STATES = frozenset({"B", "C", "D"})     # IEC 61851-1 control pilot: vehicle present
FAULT_STATES = frozenset({"E", "F"})
EVENT_LIMIT_S = 60.0    # the same hostile-input event at most once a minute (counters: all)


class ChargerStatus(Protocol):
    """firmware_adapters.evse.base.ChargerStatus."""

    @property
    def connector(self) -> int: ...

    @property
    def state(self) -> enum.Enum: ...   # CpState: value "A".."F"

    @property
    def enabled(self) -> bool: ...

    @property
    def fault(self) -> str | None: ...


class Charger(Protocol):
    """firmware_adapters.evse.base.Charger, as the service drives it."""

    counters: Counter[str]

    async def open(self) -> None: ...

    def close(self) -> None: ...

    async def read_status(self, connector: int) -> ChargerStatus: ...

    async def set_enabled(self, connector: int, enabled: bool) -> None: ...

    async def set_current_limit(self, connector: int, amps: float) -> None: ...

    async def watch(self, on_status: Callable[[ChargerStatus], None], interval_s: float,
                    on_event: Callable[[Event], None] | None = None) -> None:
        """Poll until cancelled: each changed status to ``on_status``; ``charger-silent``
        / ``charger-recovered`` / ``charger-line-down`` ... events to ``on_event``."""
        ...


class TransactionMeter(Protocol):
    """A source with an Eichrecht meter (firmware_adapters/modbus/driver.py ModbusSource
    with ``signed_meter = true``): the session opens and closes the meter's own signed
    transaction; the record it signs is what the vehicle checks (docs/station.md)."""

    async def begin_transaction(self, unit: int, metadata: Mapping[str, object] = ...
                                ) -> None: ...

    async def end_transaction(self, unit: int) -> str: ...


def cp_state(status: ChargerStatus | None) -> str | None:
    """The IEC 61851 letter of a status (None: unknown)."""
    if status is None:
        return None
    value = status.state.value
    return value if isinstance(value, str) else status.state.name


class ReadingHub:
    """One tap per source on the runtime, fanned out to the service's listeners (a
    connector's meter, the vehicle's energy count and plug signal)."""

    def __init__(self, tap: Callable[[str], asyncio.Queue[Reading]],
                 source_ids: Iterable[str] = ()) -> None:
        self._tap = tap
        self._listeners: dict[str, list[Callable[[Reading], None]]] = {}
        # Tapped now, before the sources start, not when the service has set itself up:
        # what a source says first (an Eichrecht meter's key, said once per connection)
        # would be gone by then. An id that is not a source fails in run(), as before.
        self._early: dict[str, asyncio.Queue[Reading]] = {}
        for source_id in source_ids:
            with contextlib.suppress(ConfigError):
                self._early[source_id] = tap(source_id)

    def listen(self, source_id: str, listener: Callable[[Reading], None]) -> None:
        self._listeners.setdefault(source_id, []).append(listener)

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            for source_id, listeners in self._listeners.items():
                queue = self._early.pop(source_id, None) or self._tap(source_id)
                tg.create_task(self._pump(queue, listeners),
                               name=f"channel.readings[{source_id}]")

    @staticmethod
    async def _pump(queue: asyncio.Queue[Reading],
                    listeners: list[Callable[[Reading], None]]) -> None:
        while True:
            reading = await queue.get()
            for listener in listeners:
                listener(reading)


@dataclass
class Context:
    """Everything a role service needs from the agent around it."""

    device_id: str
    keys: DeviceKeys
    settings: ChannelSettings
    settlement: SettlementConfig
    client: SettlementClient
    mux: TopicMux
    state_dir: Path
    hub: ReadingHub
    emit: Callable[[Event], Awaitable[None]]
    on_error: Callable[[str, BaseException], None]
    registry: FleetRegistry | None = None
    counters: Counter[str] = field(default_factory=Counter)
    blocks: NewBlocks | None = None   # the chain head, shared by the sessions' watches

    def __post_init__(self) -> None:
        self._said: dict[str, float] = {}
        self.ready = asyncio.Event()   # the role subscribed to its topics: it serves

    async def event(self, code: str, message: str, **details: int | str) -> None:
        """A signed event envelope (session-started, session-refused, session-settled ...)."""
        log.info("%s: %s", code, message)
        await self.emit(Event(code, message[:500], time.time_ns(), "channel",
                              tuple(sorted(details.items()))))

    async def hostile(self, what: str, reason: str, detail: str = "") -> None:
        """Bad input on a session topic: a counter always, a log line and a signed event
        at most once a minute per reason (a flood must not fill the spool), and on."""
        key = f"{what}-{reason}"
        self.counters[key] += 1
        now = time.monotonic()
        if now - self._said.get(key, -EVENT_LIMIT_S) < EVENT_LIMIT_S:
            return
        self._said[key] = now
        log.warning("refused %s: %s %s", what, reason, detail)
        await self.event("session-input-rejected", f"{what} refused: {reason} {detail}"[:300],
                         input=what, reason=reason, count=self.counters[key])


HISTORY = 10   # ended sessions that `status` still shows (a restart reads them back)

@dataclass
class SessionView:
    """One session as ``edge-agent status`` shows it."""

    record: SessionRecord
    channel: Channel | None = None
    job: JobRecord | None = None
    end_reason: str = ""

    def status(self, peer: str) -> ChannelStatus:
        channel = self.channel
        cosigned = channel.cosigned if channel is not None else None
        state = cosigned.state if cosigned is not None else None
        job = self.job
        phase = channel.phase.value if channel is not None else "idle"
        if job is not None and job.state in ("settled", "nothing-to-settle"):
            phase = "done"
        return ChannelStatus(
            channel_id=self.record.channel_id.hex(), peer=peer, state=phase,
            nonce=state.nonce if state else (job.nonce if job else 0),
            energy_wh=state.wh if state else (job.wh if job else 0),
            t_ev=state.t_ev if state else (job.t_ev if job else 0),
            t_cs=state.t_cs if state else (job.t_cs if job else 0),
            connector=self.record.connector,
            settlement=job.state if job is not None else "",
            end_reason=self.end_reason or (job.end_reason if job else ""))
