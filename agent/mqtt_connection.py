"""One MQTT connection: paho-mqtt's public API, driven by the asyncio event loop.

paho-mqtt (2.1 up to, not including, 3: the ``CallbackAPIVersion.VERSION2`` callbacks) does
all of MQTT: packets, QoS 1 flows, keepalive. This module only moves its bytes with the
event loop, the "external event loop" way paho documents (``loop_read`` / ``loop_write`` /
``loop_misc``, ``want_write``, ``socket()`` and the ``on_socket_*`` callbacks); it reads or
overrides nothing private. agent.uplink builds on it (reconnects, status, subscriptions).

How the bytes move:

- ``Connection.open``: paho's ``connect()`` (TCP connect, TLS handshake, the CONNECT packet)
  blocks, so it runs in a worker thread, with no socket callback set: paho writes the
  CONNECT itself on that thread. Back on the loop the socket is handed over: ``add_reader``
  -> ``loop_read``; ``on_socket_register_write`` -> a write in this turn of the loop, and
  ``add_writer`` -> ``loop_write`` only while the socket is full (``want_write()`` after a
  write); one timer -> ``loop_misc`` every ``keepalive / 4`` seconds, at least 1 s
  (keepalive: PINGREQ after ``keepalive`` seconds of silence, sent up to a quarter late,
  well within the broker's 1.5 x ``keepalive`` (MQTT 5 s3.1.2.10); the connection dropped
  when no PINGRESP follows within another ``keepalive``: about 2.25 x at worst). A timer
  each second would wake an idle agent once a second for nothing. Then it waits for
  the CONNACK.
- Every callback after that runs on the loop's thread (paho calls them from ``loop_read``,
  ``loop_write`` or ``loop_misc``), so PUBACKs resolve futures directly, and a PUBACK can
  never come before its future exists.
- TCP_NODELAY is set on paho's socket: paho leaves Nagle on, so a PUBLISH written right
  after a PUBACK waited for the broker's delayed ACK (~40 ms per hop on Linux).
- A TLS socket may hold decrypted bytes that no longer show as readable on the fd
  (``SSLSocket.pending()``): they are read at once, not when the next TCP segment comes.

Failures are classified by exception type and MQTT reason code, never by message text:

=========================================  ============================  ================
what                                        seen as                       ``reason``
=========================================  ============================  ================
broker's certificate not from our CA        ssl.SSLCertVerificationError  ``tls-verify``
other TLS failure during the handshake      ssl.SSLError                  ``tls-handshake``
TLS broker closes before CONNACK            on_disconnect before CONNACK  ``tls-handshake``
  (TLS 1.3: our client certificate refused)
nothing listens / no route / no name        ConnectionRefusedError,       ``unreachable``
                                            OSError, socket.gaierror
no answer in ``connect_timeout_s``          TimeoutError / no CONNACK     ``timeout``
CONNACK 0x84, or 3.1.1 return code 1        ReasonCode 0x84               ``protocol-version``
CONNACK 0x86 0x87 0x8A 0x8C, or 3.1.1 4, 5  ReasonCode (paho converts     ``not-authorised``
                                            3.1.1 codes to MQTT 5 ones)
any other CONNACK failure, or a plain TCP   ReasonCode >= 0x80,           ``connect-refused``
  broker closing before CONNACK             on_disconnect before CONNACK
PUBACK 0x87 (an ACL refused a publish)      ReasonCode 0x87               ``not-authorised``
other PUBACK failure                        ReasonCode >= 0x80            ``publish-refused``
connection lost once up (keepalive, EOF,    on_disconnect                 ``disconnected``
  broker DISCONNECT)
=========================================  ============================  ================
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.errors import UplinkError

log = logging.getLogger("edge_agent.uplink")
T = TypeVar("T")

MISC_INTERVAL_S = 1.0  # loop_misc at least this far apart (keepalive counts in seconds)
# paho's connect() blocks (TCP connect, TLS handshake) for up to connect_timeout_s.
_CONNECT_THREADS = ThreadPoolExecutor(4, thread_name_prefix="mqtt-connect")

# MQTT 5 s3.2.2.2 CONNACK reason codes (paho maps 3.1.1 return codes onto them).
UNSUPPORTED_PROTOCOL_VERSION = 0x84
CONNACK_NOT_AUTHORISED = frozenset({0x86, 0x87, 0x8A, 0x8C})  # bad credentials, not
# authorised, banned, bad authentication method
NOT_AUTHORISED = 0x87  # PUBACK (s3.4.2.1) and SUBACK (s3.9.3)


@dataclass(frozen=True, slots=True)
class Incoming:
    """A message on a subscribed topic."""

    topic: str
    payload: bytes
    retain: bool = False


SESSION_TAKEN_OVER = 0x8E  # MQTT 5.0 s3.14.2.1 (DISCONNECT reason "Session taken over")


def _disconnected(why: str = "connection lost before PUBACK") -> UplinkError:
    return UplinkError(why, reason="disconnected")


def _retrieve(fut: asyncio.Future[T]) -> None:
    """Mark a future's exception as seen (a caller that went away must not log noise)."""
    if not fut.cancelled():
        fut.exception()


