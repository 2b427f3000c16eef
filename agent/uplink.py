"""MQTT uplink (DESIGN s4): aiomqtt over paho-mqtt, one connection the whole agent shares.

Usage (the runtime, the channel session)::

    async with Uplink(MqttConfig.from_table(table, device_id)) as up:
        await up.publish(topic, payload)          # returns on PUBACK (QoS 1)
        await up.subscribe(channel_topic(cid, "ev"))
        async for message in up.messages():        # Incoming(topic, payload, retain)
            ...

What it does, and why:

- MQTT 5 first, falling back to 3.1.1 when the broker refuses the protocol version
  (``protocol = "auto"``). QoS 1 everywhere: at least once, never silently lost.
- Persistent session: a fixed client id, clean start off and a session expiry (MQTT 5
  s3.1.2.11.2) or clean session off (3.1.1 s3.1.2.4), so the broker keeps our channel
  subscriptions and queues their messages while we are away.
- A fresh paho client per connection: the durable outbox is OUR spool, not paho's memory.
  After a reconnect the caller replays un-acknowledged rows from the spool in seq order
  (``telemetry.Publisher``); paho never resends old mids on its own, so a duplicate at the
  subscriber can only be a QoS 1 redelivery of a message whose PUBACK we did not see.
- TLS with a CA and a client certificate (``ssl`` context built once). A failure to connect
  is classified into ``UplinkError.reason`` (``tls-verify``, ``tls-handshake``,
  ``not-authorised``, ``unreachable``, ``protocol-version``, ...) and retried after a capped
  exponential back-off with jitter; the uplink never gives up and never crashes the agent.
- Last will + retained status topic: ``{"state": "online"}`` on connect, ``offline`` on a
  clean exit, and the broker publishes the will (``"lost"``) when the connection dies.
- A PUBACK carrying a failure reason code (MQTT 5 0x87 "not authorized" from an ACL) fails
  the publish with ``reason="not-authorised"``: the row stays in the spool. Over MQTT 3.1.1
  an ACL denial is invisible to the client (mosquitto acknowledges and discards): use MQTT 5.
- Keepalive: paho sends PINGREQ after ``keepalive_s`` of silence and drops the connection if
  nothing comes back within another ``keepalive_s``: a half-open connection (peer frozen or
  cable pulled) is noticed within about 2 x keepalive, and every pending publish fails with
  ``reason="disconnected"``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import socket
import ssl
import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiomqtt
import paho.mqtt.client as paho
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.backoff import Backoff
from agent.errors import ConfigError, UplinkError
from agent.options import Table
from agent.topics import status_topic

log = logging.getLogger("edge_agent.uplink")

RETRY_PAUSE_S = 0.05


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
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise ConfigError(key="mqtt.url", expected="mqtt://host[:port] or mqtts://...",
                              found=url)
        tls = parts.scheme == "mqtts"
        return cls(host=parts.hostname, port=parts.port or (8883 if tls else 1883),
                   client_id=client_id, tls=tls, **options)

    @classmethod
    def from_table(cls, table: Table, device_id: str) -> MqttConfig:
        url = table.str("url")
        try:
            base = cls.from_url(url, table.str("client_id", device_id))
        except ConfigError:
            raise table.error("url", "mqtt://host[:port] or mqtts://host[:port]", url) from None

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


# --------------------------------------------------------------------------- client


@dataclass(frozen=True, slots=True)
class Incoming:
    topic: str
    payload: bytes
    retain: bool = False


def _disconnected_error() -> UplinkError:
    return UplinkError("connection lost before PUBACK", reason="disconnected")


def _retrieve(fut: asyncio.Future[None]) -> None:
    """Mark a future's exception as seen (a caller that went away must not log noise)."""
    if not fut.cancelled():
        fut.exception()


class ClosedBeforeConnack(aiomqtt.MqttError):
    """The broker closed the connection after TCP/TLS setup but before its CONNACK."""


