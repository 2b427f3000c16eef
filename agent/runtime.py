"""The supervisor: one TaskGroup wiring sources -> batcher/signer -> spool -> uplink.

Tasks (named, none fire-and-forget; STYLE "one supervisor")::

    source[<id>]      each configured source, restarted with back-off on AdapterError
    telemetry.seal    Batcher -> Sealer -> Spool.commit           (agent.telemetry)
    telemetry.publish Spool -> Uplink, delete on PUBACK           (agent.telemetry)
    uplink            the MQTT connection, reconnects             (agent.uplink)
    status            status file, sd_notify WATCHDOG/STATUS      (agent.status_publisher)
    chain-head        the signed chain head in the retained status (agent.chain_head)
    fleet-commit      with keep_until = "fleet-commit": follow commit marks (agent.fleet_commit)
    metrics           optional Prometheus endpoint                (agent.metrics)
    channel           the channel service when [channel] is configured: offers, requests,
                      one channel[<id>] per session, settlement jobs (agent/channel/service.py)

Backpressure: a source's ``emit`` awaits the pipeline's bounded queue, so a source that
outruns the disk slows down instead of growing memory.

Shutdown (SIGTERM, SIGINT or ``stop``): sources stop first, then whatever the batcher holds
is sealed and committed, publishing gets a short grace period to drain, and the spool is
closed. Nothing committed is lost: what was not acknowledged goes out after the restart.

A full disk at start-up (the spool cannot be opened: ``disk-full``) does not stop the agent:
it starts, reports it (log, status, sd_notify), retries the spool with back-off, and starts
the sources and the uplink once space frees; the first envelope then is a signed
``spool-disk-full`` event naming the stretch of time in which no reading was taken. (A
spool that is damaged, ``spool-corrupt``, still ends the agent: waiting will not fix it.)

Errors: an AdapterError in a source is counted, logged, shown in the status, and the source
is restarted after a capped back-off; any other exception is a bug and ends the agent (the
service manager restarts it), never silently swallowed.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from agent import __version__
from agent.backoff import Backoff
from agent.chain_head import HeadStatus, publish_heads
from agent.config import Config, load_config
from agent.envelope import Sealer
from agent.errors import (
    AdapterError,
    AdapterUnavailable,
    ConfigError,
    EdgeAgentError,
    SpoolError,
    UplinkError,
)
from agent.keys import DeviceKeys, KeyStore
from agent.logsetup import StatusFeed
from agent.readings import Event, Reading
from agent.sdnotify import Notifier, watchdog_interval_s
from agent.spool import Spool, SpoolConfig
from agent.statedir import check_state_dir, lock_state_dir, release_state_dir
from agent.status import (
    AgentStatus,
    ErrorLog,
    ErrorRecord,
    RateMeter,
    SourceStatus,
    SpoolStatus,
    StatusConfig,
    UplinkStatus,
    status_path,
    write_status,
)
from agent.status_publisher import publish_status
from agent.telemetry import Pipeline, SpoolWorker
from agent.uplink import MqttConfig, Uplink
from firmware_adapters.base import Source
from firmware_adapters.registry import kind_roles, kinds_for_role, source_class

if TYPE_CHECKING:
    from web3 import Web3

    from agent.channel.context import Charger, TransactionMeter
    from agent.channel.mux import TopicMux
    from agent.channel.service import ChannelService, ServiceSettings
    from agent.fleet_keys import FleetRegistry
    from agent.metrics import MetricsConfig, MetricsServer

log = logging.getLogger("edge_agent.runtime")

DRAIN_GRACE_S = 3.0
SPOOL_RETRY_INITIAL_S = 1.0  # opening the spool on a full disk: retried with back-off
SPOOL_RETRY_MAX_S = 30.0
SOURCE_BACKOFF_INITIAL_S = 1.0
SOURCE_BACKOFF_MAX_S = 60.0


class _Stop(Exception):
    """Raised inside the TaskGroup to end it cleanly."""


_running: contextvars.ContextVar[Runtime | None] = contextvars.ContextVar(
    "edge_agent_runtime", default=None)


def _recorded(where: str, exc: BaseException) -> dict[str, object]:
    """``extra=`` for a log line whose error the runtime put in its error log itself."""
    reason = exc.reason if isinstance(exc, EdgeAgentError) else type(exc).__name__
    return {"status_recorded": True, "where": where, "reason": reason}


@dataclass
class SourceRunner:
    """One source under supervision: restart on AdapterError, count what it emits."""

    source: Source
    kind: str
    state: str = "starting"
    readings: int = 0
    last_error: ErrorRecord | None = None

    def __post_init__(self) -> None:
        self.rate = RateMeter()
        self.taps: list[asyncio.Queue[Reading]] = []


@dataclass(frozen=True, slots=True)
class Settings:
    """Every section the runtime reads, validated (``edge-agent config check`` uses this
    too, so a bad ``[mqtt]`` table is found before ``run``)."""

    mqtt: MqttConfig
    spool: SpoolConfig
    status: StatusConfig
    metrics: MetricsConfig | None
    registry: FleetRegistry | None = None   # [device] registry, loaded and checked
    channel: ServiceSettings | None = None

    @classmethod
    def from_config(cls, config: Config, device_id: str) -> Settings:
        metrics = None
        if config.section("metrics").data:  # not configured: not even imported (start-up)
            from agent.metrics import MetricsConfig

            metrics = MetricsConfig.from_table(config.section("metrics"))
        registry = None
        if config.device.registry is not None:
            from agent.fleet_keys import FleetRegistry

            registry = FleetRegistry.load(config.device.registry)
        channel = None
        if config.section("channel").data:  # charging: validated here, imported only then
            from agent.channel.service import ServiceSettings

            channel = ServiceSettings.from_config(config)
        elif config.chargers:
            raise ConfigError(file=config.path, key="chargers", expected="a [channel] section "
                              "that uses the chargers", found="no [channel]")
        return cls(mqtt=MqttConfig.from_table(config.section("mqtt"), device_id),
                   spool=SpoolConfig.from_table(config.section("spool"),
                                                config.device.state_dir),
                   status=StatusConfig.from_table(config.section("status")),
                   metrics=metrics, registry=registry, channel=channel)


def _located(exc: ConfigError, where: str, table: str) -> ConfigError:
    """``exc`` with the file and the table's path in front, when it did not say them (a
    kind's registry, a meter map's loader: code that never saw the file)."""
    if exc.file is not None or str(exc).startswith(where):
        return exc
    key = exc.key if exc.key is None or exc.key.startswith(table) else \
        f"{table}.{exc.key.removeprefix('sources.')}"
    if exc.expected is None:
        return ConfigError(f"{where}: {table}: {exc}", file=where, key=key)
    return ConfigError(file=where, key=key, expected=exc.expected, found=exc.found)


def build_sources(config: Config) -> list[SourceRunner]:
    """Instantiate every ``[[sources]]`` entry; config errors surface before anything runs,
    including two sources that claim one resource (a serial port) with different settings:
    retrying cannot fix that, so it is a ConfigError, not an adapter error."""
    runners = []
    claimed: dict[str, tuple[str, object]] = {}
    role = config.device.role
    for entry in config.sources:
        roles = kind_roles(entry.kind)
        if roles and role not in roles:  # a meter on a car, an OBD reader on a station
            raise ConfigError(
                f"{entry.where}: sources.{entry.id}.kind: {entry.kind} is a source for the "
                f"{' and '.join(sorted(roles))} role, and [device] role is {role}; "
                f"kinds for a {role}: {', '.join(kinds_for_role(role))}",
                file=entry.where, key=f"sources.{entry.id}.kind",
                expected=f"a {role} source kind", found=entry.kind)
        try:
            cls = source_class(entry.kind)
            source = cls.from_options(entry.id, entry.options, entry.where)
        except ConfigError as exc:
            raise _located(exc, entry.where, f"sources.{entry.id}") from None
        for resource, settings in source.claims().items():
            other = claimed.setdefault(resource, (entry.id, settings))
            if other[1] != settings:
                raise ConfigError(file=entry.where, key=f"sources.{entry.id}",
                                  expected=f"the settings of source {other[0]!r} on "
                                  f"{resource} ({other[1]})", found=str(settings))
        runners.append(SourceRunner(source, entry.kind))
    return runners


def build_chargers(config: Config) -> dict[str, Charger]:
    """Instantiate every ``[[chargers]]`` entry (firmware_adapters/evse through the registry
    of kinds); config errors surface before anything runs."""
    if not config.chargers:
        return {}
    from firmware_adapters.registry import charger_class

    chargers: dict[str, Charger] = {}
    for entry in config.chargers:
        cls = charger_class(entry.kind)
        # the registry checks it is a charger class (firmware_adapters/evse/base.py Charger)
        chargers[entry.id] = cls.from_options(entry.id, entry.options,
                                              entry.where)
    return chargers


def transaction_meters(sources: list[SourceRunner]) -> dict[str, TransactionMeter]:
    """The sources whose meters run signed (Eichrecht) transactions (the Modbus sources:
    ``begin_transaction`` / ``end_transaction``, docs/station.md); the station's channel
    service opens and closes one per session on a meter that says it signs."""
    return {r.source.id: r.source for r in sources  # type: ignore[misc]
            if callable(getattr(r.source, "begin_transaction", None))}


class Runtime:
    """The agent for one device. ``await runtime.run(stop)`` until ``stop`` is set.

    ``sources`` and ``chargers`` replace the ones config names (a HIL rig keeps its
    simulated hardware across agent restarts); ``node`` is the settlement node to use when
    ``[settlement] node`` is not configured (the demo's in-process chain)."""

    def __init__(self, config: Config, keys: DeviceKeys, *,
                 notifier: Notifier | None = None,
                 sources: list[SourceRunner] | None = None,
                 chargers: Mapping[str, Charger] | None = None,
                 node: Web3 | None = None) -> None:
        self.config = config
        self.keys = keys
        self.device_id = config.device.id or keys.device_id
        self.role = config.device.role
        settings = Settings.from_config(config, self.device_id)
        self.mqtt, self.spool_config = settings.mqtt, settings.spool
        self.channel_settings = settings.channel
        self.status_config, self.metrics_config = settings.status, settings.metrics
        self.registry = settings.registry   # the fleet registry, for the channel service
        self.status_file = status_path(config.device.state_dir, self.status_config.path,
                                       run_dir=None)
        self.notifier = notifier or Notifier()
        self.sources = sources if sources is not None else build_sources(config)
        for runner in self.sources:  # e.g. the odometer's last value survives a restart
            runner.source.attach_state(config.device.state_dir)
        self.errors = ErrorLog()
        self.started_ns = time.time_ns()
        self.state = "starting"
        self.uplink: Uplink | None = None
        self.heads: HeadStatus | None = None
        self.pipeline: Pipeline | None = None
        self.ready = asyncio.Event()
        self.spool_state = "ok"  # "disk-full" while the spool cannot be opened
        self.channel: ChannelService | None = None
        if self.channel_settings is not None:
            from agent.channel.service import ChannelService

            self.channel = ChannelService(
                self.channel_settings, device_id=self.device_id, keys=keys, config=config,
                chargers=chargers if chargers is not None else build_chargers(config),
                tap=self.tap, emit=self._emit, on_error=self._error, node=node,
                meters=transaction_meters(self.sources))

    async def _emit(self, event: Event) -> None:
        assert self.pipeline is not None
        await self.pipeline.emit(event)

    def _error(self, where: str, exc: BaseException) -> None:
        self.errors.add(time.time_ns(), where, exc)

    def tap(self, source_id: str, maxsize: int = 1000) -> asyncio.Queue[Reading]:
        """A queue that also receives every reading of one source (the station's channel
        session reads the meter this way). When the consumer lags, the oldest readings
        are dropped from the tap only, never from the telemetry. (The channel service reads
        a connector's meter and the vehicle's energy signals this way.)"""
        for runner in self.sources:
            if runner.source.id == source_id:
                queue: asyncio.Queue[Reading] = asyncio.Queue(maxsize)
                runner.taps.append(queue)
                return queue
        raise ConfigError(key="sources.id", expected="a configured source", found=source_id)

    # -- the supervisor --------------------------------------------------------------------
    async def run(self, stop: asyncio.Event,
                  on_locked: Callable[[], None] | None = None) -> None:
        # One agent per state directory (agent/statedir.py): a second one would fork the chain.
        lock_state_dir(self.config.device.state_dir, "this agent")
        if on_locked is not None:  # `run` says "starting" only for an agent that starts
            on_locked()
        # Every warning the log shows reaches the status too (issue 15.4); tasks started
        # below inherit the context, so a process with two agents keeps their errors apart.
        token = _running.set(self)
        feed = StatusFeed(self.errors.add_entry,
                          accept=lambda record: _running.get() in (None, self))
        logging.getLogger().addHandler(feed)
        try:
            await self._run(stop)
        finally:
            logging.getLogger().removeHandler(feed)
            _running.reset(token)
            release_state_dir(self.config.device.state_dir)

    async def _run(self, stop: asyncio.Event) -> None:
        opened = await self._open_spool(stop)
        if opened is None:  # stopped while waiting for disk space
            self.state = "stopped"
            self.notifier.close()
            return
        spool, waited = opened
        worker = SpoolWorker(spool)
        sealer = Sealer(self.keys.identity, self.device_id, os.urandom(16),
                        spool.next_seq, spool.head)
        self.heads = HeadStatus(self.keys.identity, self.device_id, self.mqtt.client_id,
                                lambda: (spool.next_seq, spool.head))
        try:
            async with Uplink(self.mqtt, status_payload=self.heads.payload) as uplink:
                self.uplink = uplink
                self.pipeline = Pipeline(sealer, worker, uplink, self.device_id,
                                         batch=self.config.batch)
                if waited is not None:
                    await self.pipeline.emit(_disk_full_event(*waited))
                await self._supervise(stop)
        finally:
            self.state = "stopped"
            for runner in self.sources:  # the last snapshot says what is true after exit
                runner.state = "stopped"
            await asyncio.to_thread(worker.close)
            with contextlib.suppress(EdgeAgentError):
                write_status(self.status_file, self.status())
            self.notifier.close()

    async def _open_spool(self, stop: asyncio.Event
                          ) -> tuple[Spool, tuple[int, int] | None] | None:
        """The spool, and (from, to) ns if it had to wait for disk space; None if stopped
        while waiting. Only ``disk-full`` is waited out; any other SpoolError ends the
        agent. The status task runs while waiting, so the status and the watchdog say so."""
        try:
            return await asyncio.to_thread(Spool.open, self.spool_config), None
        except SpoolError as exc:
            if exc.reason != "disk-full":
                raise
            first = exc
        since = time.time_ns()
        self.state, self.spool_state = "waiting", "disk-full"
        self.errors.add(since, "spool", first)
        log.error("%s; the agent waits for free space (no readings are taken meanwhile)", first)
        self.notifier.ready(f"{self.role} {self.device_id}: disk full, waiting for space")
        backoff = Backoff(SPOOL_RETRY_INITIAL_S, SPOOL_RETRY_MAX_S)
        async with asyncio.TaskGroup() as tg:
            status = tg.create_task(self._status_task(), name="status")
            try:
                while True:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(backoff.next()):
                            await stop.wait()
                    if stop.is_set():
                        return None
                    try:
                        spool = await asyncio.to_thread(Spool.open, self.spool_config)
                        break
                    except SpoolError as exc:
                        if exc.reason != "disk-full":
                            raise
            finally:
                status.cancel()
        self.state, self.spool_state = "starting", "ok"
        log.info("spool open: disk space is back after %.0f s", (time.time_ns() - since) / 1e9)
        return spool, (since, time.time_ns())

    async def _supervise(self, stop: asyncio.Event) -> None:
        assert self.pipeline is not None
        pipeline = self.pipeline
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(pipeline.run_sealer(), name="telemetry.seal")
                tg.create_task(pipeline.run_publisher(), name="telemetry.publish")
                source_tasks = [tg.create_task(self._run_source(r), name=f"source[{r.source.id}]")
                                for r in self.sources]
                tg.create_task(self._status_task(), name="status")
                if self.mqtt.status_topic and self.uplink and self.heads:
                    tg.create_task(publish_heads(self.uplink, self.mqtt.status_topic, self.heads,
                                                 self.spool_config.head_interval_s),
                                   name="chain-head")
                # One reader of the uplink's incoming messages, routing by topic, shared by
                # the commit follower and the channel service (agent.channel.mux). With a
                # channel, the channel service runs it (where it always did: after its
                # routes exist); the follower's route exists from its subscribe on.
                mux = None
                if self.uplink is not None and (self.spool_config.fleet_commit
                                                or self.channel is not None):
                    from agent.channel.mux import TopicMux

                    mux = TopicMux(self.uplink, self.mqtt.status_topic)
                    if self.channel is None:
                        tg.create_task(mux.run(), name="mux")
                if self.spool_config.fleet_commit:
                    assert mux is not None
                    tg.create_task(self._follow_commits(mux), name="fleet-commit")
                metrics = self._metrics_server()
                if metrics is not None:
                    tg.create_task(self._serve_metrics(metrics), name="metrics")
                producers = list(source_tasks)   # what emits into the pipeline
                if self.channel is not None:
                    assert self.uplink is not None
                    producers.append(tg.create_task(
                        self.channel.run(self.uplink, self.mqtt.status_topic, mux),
                        name="channel"))
                self.state = "running"
                self.notifier.ready(f"{self.role} {self.device_id}: running")
                self.ready.set()
                await stop.wait()
                self.state = "stopping"
                self.notifier.stopping("flushing the spool")
                # The producers end before the last flush, so nothing is sealed after it
                # (an envelope committed as the publisher stops is safe in the spool, but
                # it leaves only with the next start). A cancel cannot hang this: bounded.
                for task in producers:
                    task.cancel()
                if producers:
                    await asyncio.wait(producers, timeout=DRAIN_GRACE_S)
                with contextlib.suppress(TimeoutError):
                    await pipeline.wait_drained(DRAIN_GRACE_S)
                raise _Stop
        except* _Stop:
            pass

    async def _follow_commits(self, mux: TopicMux) -> None:
        from agent.fleet_commit import CommitFollower

        assert self.uplink is not None and self.pipeline is not None
        worker, spool = self.pipeline.worker, self.pipeline.spool
        self.commits = CommitFollower(self.device_id, self.spool_config.commit_keys)

        async def delete(seq: int, digest: bytes) -> int:
            return await worker.call(spool.delete_committed, seq, digest)

        await self.commits.run(mux, delete)

    async def _run_source(self, runner: SourceRunner) -> None:
        source = runner.source
        backoff = Backoff(SOURCE_BACKOFF_INITIAL_S, SOURCE_BACKOFF_MAX_S)
        assert self.pipeline is not None
        pipeline_emit = self.pipeline.emit

        async def emit(item: Reading | Event) -> None:
            if isinstance(item, Reading):
                runner.readings += 1
                runner.state = "running"
                for queue in runner.taps:
                    if queue.full():
                        queue.get_nowait()
                    queue.put_nowait(item)
            await pipeline_emit(item)

        while True:
            runner.state = "running"
            log.debug("source[%s] (%s): started", source.id, runner.kind)
            try:
                await source.run(emit)
                runner.state = "stopped"
                return
            except AdapterUnavailable as exc:
                if exc.reason == "missing-dependency":
                    raise  # installing a package will not happen by waiting
                self._source_failed(runner, exc)
            except AdapterError as exc:
                self._source_failed(runner, exc)
            await asyncio.sleep(backoff.next())

    def _source_failed(self, runner: SourceRunner, exc: EdgeAgentError) -> None:
        source = runner.source
        runner.state = "retrying"
        runner.last_error = self.errors.add(time.time_ns(), f"source[{source.id}]", exc)
        source.counters[f"error_{exc.reason}"] += 1
        log.warning("source[%s]: %s (%s); retrying", source.id, exc, exc.reason,
                    extra=_recorded(f"source[{source.id}]", exc))

    async def _serve_metrics(self, server: MetricsServer) -> None:
        """Metrics are optional: a port already taken is an error in the status, not a
        reason to stop streaming readings."""
        try:
            await server.serve()
        except OSError as exc:
            error = UplinkError(f"metrics endpoint {server.host}:{server.port} not served: "
                                f"{exc.strerror}", reason="metrics-bind")
            self.errors.add(time.time_ns(), "metrics", error)
            log.warning("%s", error, extra=_recorded("metrics", error))

    async def _status_task(self) -> None:
        def on_error(exc: BaseException) -> None:
            self.errors.add(time.time_ns(), "status", exc)
            log.warning("status: %s", exc, extra=_recorded("status", exc))

        # Not under systemd: no STATUS= line to format every tick.
        notifier = self.notifier if self.notifier.enabled else None
        await publish_status(self.status, self.status_file, self.status_config.interval_s,
                             notifier, watchdog_interval_s(), on_error)

    def _metrics_server(self) -> MetricsServer | None:
        cfg = self.metrics_config
        if cfg is None or not cfg.enabled:
            return None
        from agent.metrics import MetricsServer

        return MetricsServer(self.status, cfg.host, cfg.port)

    # -- status snapshot ---------------------------------------------------------------
    def status(self) -> AgentStatus:
        now = time.time_ns()
        sources = []
        for runner in self.sources:
            runner.rate.observe(runner.readings, now)
            sources.append(SourceStatus(
                id=runner.source.id, kind=runner.kind, state=runner.state,
                readings=runner.readings, rate_hz=round(runner.rate.rate(), 2),
                counters=dict(runner.source.counters), last_error=runner.last_error,
                meters=runner.source.identities(),
                requests=dict(runner.source.requests)))
        spool = None
        if self.pipeline is not None:
            p = self.pipeline
            s = p.spool
            spool = SpoolStatus(depth=p.depth, bytes=s.total_bytes,
                                capacity_bytes=self.spool_config.max_bytes,
                                next_seq=p.sealer.next_seq,
                                dropped=s.counters.get("dropped", 0),
                                state="disk-full" if p.disk_full else "ok",
                                lost=p.counters.get("envelopes_lost_uncommitted", 0))
        elif self.spool_state != "ok":
            spool = SpoolStatus(depth=0, bytes=0, capacity_bytes=self.spool_config.max_bytes,
                                next_seq=0, state=self.spool_state)
        uplink = None
        if self.uplink is not None:
            up = self.uplink
            uplink = UplinkStatus(
                state="connected" if up.connected else
                "stopped" if self.state == "stopped" else "connecting",
                broker=f"{self.mqtt.host}:{self.mqtt.port}",
                published=up.counters.get("published", 0),
                reconnects=max(up.epoch - 1, 0),
                protocol=_protocol_name(up))
        return AgentStatus(
            device_id=self.device_id, role=self.role, pid=os.getpid(), state=self.state,
            started_ns=self.started_ns, updated_ns=now,
            interval_s=self.status_config.interval_s, version=__version__,
            sources=tuple(sources), spool=spool, uplink=uplink,
            channels=self.channel.status() if self.channel is not None else (),
            errors=self.errors.snapshot())


def _protocol_name(up: Uplink) -> str:
    if up.protocol is None:
        return ""
    if up.protocol == 5:
        return "5"
    return "3.1.1 (broker refused 5)" if up.downgraded else "3.1.1"


def _disk_full_event(since_ns: int, until_ns: int) -> Event:
    """The signed record of a start-up on a full disk: no reading was taken meanwhile."""
    return Event("spool-disk-full",
                 f"the spool could not be opened for {(until_ns - since_ns) / 1e9:.0f} s "
                 "(disk full): no readings were taken", until_ns, source="spool",
                 details=(("from_ns", since_ns), ("to_ns", until_ns)))


def load_keys(config: Config) -> DeviceKeys:
    return KeyStore(config.device.state_dir).load()


async def run_agent(config_path: str | os.PathLike[str],
                    install_signals: bool = True) -> None:
    """``edge-agent run``: load config and keys, run until SIGTERM/SIGINT."""
    config = load_config(config_path)
    check_state_dir(config.device.state_dir, create=False)
    keys = load_keys(config)
    runtime = Runtime(config, keys)
    stop = asyncio.Event()
    if install_signals:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
    def starting() -> None:
        log.info("edge-agent %s: %s %s starting (pid %d, state %s)", __version__, runtime.role,
                 runtime.device_id, os.getpid(), config.device.state_dir)

    try:
        await runtime.run(stop, on_locked=starting)
    finally:
        if runtime.state == "stopped":   # it ran (a refused start never got that far)
            why = "on request" if stop.is_set() else "after an error"
            log.info("edge-agent %s %s stopped %s", runtime.role, runtime.device_id, why)