def classify_connect_error(exc: BaseException) -> UplinkError:
    """What paho's blocking ``connect()`` raised, by type (see the module docstring)."""
    name = exc.__class__.__name__
    if isinstance(exc, ssl.SSLCertVerificationError):
        return UplinkError(f"TLS: the broker's certificate does not verify against our CA "
                           f"({getattr(exc, 'verify_message', None) or exc.strerror})",
                           reason="tls-verify")
    if isinstance(exc, ssl.SSLError):
        return UplinkError(f"TLS handshake failed ({name}: {getattr(exc, 'reason', None) or exc.strerror})",
                           reason="tls-handshake")
    if isinstance(exc, TimeoutError):
        return UplinkError("broker did not answer in time", reason="timeout")
    if isinstance(exc, socket.gaierror):
        return UplinkError(f"broker name does not resolve ({exc.strerror})",
                           reason="unreachable")
    if isinstance(exc, OSError):
        return UplinkError(f"broker unreachable ({name}: {exc.strerror})", reason="unreachable")
    raise exc  # not a network failure: a bug, never hidden


def classify_connack(code: ReasonCode) -> UplinkError:
    """A CONNACK that refused us, by reason code."""
    if code.value == UNSUPPORTED_PROTOCOL_VERSION:
        return UplinkError(f"broker refused the MQTT version (CONNACK {code})",
                           reason="protocol-version")
    if code.value in CONNACK_NOT_AUTHORISED:
        return UplinkError(f"broker refused our credentials (CONNACK {code})",
                           reason="not-authorised")
    return UplinkError(f"broker refused the connection (CONNACK {code})",
                       reason="connect-refused")


def classify_puback(code: ReasonCode, topic: str) -> UplinkError:
    reason = "not-authorised" if code.value == NOT_AUTHORISED else "publish-refused"
    return UplinkError(f"broker refused publish to {topic}: {code}", reason=reason)


def _close_paho_socket(client: paho.Client) -> None:
    sock = client.socket()
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.close()


