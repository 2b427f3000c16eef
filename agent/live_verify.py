"""``edge-agent verify --mqtt URL``: subscribe to the fleet's envelopes and verify them live.

Subscribes (QoS 1) to ``evedge/v1/+/telemetry`` and ``evedge/v1/+/event`` and feeds every
message to :class:`agent.verify.Verifier`: gaps, reused seqs, broken links, bad signatures,
and duplicates (QoS 1 redelivery, reported and removed). It also reads every device's
retained status (``evedge/v1/+/status``): the signed chain head in it (agent.chain_head)
shows a truncated tail ("device says seq 4949, last seen 4944"). Stops when a condition holds: a
number of envelopes, a quiet period, a deadline, or a caller's predicate.

With a fixed ``client_id`` and ``persistent=True`` the broker keeps a session for the
verifier: envelopes published while it was away are queued for it (up to the broker's
``max_queued_messages``; beyond that mosquitto drops them silently, and the verifier then
reports the loss as a gap: ship ``config/mosquitto-fleet.conf`` on the fleet side).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from agent.chain_head import head_from_status
from agent.errors import UplinkError
from agent.fleet_keys import FleetRegistry
from agent.topics import ROOT
from agent.uplink import MqttConfig, Uplink
from agent.verify import Verifier, VerifyReport

TOPICS = (f"{ROOT}/+/telemetry", f"{ROOT}/+/event")
STATUS_TOPICS = f"{ROOT}/+/status"


@dataclass
class LiveVerifier:
    """A Verifier fed from MQTT, remembering the order envelopes first arrived in."""

    registry: FleetRegistry
    verifier: Verifier = field(init=False)
    arrivals: list[tuple[str, int]] = field(default_factory=list)
    messages: int = 0

    def __post_init__(self) -> None:
        self.verifier = Verifier(self.registry)

    def add(self, payload: bytes, topic: str = "") -> None:
        if topic.endswith("/status"):
            head = head_from_status(payload)
            if head is not None:
                self.verifier.add_head(head)
            return
        self.messages += 1
        opened = self.verifier.add(payload)
        if opened is not None:
            self.arrivals.append((opened.device, opened.seq))

    def report(self) -> VerifyReport:
        return self.verifier.report()


def mqtt_config(url: str, *, client_id: str | None = None, ca_file: Path | None = None,
                cert_file: Path | None = None, key_file: Path | None = None,
                persistent: bool = False) -> MqttConfig:
    client_id = client_id or f"edge-agent-verify-{os.getpid()}"
    return MqttConfig.from_url(url, client_id, ca_file=ca_file, cert_file=cert_file,
                               key_file=key_file, keepalive_s=10, backoff_initial_s=0.1,
                               backoff_max_s=2.0,
                               session_expiry_s=3600 if persistent else 0)


async def collect(up: Uplink, live: LiveVerifier, *, until: Callable[[LiveVerifier], bool],
                  idle_s: float | None = None, timeout_s: float | None = None) -> None:
    """Feed ``live`` from ``up`` until ``until(live)``, ``idle_s`` without a message, or
    ``timeout_s`` (no error: the report says what arrived)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    messages = up.messages()
    while not until(live):
        wait = idle_s
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            wait = left if wait is None else min(wait, left)
        try:
            async with asyncio.timeout(wait):  # not wait_for: it can lose a cancel (gh-86296)
                message = await anext(messages)
        except TimeoutError:
            return
        live.add(message.payload, message.topic)


async def verify_mqtt(url: str, registry: FleetRegistry, *, envelopes: int | None = None,
                      idle_s: float | None = 10.0, timeout_s: float | None = None,
                      until: Callable[[LiveVerifier], bool] | None = None,
                      client_id: str | None = None, ca_file: Path | None = None,
                      cert_file: Path | None = None, key_file: Path | None = None,
                      persistent: bool = False,
                      subscribed: asyncio.Event | None = None) -> VerifyReport:
    """Subscribe to every device's telemetry and events at ``url`` and verify what comes.

    Stops after ``envelopes`` distinct envelopes, after ``idle_s`` seconds without a
    message, after ``timeout_s``, or when ``until(live)`` is true, whichever comes first.
    ``subscribed`` (if given) is set once the broker acknowledged the subscriptions
    (SUBACK): a caller that publishes after it loses nothing to a race.
    """
    live = LiveVerifier(registry)

    def done(state: LiveVerifier) -> bool:
        if envelopes is not None and len(state.arrivals) >= envelopes:
            return True
        return until is not None and until(state)

    config = mqtt_config(url, client_id=client_id, ca_file=ca_file, cert_file=cert_file,
                         key_file=key_file, persistent=persistent)
    async with Uplink(config) as up:
        if subscribed is not None:  # subscribe on a live connection: returns on SUBACK
            async with asyncio.timeout(timeout_s):
                await up.wait_connected()
        for topic in (*TOPICS, STATUS_TOPICS):
            await up.subscribe(topic)
        if subscribed is not None:
            subscribed.set()
        await collect(up, live, until=done, idle_s=idle_s, timeout_s=timeout_s)
    if up.epoch == 0:
        # Never connected: nothing was verified because nothing could be, an error (not
        # a verification that found no envelope).
        why = up.last_error if up.last_error is not None else "unreachable"
        raise UplinkError(f"broker {config.host}:{config.port}: {why}; nothing was verified",
                          reason="unreachable")
    return live.report()
