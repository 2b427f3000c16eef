"""The supervisor: one TaskGroup wiring sources -> batcher/signer -> spool -> uplink.

Tasks (named, none fire-and-forget; STYLE "one supervisor")::

    source[<id>]      each configured source, restarted with back-off on AdapterError
    telemetry.seal    Batcher -> Sealer -> Spool.commit           (agent.telemetry)
    telemetry.publish Spool -> Uplink, delete on PUBACK           (agent.telemetry)
    uplink            the MQTT connection, reconnects             (agent.uplink)
    status            status file, sd_notify WATCHDOG/STATUS      (agent.status)
    metrics           optional Prometheus endpoint                (agent.metrics)
    channel           the channel service when [channel] is configured: offers, requests,
                      one channel[<id>] per session, settlement jobs (agent/channel/service.py)

Backpressure: a source's ``emit`` awaits the pipeline's bounded queue, so a source that
outruns the disk slows down instead of growing memory.

Shutdown (SIGTERM, SIGINT or ``stop``): sources stop first, then whatever the batcher holds
is sealed and committed, publishing gets a short grace period to drain, and the spool is
closed. Nothing committed is lost: what was not acknowledged goes out after the restart.

Errors: an AdapterError in a source is counted, logged, shown in the status, and the source
is restarted after a capped back-off; any other exception is a bug and ends the agent (the
service manager restarts it), never silently swallowed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from agent import __version__
from agent.backoff import Backoff
from agent.config import Config, load_config
from agent.envelope import Sealer
from agent.errors import (
    AdapterError,
    AdapterUnavailable,
    ConfigError,
    EdgeAgentError,
    UplinkError,
)
from agent.keys import DeviceKeys, KeyStore
from agent.readings import Event, Reading
from agent.sdnotify import Notifier, watchdog_interval_s
from agent.spool import Spool, SpoolConfig
from agent.status import (
    AgentStatus,
    ErrorLog,
    ErrorRecord,
    RateMeter,
    SourceStatus,
    SpoolStatus,
    StatusConfig,
    UplinkStatus,
    publish_status,
    status_path,
)
from agent.telemetry import Pipeline, SpoolWorker
from agent.uplink import MqttConfig, Uplink
from firmware_adapters.base import Source
from firmware_adapters.registry import source_class

if TYPE_CHECKING:
    from web3 import Web3

    from agent.channel.context import Charger
    from agent.channel.service import ChannelService, ServiceSettings
    from agent.metrics import MetricsConfig, MetricsServer

log = logging.getLogger("edge_agent.runtime")

DRAIN_GRACE_S = 3.0
SOURCE_BACKOFF_INITIAL_S = 1.0
SOURCE_BACKOFF_MAX_S = 60.0


class _Stop(Exception):
    """Raised inside the TaskGroup to end it cleanly."""


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
    channel: ServiceSettings | None = None

    @classmethod
    def from_config(cls, config: Config, device_id: str) -> Settings:
        metrics = None
        if config.section("metrics").data:  # not configured: not even imported (start-up)
            from agent.metrics import MetricsConfig

            metrics = MetricsConfig.from_table(config.section("metrics"))
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
                   metrics=metrics, channel=channel)


def build_sources(config: Config) -> list[SourceRunner]:
    """Instantiate every ``[[sources]]`` entry; config errors surface before anything runs."""
    runners = []
    for entry in config.sources:
        cls = source_class(entry.kind)
        source = cls.from_options(entry.id, entry.options, entry.where)
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
        chargers[entry.id] = cls.from_options(entry.id, entry.options,  # type: ignore[attr-defined]
                                              entry.where)
    return chargers


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
        self.status_file = status_path(config.device.state_dir, self.status_config.path)
        self.notifier = notifier or Notifier()
        self.sources = sources if sources is not None else build_sources(config)
        for runner in self.sources:  # e.g. the odometer's last value survives a restart
            runner.source.attach_state(config.device.state_dir)
        self.errors = ErrorLog()
        self.started_ns = time.time_ns()
        self.state = "starting"
        self.uplink: Uplink | None = None
        self.pipeline: Pipeline | None = None
        self.ready = asyncio.Event()
        self.channel: ChannelService | None = None
        if self.channel_settings is not None:
            from agent.channel.service import ChannelService

            self.channel = ChannelService(
                self.channel_settings, device_id=self.device_id, keys=keys, config=config,
                chargers=chargers if chargers is not None else build_chargers(config),
                tap=self.tap, emit=self._emit, on_error=self._error, node=node)

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
    async def run(self, stop: asyncio.Event) -> None:
        spool = await asyncio.to_thread(Spool.open, self.spool_config)
        worker = SpoolWorker(spool)
        sealer = Sealer(self.keys.identity, self.device_id, os.urandom(16),
                        spool.next_seq, spool.head)
        try:
            async with Uplink(self.mqtt) as uplink:
                self.uplink = uplink
                self.pipeline = Pipeline(sealer, worker, uplink, self.device_id,
                                         batch=self.config.batch)
                await self._supervise(stop)
        finally:
            self.state = "stopped"
            await asyncio.to_thread(worker.close)
            with contextlib.suppress(EdgeAgentError):
                from agent.status import write_status
                write_status(self.status_file, self.status())
            self.notifier.close()

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
                metrics = self._metrics_server()
                if metrics is not None:
                    tg.create_task(self._serve_metrics(metrics), name="metrics")
                if self.channel is not None:
                    assert self.uplink is not None
                    tg.create_task(self.channel.run(self.uplink, self.mqtt.status_topic),
                                   name="channel")
                self.state = "running"
                self.notifier.ready(f"{self.role} {self.device_id}: running")
                self.ready.set()
                await stop.wait()
                self.state = "stopping"
                self.notifier.stopping("flushing the spool")
                for task in source_tasks:
                    task.cancel()
                with contextlib.suppress(TimeoutError):
                    await pipeline.wait_drained(DRAIN_GRACE_S)
                raise _Stop
        except* _Stop:
            pass

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
        log.warning("source[%s]: %s (%s); retrying", source.id, exc, exc.reason)

    async def _serve_metrics(self, server: MetricsServer) -> None:
        """Metrics are optional: a port already taken is an error in the status, not a
        reason to stop streaming readings."""
        try:
            await server.serve()
        except OSError as exc:
            error = UplinkError(f"metrics endpoint {server.host}:{server.port} not served: "
                                f"{exc.strerror}", reason="metrics-bind")
            self.errors.add(time.time_ns(), "metrics", error)
            log.warning("%s", error)

    async def _status_task(self) -> None:
        def on_error(exc: BaseException) -> None:
            self.errors.add(time.time_ns(), "status", exc)

        await publish_status(self.status, self.status_file, self.status_config.interval_s,
                             self.notifier, watchdog_interval_s(), on_error)

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
                counters=dict(runner.source.counters), last_error=runner.last_error))
        spool = None
        if self.pipeline is not None:
            s = self.pipeline.spool
            spool = SpoolStatus(depth=s.rows, bytes=s.total_bytes,
                                capacity_bytes=self.spool_config.max_bytes,
                                next_seq=self.pipeline.sealer.next_seq,
                                dropped=s.counters.get("dropped", 0))
        uplink = None
        if self.uplink is not None:
            up = self.uplink
            uplink = UplinkStatus(
                state="connected" if up.connected else "connecting",
                broker=f"{self.mqtt.host}:{self.mqtt.port}",
                published=up.counters.get("published", 0),
                reconnects=max(up.epoch - 1, 0))
        return AgentStatus(
            device_id=self.device_id, role=self.role, pid=os.getpid(), state=self.state,
            started_ns=self.started_ns, updated_ns=now,
            interval_s=self.status_config.interval_s, version=__version__,
            sources=tuple(sources), spool=spool, uplink=uplink,
            channels=self.channel.status() if self.channel is not None else (),
            errors=self.errors.snapshot())


def load_keys(config: Config) -> DeviceKeys:
    return KeyStore(config.device.state_dir).load()


async def run_agent(config_path: str | os.PathLike[str],
                    install_signals: bool = True) -> None:
    """``edge-agent run``: load config and keys, run until SIGTERM/SIGINT."""
    config = load_config(config_path)
    keys = load_keys(config)
    runtime = Runtime(config, keys)
    stop = asyncio.Event()
    if install_signals:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
    log.info("edge-agent %s: %s %s starting", __version__, runtime.role, runtime.device_id)
    await runtime.run(stop)