class _Client(aiomqtt.Client):
    """aiomqtt's client plus publish futures that carry the PUBACK's reason code and fail
    at once when the connection drops (aiomqtt's own publish would wait for its timeout)."""

    def __init__(self, *args: Any, sink: Callable[[Incoming], None], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.acks: dict[int, tuple[asyncio.Future[None], str]] = {}
        self._early: dict[int, Any] = {}
        self._sink = sink
        self._loop_thread = threading.get_ident()  # made on the event loop's thread
        self._flush_handle: asyncio.Handle | None = None

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        """Straight into the uplink's queue. aiomqtt's own message iterator costs a task and
        an asyncio.wait per message, and a second queue hop (a third of the channel's
        per-message cost). paho calls this from loop_read, on the event loop."""
        incoming = Incoming(message.topic, bytes(message.payload), bool(message.retain))
        if threading.get_ident() == self._loop_thread:
            self._sink(incoming)
        else:  # pragma: no cover - paho reads on the loop; kept safe all the same
            self._loop.call_soon_threadsafe(self._sink, incoming)

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason_code: Any,
                       properties: Any = None) -> None:
        """A connection lost before CONNACK (the broker rejecting our client certificate
        with a TLS alert after the handshake, say) ends the connect at once, instead of
        aiomqtt waiting out its timeout. paho logged the socket error just before."""
        if not self._connected.done():
            # paho may call this from the executor thread that runs connect().
            self._loop.call_soon_threadsafe(self._fail_connect, ClosedBeforeConnack(
                f"connection closed before CONNACK ({reason_code})"))
            return
        super()._on_disconnect(client, userdata, flags, reason_code, properties)

    def _fail_connect(self, exc: BaseException) -> None:
        if not self._connected.done():
            self._connected.set_exception(exc)
            self._connected.add_done_callback(_retrieve)

    def publish_nowait(self, topic: str, payload: bytes, retain: bool) -> asyncio.Future[None]:
        info = self._client.publish(topic, payload, 1, retain)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise UplinkError(f"publish to {topic} failed: {paho.error_string(info.rc)}",
                              reason="disconnected")
        self.flush()  # on the wire now, not after another turn of the loop
        fut: asyncio.Future[None] = self._loop.create_future()
        fut.add_done_callback(_retrieve)
        if info.mid in self._early:  # PUBACK already seen (paho may call back that fast)
            _settle(fut, topic, self._early.pop(info.mid))
        else:
            self.acks[info.mid] = (fut, topic)
        return fut

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason_code: Any,
                    properties: Any) -> None:
        entry = self.acks.pop(mid, None)
        if entry is None:
            self._early[mid] = reason_code
        elif not entry[0].done():
            _settle(entry[0], entry[1], reason_code)
        super()._on_publish(client, userdata, mid, reason_code, properties)

    def _on_socket_register_write(self, client: Any, userdata: Any, sock: Any) -> None:
        """paho has bytes to send. On the loop's thread (every publish and PUBACK once
        connected) write them in this turn of the loop: aiomqtt's way (a thread-safe
        callback that adds a writer, then a write when the socket polls writable) costs a
        self-pipe write and two more turns of the loop per packet. From paho's connect
        thread, register a writer as aiomqtt does, reading the fd when registering (when the
        socket closes in between, asyncio would log a traceback about a bad fd)."""
        if threading.get_ident() == self._loop_thread:
            if self._flush_handle is None:
                self._flush_handle = self._loop.call_soon(self.flush)
            return
        self._loop.call_soon_threadsafe(self._add_writer, sock)

    def flush(self) -> None:
        """Write what paho has queued; wait for the socket to drain only if it is full."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        self._write()
        sock = self._client.socket()
        if self._client.want_write() and sock is not None:
            self._add_writer(sock)  # paho thinks it registered already: it will not ask

    def _write(self) -> None:
        try:
            self._client.loop_write()
        except Exception as exc:  # noqa: BLE001 - any failure means the connection died
            if not self._disconnected.done():
                self._disconnected.set_exception(exc)

    def _add_writer(self, sock: Any) -> None:
        fd = sock.fileno()
        if fd < 0:
            return
        try:
            self._loop.add_writer(fd, self._write)
        except OSError:
            # A stale registration of a closed socket that had the same fd number:
            # drop it (the selector ignores the kernel's ENOENT) and register anew.
            self._loop.remove_writer(fd)
            with contextlib.suppress(OSError):
                self._loop.add_writer(fd, self._write)

    def _on_socket_unregister_write(self, client: Any, userdata: Any, sock: Any) -> None:
        fd = sock.fileno()
        if fd >= 0:
            with contextlib.suppress(OSError, ValueError):
                self._loop.remove_writer(fd)

    def fail_pending(self) -> None:
        for fut, _ in self.acks.values():
            if not fut.done():
                fut.set_exception(_disconnected_error())
        self.acks.clear()

    @property
    def disconnected(self) -> asyncio.Future[None]:
        return self._disconnected


def _no_delay(client: aiomqtt.Client) -> None:
    """Turn Nagle off. paho-mqtt leaves it on, so a PUBLISH written right after a PUBACK
    waits for the broker's delayed ACK (~40 ms per hop on Linux): a channel round trip took
    ~90 ms instead of ~0.5 ms. aiomqtt does not expose the socket; paho's client does."""
    sock = client._client.socket()
    if isinstance(sock, socket.socket):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _settle(fut: asyncio.Future[None], topic: str, reason_code: Any) -> None:
    if getattr(reason_code, "is_failure", False):
        reason = "not-authorised" if reason_code.value == 0x87 else "publish-refused"
        fut.set_exception(UplinkError(f"broker refused publish to {topic}: {reason_code}",
                                      reason=reason))
    else:
        fut.set_result(None)


