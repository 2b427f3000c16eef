"""MQTT uplink (DESIGN s4): one connection the whole agent shares, kept up for its lifetime.

Usage (the runtime, the channel session)::

    async with Uplink(MqttConfig.from_table(table, device_id)) as up:
        await up.publish(topic, payload)          # returns on PUBACK (QoS 1)
        await up.subscribe(channel_topic(cid, "ev"))
        async for message in up.messages():        # Incoming(topic, payload, retain)
            ...

The MQTT work is paho-mqtt's, through its public API only (agent.mqtt_connection drives
it with the event loop and classifies failures by type and reason code). What this module
adds, and why:

- MQTT 5 (``protocol = "auto"``, the default, or ``"5"``). With ``auto`` the uplink falls
  back to 3.1.1 only when the broker answers our CONNECT with "unsupported protocol
  version" (CONNACK 0x84, MQTT 5 s3.2.2.2; a 3.1.1 broker's return code 1, 3.1.1
  s3.2.2.3): a connection closed or timed out before CONNACK is a failure to retry, not a
  reason to downgrade. Every reconnect tries MQTT 5 first again; ``downgraded`` (and the
  status) say when the connection runs on 3.1.1. ``protocol = "5"`` never falls back.
  Why it matters: over 3.1.1 mosquitto acknowledges, then silently discards, a publish
  that its ACL denies; only MQTT 5's PUBACK 0x87 lets the row stay in the spool.
- QoS 1 everywhere: at least once, never silently lost.
- Persistent session: a fixed client id, clean start off and a session expiry (MQTT 5
  s3.1.2.11.2) or clean session off (3.1.1 s3.1.2.4), so the broker keeps our channel
  subscriptions and queues their messages while we are away.
- A fresh paho client per connection: the durable outbox is OUR spool, not paho's memory.
  After a reconnect the caller replays un-acknowledged rows from the spool in seq order
  (``telemetry.Pipeline``); paho never resends old mids on its own, so a duplicate at the
  subscriber can only be a QoS 1 redelivery of a message whose PUBACK we did not see.
- TLS with a CA and a client certificate (``ssl`` context built once). A failure to connect
  has a reason in ``UplinkError.reason`` (``tls-verify``, ``tls-handshake``,
  ``not-authorised``, ``unreachable``, ``timeout``, ``protocol-version``,
  ``connect-refused``) and is retried after a capped exponential back-off with jitter; the
  uplink never gives up and never crashes the agent.
- Last will + retained status topic: ``status_payload("online")`` on connect,
  ``("offline")`` on a clean exit, and the broker publishes the will (``("lost")``, made
  at each connect) when the connection dies. The default payload is
  ``{"state": ..., "client": ...}``; the fleet side can put the device's signed chain head
  in it through the ``status_payload`` hook.
- A PUBACK with a failure reason code (0x87 from an ACL) fails the publish with
  ``reason="not-authorised"``: the row stays in the spool.
- Keepalive: a half-open connection (peer frozen, cable pulled) is noticed within about
  2 x ``keepalive_s`` (2.25 x at worst), and every pending publish fails with
  ``reason="disconnected"``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import ssl
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.backoff import Backoff
from agent.errors import ConfigError, UplinkError
from agent.mqtt_connection import NOT_AUTHORISED, Connection, Incoming
from agent.options import Table, split_url
from agent.topics import status_topic

log = logging.getLogger("edge_agent.uplink")

RETRY_PAUSE_S = 0.05
# A connection the broker ends this soon after accepting it, SHORT_SESSION_STREAK times in a
# row, is taken for a session take-over (Uplink._session_ended).
SHORT_SESSION_S = 5.0
SHORT_SESSION_STREAK = 3
EXIT_GRACE_S = 2.0  # the "offline" status and a clean DISCONNECT at exit, at most
V5, V311 = MQTTProtocolVersion.MQTTv5, MQTTProtocolVersion.MQTTv311
StatusPayload = Callable[[str], bytes]


# --------------------------------------------------------------------------- config


@dataclass(frozen=True, slots=True)
class MqttConfig:
    """``[mqtt]``. ``url`` is ``mqtt://host:port`` or ``mqtts://host:port`` (TLS)."""

    host: str
    port: int
    client_id: str
    tls: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    protocol: str = "auto"  # "5", "3.1.1" or "auto" (5, falling back to 3.1.1)
    keepalive_s: int = 30
    session_expiry_s: int = 7 * 24 * 3600
    window: int = 32  # publishes awaiting PUBACK at most
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 60.0
    connect_timeout_s: float = 10.0
    publish_timeout_s: float = 30.0
    status_topic: str | None = None

    @classmethod
    def from_url(cls, url: str, client_id: str, **options: Any) -> MqttConfig:
        parts = split_url(url, "mqtt.url", "mqtt://host[:port] or mqtts://host[:port]")
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise ConfigError(key="mqtt.url", expected="mqtt://host[:port] or mqtts://...",
                              found=url)
        port = parts.port
        if port == 0:
            raise ConfigError(key="mqtt.url", expected="a port from 1 to 65535 after the host",
                              found=url)
        tls = parts.scheme == "mqtts"
        return cls(host=parts.hostname, port=port or (8883 if tls else 1883),
                   client_id=client_id, tls=tls, **options)

    @classmethod
    def from_table(cls, table: Table, device_id: str) -> MqttConfig:
        url = table.str("url")
        try:
            base = cls.from_url(url, table.str("client_id", device_id))
        except ConfigError as exc:
            raise table.error("url", exc.expected or "mqtt://host[:port] or mqtts://host[:port]",
                              url) from None

        def opt_path(name: str) -> Path | None:
            value = table.opt_str(name)
            return Path(value) if value else None

        value = cls(
            host=base.host, port=base.port, client_id=base.client_id, tls=base.tls,
            ca_file=opt_path("ca_file"), cert_file=opt_path("cert_file"),
            key_file=opt_path("key_file"), username=table.opt_str("username"),
            password=table.opt_str("password"),
            protocol=table.str("protocol", "auto", choices=("auto", "5", "3.1.1")),
            keepalive_s=table.int("keepalive_s", 30, min=2, max=3600),
            session_expiry_s=table.int("session_expiry_s", 7 * 24 * 3600, min=0),
            window=table.int("window", 32, min=1, max=1000),
            backoff_initial_s=table.float("backoff_initial_s", 0.5, min=0.01),
            backoff_max_s=table.float("backoff_max_s", 60.0, min=0.1),
            connect_timeout_s=table.float("connect_timeout_s", 10.0, min=0.5),
            publish_timeout_s=table.float("publish_timeout_s", 30.0, min=0.5),
            status_topic=status_topic(device_id),
        )
        table.reject_unknown()
        if value.cert_file and not value.key_file:
            raise table.error("key_file", "a key file with cert_file", None)
        if (value.ca_file or value.cert_file) and not value.tls:
            raise table.error("url", "mqtts:// when ca_file/cert_file are set", url)
        return value