class Connection:
    """One paho client on one socket, driven by the running loop. Made by :meth:`open`;
    ``closed`` resolves (with the UplinkError saying why) when the connection ends."""

    def __init__(self, client: paho.Client, *, tls: bool,
                 sink: Callable[[Incoming], None], keepalive_s: int = 0) -> None:
        self._client, self._tls, self._sink = client, tls, sink
        self._misc_interval_s = max(MISC_INTERVAL_S, keepalive_s / 4)
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self.connack: asyncio.Future[ReasonCode] = self._loop.create_future()
        self.closed: asyncio.Future[UplinkError] = self._loop.create_future()
        self._acks: dict[int, tuple[asyncio.Future[None], str]] = {}
        self._subacks: dict[int, asyncio.Future[list[ReasonCode]]] = {}
        self._sock: socket.socket | None = None
        self._fd = -1
        self._writing = False  # a writer is registered (the socket was full)
        self._in_flush = False
        self._flush_handle: asyncio.Handle | None = None
        self._misc_handle: asyncio.TimerHandle | None = None
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message

    # -- opening ------------------------------------------------------------------------
    @classmethod
    async def open(cls, client: paho.Client, host: str, port: int, *, keepalive_s: int,
                   timeout_s: float, tls: bool, sink: Callable[[Incoming], None],
                   clean_start: bool | None = None,
                   properties: Properties | None = None) -> Connection:
        """Connect and wait for a successful CONNACK; raises a classified UplinkError."""
        conn = cls(client, tls=tls, sink=sink, keepalive_s=keepalive_s)
        client.connect_timeout = timeout_s
        start = clean_start if clean_start is not None else paho.MQTT_CLEAN_START_FIRST_ONLY
        job = _CONNECT_THREADS.submit(client.connect, host, port, keepalive_s,
                                      clean_start=start, properties=properties)
        try:
            rc = await asyncio.wrap_future(job)
        except asyncio.CancelledError:
            # The thread goes on: close whatever socket it ends up with, on that thread
            # (the socket was never registered with the loop, which may be gone by then).
            job.add_done_callback(lambda _: _close_paho_socket(client))
            raise
        except OSError as exc:  # ssl.SSLError and socket.timeout are OSErrors too
            raise classify_connect_error(exc) from None
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:  # the peer closed on us while connecting
            conn._close_socket()
            raise conn._closed_before_connack()
        conn._attach()
        try:
            async with asyncio.timeout(timeout_s):  # not wait_for: gh-86296
                code = await asyncio.shield(conn.connack)
        except TimeoutError:
            conn.abort()
            raise UplinkError("broker sent no CONNACK in time", reason="timeout") from None
        except BaseException:
            conn.abort()
            raise
        if code.is_failure:
            conn.abort()
            raise classify_connack(code)
        return conn

    def _attach(self) -> None:
        """Hand paho's socket to the loop (we are back on the loop's thread)."""
        sock = self._client.socket()
        if not isinstance(sock, socket.socket):  # closed already (paho saw an error)
            self._fail_connect(_disconnected("connection closed while connecting"))
            return
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock, self._fd = sock, sock.fileno()
        client = self._client
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write
        self._loop.add_reader(self._fd, self._on_readable)
        self._misc_handle = self._loop.call_later(self._misc_interval_s, self._on_misc)
        self.flush()  # the CONNECT, if paho could not write it all on the thread
        # The CONNACK may have been in the socket already: the reader fires next turn.

    # -- sending ------------------------------------------------------------------------
    def publish_nowait(self, topic: str, payload: bytes, retain: bool) -> asyncio.Future[None]:
        """QoS 1 publish, written now; the future resolves on PUBACK (or fails)."""
        info = self._client.publish(topic, payload, qos=1, retain=retain)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise _disconnected(f"publish to {topic} failed: {paho.error_string(info.rc)}")
        fut: asyncio.Future[None] = self._loop.create_future()
        fut.add_done_callback(_retrieve)
        self._acks[info.mid] = (fut, topic)
        self.flush()  # on the wire in this turn of the loop (latency of a channel update)
        return fut

    def subscribe(self, topic: str) -> asyncio.Future[list[ReasonCode]]:
        """QoS 1 subscription; the future resolves with the SUBACK's reason codes."""
        rc, mid = self._client.subscribe(topic, qos=1)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            raise _disconnected(f"subscribe to {topic} failed: {paho.error_string(rc)}")
        fut: asyncio.Future[list[ReasonCode]] = self._loop.create_future()
        fut.add_done_callback(_retrieve)
        self._subacks[mid] = fut
        self.flush()
        return fut

    def flush(self) -> None:
        """Write what paho has queued; register a writer only if the socket is full."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if self._sock is None:
            return
        self._in_flush = True
        try:
            self._client.loop_write()
        finally:
            self._in_flush = False
        # paho asks for a writer only when it thinks it has none registered: check here.
        if self._sock is not None and self._client.want_write():
            self._add_writer()

    async def disconnect(self, timeout_s: float) -> None:
        """A clean DISCONNECT (the broker then does not publish our will), then close."""
        if not self.closed.done():
            self._client.disconnect()
            self.flush()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await asyncio.shield(self.closed)
        self.abort()

    def abort(self) -> None:
        """Close now (if not closed yet) and fail everything still waiting."""
        self._close_socket()
        self._finish(_disconnected("connection closed"))

    # -- paho callbacks (all on the loop's thread once attached) -------------------------
    def _on_connect(self, client: paho.Client, userdata: object, flags: paho.ConnectFlags,
                    reason_code: ReasonCode, properties: Properties | None) -> None:
        if not self.connack.done():
            self.connack.set_result(reason_code)

    def _on_disconnect(self, client: paho.Client, userdata: object,
                       flags: paho.DisconnectFlags, reason_code: ReasonCode,
                       properties: Properties | None) -> None:
        if threading.get_ident() != self._loop_thread:
            # paho failed writing the CONNECT on the connect thread (rare): hop over.
            self._loop.call_soon_threadsafe(self._on_disconnect, client, userdata, flags,
                                            reason_code, properties)
            return
        self._fail_connect(self._closed_before_connack())
        if reason_code.value == SESSION_TAKEN_OVER:
            self._finish(UplinkError(
                "the broker ended our session because another client connected with our "
                "client id (MQTT 5 DISCONNECT 0x8E, session taken over): is a second agent "
                "running with this device's identity? Two agents fork the signed chain; stop "
                "one of them", reason="session-taken-over"))
            return
        self._finish(_disconnected(f"connection lost ({reason_code})"))

    def _on_publish(self, client: paho.Client, userdata: object, mid: int,
                    reason_code: ReasonCode, properties: Properties) -> None:
        entry = self._acks.pop(mid, None)
        if entry is None or entry[0].done():
            return
        fut, topic = entry
        if reason_code.is_failure:
            fut.set_exception(classify_puback(reason_code, topic))
        else:
            fut.set_result(None)

    def _on_subscribe(self, client: paho.Client, userdata: object, mid: int,
                      reason_codes: list[ReasonCode], properties: Properties) -> None:
        fut = self._subacks.pop(mid, None)
        if fut is not None and not fut.done():
            fut.set_result(list(reason_codes))

    def _on_message(self, client: paho.Client, userdata: object,
                    message: paho.MQTTMessage) -> None:
        """Straight to the sink: no task, no queue hop per message (the channel's rate)."""
        self._sink(Incoming(message.topic, bytes(message.payload), bool(message.retain)))

    def _on_socket_close(self, client: paho.Client, userdata: object,
                         sock: object) -> None:
        self._detach()

    def _on_register_write(self, client: paho.Client, userdata: object,
                           sock: object) -> None:
        if self._in_flush:
            self._add_writer()  # loop_write could not write everything: the socket is full
        elif self._flush_handle is None:
            # Coalesce: every packet queued in this turn (PUBACKs of a burst) in one flush.
            self._flush_handle = self._loop.call_soon(self.flush)

    def _on_unregister_write(self, client: paho.Client, userdata: object,
                             sock: object) -> None:
        self._remove_writer()

    # -- the loop's side ----------------------------------------------------------------
    def _on_readable(self) -> None:
        self._client.loop_read()
        sock = self._client.socket()
        while isinstance(sock, ssl.SSLSocket) and sock.pending() > 0:
            self._client.loop_read()
            sock = self._client.socket()

    def _on_writable(self) -> None:
        self._client.loop_write()

    def _on_misc(self) -> None:
        self._misc_handle = None
        if self._sock is None:
            return
        self._client.loop_misc()
        if self._sock is not None:
            self._misc_handle = self._loop.call_later(self._misc_interval_s, self._on_misc)

    def _add_writer(self) -> None:
        if not self._writing and self._fd >= 0:
            self._loop.add_writer(self._fd, self._on_writable)
            self._writing = True

    def _remove_writer(self) -> None:
        if self._writing:
            self._loop.remove_writer(self._fd)
            self._writing = False

    def _detach(self) -> None:
        """Unregister the socket from the loop (paho is about to close it, or we are)."""
        if self._fd >= 0:
            self._remove_writer()
            self._loop.remove_reader(self._fd)
            self._fd = -1
        self._sock = None
        for handle in (self._misc_handle, self._flush_handle):
            if handle is not None:
                handle.cancel()
        self._misc_handle = self._flush_handle = None

    def _close_socket(self) -> None:
        """Close paho's socket ourselves (abort, or a connect cancelled midway): the
        client is dropped afterwards, a fresh one serves the next connection."""
        self._detach()
        _close_paho_socket(self._client)

    def _closed_before_connack(self) -> UplinkError:
        if self._tls:
            return UplinkError("TLS: the broker closed the connection before its CONNACK "
                               "(our client certificate refused?)", reason="tls-handshake")
        return UplinkError("broker closed the connection before its CONNACK",
                           reason="connect-refused")

    def _fail_connect(self, error: UplinkError) -> None:
        if not self.connack.done():
            self.connack.set_exception(error)
            self.connack.add_done_callback(_retrieve)

    def _finish(self, error: UplinkError) -> None:
        """The connection is over: everything waiting fails with ``disconnected``."""
        self._fail_connect(error)
        if not self.closed.done():
            self.closed.set_result(error)
        for fut, _ in self._acks.values():
            if not fut.done():
                fut.set_exception(_disconnected())
        self._acks.clear()
        for sub in self._subacks.values():
            if not sub.done():
                sub.set_exception(_disconnected("connection lost before SUBACK"))
        self._subacks.clear()