# --------------------------------------------------------------------------- the uplink


class Uplink:
    """One MQTT connection kept up for the agent's lifetime. See the module docstring."""

    def __init__(self, config: MqttConfig, *, rng: random.Random | None = None,
                 status_payload: Callable[[str], bytes] | None = None) -> None:
        self.config = config
        # "online" | "offline" | "lost" -> the retained status / will payload (the agent's
        # carries its signed chain head: agent.chain_head)
        self._status_payload = status_payload
        self.counters: Counter[str] = Counter()
        self.last_error: UplinkError | None = None
        self.protocol: aiomqtt.ProtocolVersion | None = None
        self.epoch = 0  # +1 per successful connection
        self._backoff = Backoff(config.backoff_initial_s, config.backoff_max_s, rng)
        self._client: _Client | None = None
        self._connected = asyncio.Event()
        self._subscriptions: list[str] = []
        # Unbounded, as paho's was: a QoS 1 message is acknowledged once it is here, so
        # dropping one would lose it. The consumers (verifier, channel) keep up.
        self._incoming: asyncio.Queue[Incoming] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._tls: ssl.SSLContext | None = self._tls_context() if config.tls else None
        self._tg: asyncio.TaskGroup | None = None
        # Set on exit, besides cancelling the task: Python 3.11's asyncio.wait_for (which
        # aiomqtt uses for SUBACK and the like) can swallow a cancel that arrives as its
        # future completes (CPython gh-86296); the uplink then served on forever.
        self._closed = asyncio.Event()

    # -- lifecycle ----------------------------------------------------------------------
    async def __aenter__(self) -> Uplink:
        self._tg = asyncio.TaskGroup()
        await self._tg.__aenter__()
        self._task = self._tg.create_task(self.run(), name="uplink")
        return self

    async def __aexit__(self, *exc: object) -> None:
        client = self._client
        if client is not None and self.config.status_topic:
            with contextlib.suppress(UplinkError, TimeoutError):
                fut = client.publish_nowait(self.config.status_topic,
                                            self._status("offline"), True)
                await asyncio.wait_for(fut, 2.0)
        self._closed.set()
        if self._task is not None:
            self._task.cancel()
        assert self._tg is not None
        await self._tg.__aexit__(None, None, None)

    async def run(self) -> None:
        """Connect, serve, reconnect after a back-off; forever (until cancelled).

        ``protocol = "auto"``: MQTT 5 first. A 3.1.1-only broker answers a v5 CONNECT with
        CONNACK 0x01 (MQTT 3.1.1 s3.2.2.3), closes the socket, or misreads it and waits
        (amqtt 0.12 does: we see a connect timeout); in each case
        way we try 3.1.1 at once, and keep it once it worked. If 3.1.1 fails too, the
        next attempt (after the back-off) is MQTT 5 again."""
        v5, v311 = aiomqtt.ProtocolVersion.V5, aiomqtt.ProtocolVersion.V311
        auto = self.config.protocol == "auto"
        protocol = v311 if self.config.protocol == "3.1.1" else v5
        while not self._closed.is_set():
            try:
                await self._session(protocol)
            except UplinkError as exc:
                self.last_error = exc
                self.counters[f"error_{exc.reason}"] += 1
                log.warning("uplink: %s (%s)", exc, exc.reason)
                if auto and protocol == v5 and self.epoch == 0 and exc.reason in (
                        "protocol-version", "connect-refused", "tls-handshake", "timeout"):
                    log.warning("uplink: trying MQTT 3.1.1")
                    self.counters["protocol_fallbacks"] += 1
                    protocol = v311
                    continue
                if auto and protocol == v311 and self.epoch == 0:
                    protocol = v5
            if self._closed.is_set():
                return
            delay = self._backoff.next()
            self.counters["reconnect_waits"] += 1
            await asyncio.sleep(delay)

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
        client = self._client
        if client is None or not self._connected.is_set():
            raise UplinkError("not connected", reason="disconnected")
        self.counters["published"] += 1
        return client.publish_nowait(topic, payload, retain)

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
                await asyncio.wait_for(asyncio.shield(fut), self.config.publish_timeout_s)
                return
            except UplinkError as exc:
                if exc.reason != "disconnected" or not retry:
                    raise
                # paho may know the socket is gone a moment before our session does:
                # yield, so the session can notice and clear `connected` (no busy loop).
                await asyncio.sleep(RETRY_PAUSE_S)
            except TimeoutError:
                if not retry:
                    raise UplinkError(f"no PUBACK for {topic} in time", reason="timeout") \
                        from None

    async def subscribe(self, topic: str) -> None:
        """Subscribe at QoS 1 now (if connected) and again after every reconnect."""
        if topic not in self._subscriptions:
            self._subscriptions.append(topic)
        client = self._client
        if client is not None and self._connected.is_set():
            await self._subscribe(client, topic)

    async def messages(self) -> AsyncIterator[Incoming]:
        """Incoming messages on subscribed topics, across reconnects."""
        while True:
            yield await self._incoming.get()

    # -- internals ----------------------------------------------------------------------
    def _status(self, state: str) -> bytes:
        if self._status_payload is not None:
            return self._status_payload(state)
        return json.dumps({"state": state, "client": self.config.client_id}).encode()

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

    def _make_client(self, protocol: aiomqtt.ProtocolVersion) -> _Client:
        cfg = self.config
        will = None
        if cfg.status_topic:
            will = aiomqtt.Will(cfg.status_topic, self._status("lost"), qos=1, retain=True)
        kwargs: dict[str, Any] = {}
        if protocol == aiomqtt.ProtocolVersion.V5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = cfg.session_expiry_s
            kwargs.update(clean_start=False, properties=props)
        else:
            kwargs.update(clean_session=False)
        return _Client(
            cfg.host, cfg.port, identifier=cfg.client_id, protocol=protocol, will=will,
            username=cfg.username, password=cfg.password, keepalive=cfg.keepalive_s,
            timeout=cfg.connect_timeout_s, tls_context=self._tls,
            max_inflight_messages=cfg.window + 2, logger=log, sink=self._receive, **kwargs)

    async def _session(self, protocol: aiomqtt.ProtocolVersion) -> None:
        client = self._make_client(protocol)
        try:
            async with client:
                _no_delay(client)
                self._client, self.protocol = client, protocol
                self.epoch += 1
                self.counters["connections"] += 1
                self._backoff.reset()
                self.last_error = None
                self._connected.set()
                log.info("uplink connected to %s:%d (MQTT %s, epoch %d)", self.config.host,
                         self.config.port, "5" if protocol == 5 else "3.1.1", self.epoch)
                await self._serve(client)
        except aiomqtt.MqttError as exc:
            raise classify(exc, self.config.tls) from None
        except OSError as exc:
            raise classify(exc, self.config.tls) from None
        finally:
            self._connected.clear()
            self._client = None
            client.fail_pending()

    async def _serve(self, client: _Client) -> None:
        if self.config.status_topic:
            fut = client.publish_nowait(self.config.status_topic, self._status("online"), True)
            fut.add_done_callback(_retrieve)
        for topic in self._subscriptions:
            try:
                await self._subscribe(client, topic)
            except UplinkError as exc:  # an ACL change must not take the uplink down
                self.last_error = exc
                log.warning("uplink: %s", exc)
        # Incoming messages go straight to _receive (see _Client._on_message); here we
        # only wait for the connection to end, or for our exit (see _closed). asyncio.wait,
        # not await: a cancel must not cancel aiomqtt's own future.
        closed = asyncio.ensure_future(self._closed.wait())
        try:
            await asyncio.wait({client.disconnected, closed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            closed.cancel()
        if self._closed.is_set():
            return
        client.disconnected.result()  # raises the MqttError of an unexpected disconnect
        raise UplinkError("connection closed", reason="disconnected")

    def _receive(self, message: Incoming) -> None:
        self.counters["received"] += 1
        self._incoming.put_nowait(message)

    async def _subscribe(self, client: _Client, topic: str) -> None:
        granted = await client.subscribe(topic, qos=1)
        codes = list(granted) if granted is not None else []
        if any(getattr(c, "is_failure", False) or c == 0x80 for c in codes):
            self.counters["subscribe_refused"] += 1
            raise UplinkError(f"broker refused subscription to {topic}", reason="not-authorised")


def classify(exc: BaseException, tls: bool = False) -> UplinkError:
    """Turn an aiomqtt/paho/ssl failure into an UplinkError with a reason code."""
    text = str(exc)
    if isinstance(exc, ClosedBeforeConnack):
        if tls:
            return UplinkError(f"TLS: the broker dropped us after the handshake (our client "
                               f"certificate refused?): {text}", reason="tls-handshake")
        return UplinkError(f"broker closed the connection: {text}", reason="connect-refused")
    if isinstance(exc, MqttConnectError) or "Connection Refused" in text \
            or "CONNACK" in text:
        rc = getattr(exc, "rc", None)
        value = getattr(rc, "value", rc)
        if value in (1, 0x84) or "protocol version" in text.lower():
            return UplinkError(f"broker refused the MQTT version: {text}",
                               reason="protocol-version")
        if value in (4, 5, 0x86, 0x87, 0x8C) or "authori" in text.lower():
            return UplinkError(f"broker refused our credentials: {text}",
                               reason="not-authorised")
        return UplinkError(f"broker refused the connection: {text}", reason="connect-refused")
    if "CERTIFICATE_VERIFY_FAILED" in text:
        return UplinkError(f"TLS: the broker's certificate does not verify against our CA "
                           f"({text})", reason="tls-verify")
    if "SSL" in text or "alert" in text or "TLS" in text:
        return UplinkError(f"TLS handshake failed (client certificate refused?): {text}",
                           reason="tls-handshake")
    if "refused" in text.lower():
        return UplinkError(f"broker unreachable: {text}", reason="unreachable")
    if "timed out" in text.lower():
        return UplinkError(f"broker did not answer: {text}", reason="timeout")
    return UplinkError(f"connection lost: {text}", reason="disconnected")