# --------------------------------------------------------------------------- the uplink


class Uplink:
    """One MQTT connection kept up for the agent's lifetime. See the module docstring.

    ``status_payload(state)`` makes the retained status (``state`` is ``"online"``,
    ``"offline"`` or ``"lost"``, the last will); default: :meth:`default_status`."""

    def __init__(self, config: MqttConfig, *, rng: random.Random | None = None,
                 status_payload: StatusPayload | None = None) -> None:
        self.config = config
        # "online" | "offline" | "lost" -> the retained status / will payload (the agent's
        # carries its signed chain head: agent.chain_head)
        self._status_payload = status_payload
        self.counters: Counter[str] = Counter()
        self.last_error: UplinkError | None = None
        self.protocol: MQTTProtocolVersion | None = None  # of the live connection
        self.downgraded = False  # on 3.1.1 because the broker refused MQTT 5
        self.epoch = 0  # +1 per successful connection
        self.status_payload: StatusPayload = status_payload or self.default_status
        self._backoff = Backoff(config.backoff_initial_s, config.backoff_max_s, rng)
        self._short_sessions = 0  # connections in a row the broker ended soon after CONNACK
        self._conn: Connection | None = None
        self._connected = asyncio.Event()
        self._subscriptions: list[str] = []
        # Unbounded, as paho's was: a QoS 1 message is acknowledged once it is here, so
        # dropping one would lose it. The consumers (verifier, channel) keep up.
        self._incoming: asyncio.Queue[Incoming] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._tls: ssl.SSLContext | None = self._tls_context() if config.tls else None
        self._tg: asyncio.TaskGroup | None = None
        # Set on exit, besides cancelling the task: a cancel can be swallowed (Python
        # 3.11's wait_for, CPython gh-86296, in code we await); the loops check this too.
        self._closed = asyncio.Event()
        self._leaving = False  # __aexit__ has begun: no reconnect

    # -- lifecycle ----------------------------------------------------------------------
    async def __aenter__(self) -> Uplink:
        self._tg = asyncio.TaskGroup()
        await self._tg.__aenter__()
        self._task = self._tg.create_task(self.run(), name="uplink")
        return self

    async def __aexit__(self, *exc: object) -> None:
        # Say goodbye on the live connection first ("offline", then DISCONNECT, so the
        # broker drops our will), and only then end the session: setting _closed first
        # let the session close the socket under the goodbye, and the broker published
        # "lost". _leaving keeps the session from reconnecting meanwhile.
        self._leaving = True
        conn = self._conn
        if conn is not None and self._connected.is_set():
            if self.config.status_topic:
                with contextlib.suppress(UplinkError, TimeoutError):
                    async with asyncio.timeout(EXIT_GRACE_S):
                        await conn.publish_nowait(self.config.status_topic,
                                                  self.status_payload("offline"), True)
            # DISCONNECT even when the PUBACK of "offline" was slow: without it the broker
            # publishes our will ("lost") over the "offline" it may already have.
            with contextlib.suppress(UplinkError, TimeoutError):
                await conn.disconnect(EXIT_GRACE_S)
        self._closed.set()
        if self._task is not None:
            self._task.cancel()
        assert self._tg is not None
        await self._tg.__aexit__(None, None, None)

    async def run(self) -> None:
        """Connect, serve, reconnect after a back-off; until the uplink is closed."""
        while not self._closed.is_set() and not self._leaving:
            protocol = V311 if self.config.protocol == "3.1.1" else V5
            try:
                await self._session(protocol)
            except UplinkError as exc:
                if self._leaving:
                    return  # our own DISCONNECT at exit
                self._failed(exc)
                if exc.reason == "protocol-version" and self.config.protocol == "auto" \
                        and protocol == V5 and not self._closed.is_set():
                    # The broker said it explicitly: try 3.1.1 at once (MQTT 5 again after
                    # the next disconnect).
                    log.warning("uplink: broker refused MQTT 5; trying MQTT 3.1.1")
                    self.counters["protocol_fallbacks"] += 1
                    try:
                        await self._session(V311, downgraded=True)
                    except UplinkError as again:
                        self._failed(again)
            if self._closed.is_set() or self._leaving:
                return
            delay = self._backoff.next()
            self.counters["reconnect_waits"] += 1
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):  # a back-off that ends on exit, too
                    await self._closed.wait()

    def _failed(self, exc: UplinkError) -> None:
        self.last_error = exc
        self.counters[f"error_{exc.reason}"] += 1
        log.warning("uplink: %s (%s)", exc, exc.reason)

    # -- public API ---------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def wait_connected(self) -> int:
        """Wait for a live connection; returns its epoch."""
        await self._connected.wait()
        return self.epoch

    def publish_nowait(self, topic: str, payload: bytes, *,
                       retain: bool = False) -> asyncio.Future[None]:
        """Send now (in call order) and return a future that resolves on PUBACK, or fails
        with UplinkError (``disconnected``, ``not-authorised``). Raises UplinkError
        (``disconnected``) when there is no connection right now."""
        conn = self._conn
        if conn is None or not self._connected.is_set():
            raise UplinkError("not connected", reason="disconnected")
        self.counters["published"] += 1
        return conn.publish_nowait(topic, payload, retain)

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False,
                      retry: bool = True) -> None:
        """Publish at QoS 1 and return on PUBACK. With ``retry`` (the default) it waits for
        a connection and sends again after a disconnect (at least once); a refusal by the
        broker (ACL) raises UplinkError at once."""
        while True:
            if retry:
                await self.wait_connected()
            try:
                fut = self.publish_nowait(topic, payload, retain=retain)
                async with asyncio.timeout(self.config.publish_timeout_s):
                    await asyncio.shield(fut)
                return
            except UplinkError as exc:
                if exc.reason != "disconnected" or not retry:
                    raise
                # The socket may be gone a moment before our session notices: yield, so
                # it can clear `connected` (no busy loop).
                await asyncio.sleep(RETRY_PAUSE_S)
            except TimeoutError:
                if not retry:
                    raise UplinkError(f"no PUBACK for {topic} in time", reason="timeout") \
                        from None

    async def subscribe(self, topic: str) -> None:
        """Subscribe at QoS 1 now (if connected; returns on SUBACK) and again after every
        reconnect. Raises UplinkError(``not-authorised``) if the broker refuses it."""
        if topic not in self._subscriptions:
            self._subscriptions.append(topic)
        conn = self._conn
        if conn is not None and self._connected.is_set():
            await self._subscribe(conn, topic)

    async def messages(self) -> AsyncIterator[Incoming]:
        """Incoming messages on subscribed topics, across reconnects."""
        while True:
            yield await self._incoming.get()

    def default_status(self, state: str) -> bytes:
        return json.dumps({"state": state, "client": self.config.client_id}).encode()

    # -- internals ----------------------------------------------------------------------
    def _tls_context(self) -> ssl.SSLContext:
        cfg = self.config
        try:
            context = ssl.create_default_context(
                cafile=str(cfg.ca_file) if cfg.ca_file else None)
            if cfg.cert_file:
                context.load_cert_chain(str(cfg.cert_file), str(cfg.key_file))
        except (OSError, ssl.SSLError) as exc:
            # The message names the file, never its content.
            raise ConfigError(f"mqtt TLS files: cannot load: {exc.__class__.__name__}: "
                              f"{getattr(exc, 'strerror', None) or exc}") from None
        return context

    def _make_client(self, protocol: MQTTProtocolVersion) -> paho.Client:
        cfg = self.config
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=cfg.client_id,
                             protocol=protocol,
                             clean_session=False if protocol == V311 else None,
                             # paho must never reconnect (or downgrade) inside loop_read:
                             reconnect_on_failure=False)
        # paho's own logger: its packet dump (-vv) is labelled as paho's, not as ours
        client.enable_logger(logging.getLogger("paho.mqtt.client"))
        if cfg.status_topic:
            client.will_set(cfg.status_topic, self.status_payload("lost"), qos=1, retain=True)
        if cfg.username is not None:
            client.username_pw_set(cfg.username, cfg.password)
        if self._tls is not None:
            client.tls_set_context(self._tls)
        client.max_inflight_messages_set(cfg.window + 2)  # the window + status + a spare
        client.max_queued_messages_set(0)  # unlimited: our callers bound what they send
        return client

    async def _session(self, protocol: MQTTProtocolVersion, downgraded: bool = False) -> None:
        cfg = self.config
        properties = None
        if protocol == V5 and cfg.session_expiry_s:  # absent means 0 (MQTT 5 s3.1.2.11.2)
            # paho's Properties.__init__ has no annotations (paho 2.2):
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = cfg.session_expiry_s
        conn = await Connection.open(
            self._make_client(protocol), cfg.host, cfg.port, keepalive_s=cfg.keepalive_s,
            timeout_s=cfg.connect_timeout_s, tls=cfg.tls, sink=self._receive,
            clean_start=False if protocol == V5 else None, properties=properties)
        started = time.monotonic()
        try:
            self._conn, self.protocol, self.downgraded = conn, protocol, downgraded
            self.epoch += 1
            self.counters["connections"] += 1
            self._backoff.reset()
            self.last_error = None
            self._connected.set()
            log.info("uplink connected to %s:%d (MQTT %s%s, epoch %d)", cfg.host, cfg.port,
                     "5" if protocol == V5 else "3.1.1",
                     ", the broker refused 5" if downgraded else "", self.epoch)
            await self._serve(conn)
        finally:
            self._connected.clear()
            self._conn = None
            conn.abort()
            self._session_ended(time.monotonic() - started)

    def _session_ended(self, lasted_s: float) -> None:
        """Say it when the broker ends connection after connection soon after accepting
        it. That is what a session take-over looks like when the broker only closes the
        socket (mosquitto 2.0 does, without MQTT 5's DISCONNECT 0x8E): two agents with one
        client id kick each other off. The log says so once per streak, in plain words.
        (The back-off is left alone: a broker that closes the connection after each
        refused publish, an ACL change, ends connections the same way, and there the agent
        must go on retrying at its pace.)"""
        if self._closed.is_set() or self._leaving or lasted_s >= SHORT_SESSION_S:
            self._short_sessions = 0
            return
        self._short_sessions += 1
        if self._short_sessions == SHORT_SESSION_STREAK:
            self.counters["short_session_streaks"] += 1
            log.warning(
                "uplink: the broker closed %d connections in a row within %g s of accepting "
                "them. Most likely another client uses our client id %r (a second agent "
                "with a copy of this device's identity, on another box?): each connection "
                "takes the session from the other. Two agents fork the signed chain; stop "
                "one of them. (Or the broker refuses something we send: see its log.)",
                self._short_sessions, SHORT_SESSION_S, self.config.client_id)

    async def _serve(self, conn: Connection) -> None:
        if self.config.status_topic:
            conn.publish_nowait(self.config.status_topic, self.status_payload("online"), True)
        for topic in self._subscriptions:
            try:
                await self._subscribe(conn, topic)
            except UplinkError as exc:  # an ACL change must not take the uplink down
                if exc.reason == "disconnected":
                    raise
                self.last_error = exc
                log.warning("uplink: %s", exc)
        # Incoming messages go straight to _receive; here we only wait for the connection
        # to end, or for our exit. asyncio.wait, not await: a cancel must not cancel
        # the connection's own future.
        closed = asyncio.ensure_future(self._closed.wait())
        either: list[asyncio.Future[Any]] = [conn.closed, closed]
        try:
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        finally:
            closed.cancel()
        if self._closed.is_set():
            return
        raise conn.closed.result()

    def _receive(self, message: Incoming) -> None:
        self.counters["received"] += 1
        self._incoming.put_nowait(message)

    async def _subscribe(self, conn: Connection, topic: str) -> None:
        async with asyncio.timeout(self.config.publish_timeout_s):
            codes = await asyncio.shield(conn.subscribe(topic))
        # SUBACK 0x80+ refuses (3.1.1 s3.9.3: 0x80 failure; MQTT 5: 0x87 not authorised).
        if any(code.is_failure for code in codes):
            self.counters["subscribe_refused"] += 1
            reason = "not-authorised" if any(c.value == NOT_AUTHORISED or c.value == 0x80
                                             for c in codes) else "subscribe-refused"
            raise UplinkError(f"broker refused subscription to {topic}", reason=reason)
        log.debug("subscribed to %s", topic)


__all__ = ["Incoming", "MqttConfig", "Uplink"]
