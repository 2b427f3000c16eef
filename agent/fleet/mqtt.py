"""The ingest's MQTT 5 subscriber: shared subscriptions, manual acknowledgement, bounded
in-flight. paho-mqtt through its public API (``manual_ack``, ``ack``, Receive Maximum).

Why not agent.uplink: the agent's uplink acknowledges a message as it arrives. The ingest
must acknowledge only after the database commit (MQTT 5 s4.3.2: a PUBACK passes ownership
of a QoS 1 message to the receiver), and must bound what it holds unacknowledged:

- ``$share/<group>/<filter>`` (MQTT 5 s4.8.2): the broker hands each message to ONE member
  of the group, so any number of ingest processes on any number of machines split the load;
- ``plain`` filters without ``$share``, for the devices' status (their signed chain
  heads): MQTT 5 s4.8.2 sends no retained messages to a shared subscription (brokers that
  follow it drop them; mosquitto 2 sends them anyway), and a live status on a shared one
  reaches one member only. Every worker holds the plain one (heads are small; storing one
  twice is a no-op);
- Receive Maximum (MQTT 5 s3.1.2.11.3) = ``max_in_flight``: the broker sends no more QoS 1
  messages than that before we acknowledge some, so a slow database slows the broker's
  sending (back-pressure), and memory stays bounded;
- a persistent session (clean start off, a session expiry): what was sent to us and not
  acknowledged when we died is sent again when we come back (as a duplicate, which the
  database makes a no-op).

A message carries the connection ``epoch`` it came on: after a reconnect a PUBACK for a
packet id of the old connection would acknowledge a different message, so it is not sent
(the broker redelivers the message; storing it again is a no-op).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from agent.errors import ConfigError
from agent.options import split_url

log = logging.getLogger("edge_agent.fleet.mqtt")


@dataclass(frozen=True, slots=True)
class Arrival:
    epoch: int
    mid: int
    qos: int
    topic: str
    payload: bytes
    received_ns: int


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    url: str
    client_id: str
    group: str = "fleet-ingest"
    max_in_flight: int = 256
    keepalive_s: int = 15
    session_expiry_s: int = 24 * 3600
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    username: str | None = None
    password: str | None = None


class SharedSubscriber:
    """paho client on its own network thread; arrivals go to an asyncio queue."""

    def __init__(self, config: BrokerConfig, filters: tuple[str, ...],
                 loop: asyncio.AbstractEventLoop, sink: Callable[[Arrival], None],
                 plain: tuple[str, ...] = ()) -> None:
        parts = split_url(config.url, "--mqtt", "mqtt://host[:port] or mqtts://host[:port]")
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise ConfigError(key="--mqtt", expected="mqtt://host[:port] or mqtts://...",
                              found=config.url)
        self.config, self.filters, self.plain = config, filters, plain
        self.host, self.tls = parts.hostname, parts.scheme == "mqtts"
        self.port = parts.port or (8883 if self.tls else 1883)
        self._loop, self._sink = loop, sink
        self.epoch = 0
        self.connected = threading.Event()
        self.connected_async = asyncio.Event()
        self.subscribed_async = asyncio.Event()  # SUBACK of the first connection
        self._lock = threading.Lock()
        self._stopping = False
        self._arrived: list[Arrival] = []   # paho thread -> loop, under _lock
        self._wake_pending = False
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=config.client_id,
                                  protocol=paho.MQTTv5, manual_ack=True)
        if self.tls:
            context = ssl.create_default_context(
                cafile=str(config.ca_file) if config.ca_file else None)
            if config.cert_file:
                context.load_cert_chain(str(config.cert_file), str(config.key_file))
            self.client.tls_set_context(context)
        if config.username:
            self.client.username_pw_set(config.username, config.password)
        self.client.reconnect_delay_set(1, 5)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.on_connect_fail = self._on_connect_fail
        self._unreachable_said = False

    def start(self) -> None:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]  # paho
        props.SessionExpiryInterval = self.config.session_expiry_s
        props.ReceiveMaximum = self.config.max_in_flight
        self.client.connect_async(self.host, self.port, self.config.keepalive_s,
                                  clean_start=False, properties=props)
        self.client.loop_start()

    def stop(self) -> None:
        self._stopping = True
        self.client.disconnect()
        self.client.loop_stop()

    def ack(self, arrivals: list[Arrival]) -> int:
        """PUBACK what the database committed; skips packets of an older connection."""
        sent = 0
        with self._lock:
            epoch = self.epoch
        for arrival in arrivals:
            if arrival.qos > 0 and arrival.epoch == epoch:
                self.client.ack(arrival.mid, arrival.qos)
                sent += 1
        return sent

    def publish(self, topic: str, payload: bytes, retain: bool = True, qos: int = 1) -> None:
        self.client.publish(topic, payload, qos=qos, retain=retain)

    # -- paho callbacks (its network thread) -----------------------------------------
    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason_code: Any,
                    properties: Any) -> None:
        if getattr(reason_code, "is_failure", False):
            log.warning("fleet ingest: broker refused the connection: %s", reason_code)
            return
        with self._lock:
            self.epoch += 1
        options = SubscribeOptions(qos=1)
        client.subscribe([(f"$share/{self.config.group}/{f}", options) for f in self.filters]
                         + [(f, options) for f in self.plain])
        self.connected.set()
        self._unreachable_said = False
        self._loop.call_soon_threadsafe(self.connected_async.set)
        log.info("fleet ingest connected to %s:%d (group %s)", self.host, self.port,
                 self.config.group)

    def _on_connect_fail(self, client: paho.Client, userdata: Any) -> None:
        if not self._unreachable_said:  # once per outage: paho retries every 1-5 s
            self._unreachable_said = True
            log.warning("fleet ingest: broker %s:%d unreachable; retrying until it answers "
                        "(Ctrl-C or SIGTERM stops)", self.host, self.port)

    def _on_subscribe(self, client: paho.Client, userdata: Any, mid: int, reason_codes: Any,
                      properties: Any) -> None:
        refused = [code for code in reason_codes if getattr(code, "is_failure", False)]
        if refused:
            log.warning("fleet ingest: the broker refused a subscription: %s", refused)
        self._loop.call_soon_threadsafe(self.subscribed_async.set)

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any, reason_code: Any,
                       properties: Any) -> None:
        self.connected.clear()
        if not self._stopping:
            self._loop.call_soon_threadsafe(self.connected_async.clear)
            log.warning("fleet ingest: connection lost (%s); reconnecting", reason_code)

    def _on_message(self, client: paho.Client, userdata: Any, message: Any) -> None:
        received = time.time_ns()
        with self._lock:
            self._arrived.append(Arrival(self.epoch, message.mid, message.qos, message.topic,
                                         bytes(message.payload), received))
            wake, self._wake_pending = not self._wake_pending, True
        if wake:  # one loop wake-up per burst, not per message (each is a self-pipe write)
            self._loop.call_soon_threadsafe(self._hand_over)

    def _hand_over(self) -> None:
        """On the event loop: pass what arrived since the last wake-up to the sink."""
        with self._lock:
            arrived, self._arrived, self._wake_pending = self._arrived, [], False
        for arrival in arrived:
            self._sink(arrival)
