"""``edge-agent watch``: a live, decoded and verified view of the fleet's MQTT traffic.

Like ``candump`` or ``mosquitto_sub -v``, but every envelope is verified as it arrives
(signature against the fleet registry, then the device's hash chain), and shown as what it
says: reading names, values and units, events, drop declarations, and the device's retained
status. ``--json`` prints one object a line for scripts.

Scope: :class:`WatchView` is the sans-I/O core (``feed(topic, payload, now_ns)`` returns
the lines to show; no sockets, no clock); :func:`watch` is the thin asyncio loop around the
uplink. Registered as the ``watch`` command through the ``edge_agent.commands`` entry point.

Chain states per device (what the ``chain`` field says):

* ``ok``: signature verifies and ``prev`` is the hash of the previous seq we saw;
* ``first``: the first envelope we saw from the device (nothing to link it to yet);
* ``gap``: seqs are missing since the last one we saw (``missing`` says how many);
* ``broken``: the next seq, but ``prev`` is not the hash of the one before (a fork);
* ``replayed``: a seq at or below the last one (QoS 1 redelivery, or a replay).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from agent.envelope import KIND_DROP, OpenedEnvelope, open_envelope
from agent.errors import (
    BadSignature,
    ConfigError,
    DecodeError,
    MalformedEnvelope,
    RevokedKey,
    UnknownKey,
    UplinkError,
)
from agent.fleet_keys import FleetRegistry
from agent.readings import Reading
from agent.topics import ROOT, device_of

if TYPE_CHECKING:
    from agent.mqtt_connection import Incoming

MAX_READINGS_SHOWN = 6
MAX_STATUS_BYTES = 4096


@dataclass
class _Chain:
    last_seq: int = -1
    last_hash: bytes = b""
    envelopes: int = 0
    failures: int = 0


@dataclass(frozen=True, slots=True)
class WatchLine:
    """One thing to show: ``kind`` is telemetry | event | status | invalid."""

    ts_ns: int
    topic: str
    device: str
    kind: str
    text: str
    data: dict[str, object] = field(default_factory=dict)


class WatchView:
    """Decode and verify each message; keep each device's chain position."""

    def __init__(self, registry: FleetRegistry) -> None:
        self.registry = registry
        self.chains: dict[str, _Chain] = {}

    def feed(self, topic: str, payload: bytes, now_ns: int) -> WatchLine | None:
        device = device_of(topic)
        if device is None:
            return None
        kind = topic.rsplit("/", 1)[-1]
        if kind == "status":
            return self._status(topic, device, payload, now_ns)
        if kind not in ("telemetry", "event"):
            return None
        chain = self.chains.setdefault(device, _Chain())
        try:
            opened = open_envelope(payload, self.registry.lookup)
        except (BadSignature, UnknownKey, RevokedKey, DecodeError, MalformedEnvelope) as exc:
            chain.failures += 1
            why = {"bad-signature": "BAD SIGNATURE", "unknown-key": "UNKNOWN KEY",
                   "revoked-key": "REVOKED KEY"}.get(exc.reason, "MALFORMED")
            return WatchLine(now_ns, topic, device, "invalid", f"{why}: {exc}",
                             {"verified": False, "reason": exc.reason, "error": str(exc)})
        return self._envelope(topic, device, opened, chain, now_ns)

    def _envelope(self, topic: str, device: str, opened: OpenedEnvelope, chain: _Chain,
                  now_ns: int) -> WatchLine:
        missing = 0
        if chain.last_seq < 0:
            state = "first"
        elif opened.seq <= chain.last_seq:
            state = "replayed"
        elif opened.seq == chain.last_seq + 1:
            state = "ok" if opened.prev == chain.last_hash else "broken"
        else:
            state, missing = "gap", opened.seq - chain.last_seq - 1
        if state != "replayed":
            chain.last_seq, chain.last_hash = opened.seq, opened.hash
        chain.envelopes += 1
        owner = self.registry.device_of(opened.kid)
        if owner is not None and owner != opened.device:
            state = "wrong-device"     # a key of one device signing as another
        data: dict[str, object] = {
            "verified": state in ("ok", "first"), "chain": state, "seq": opened.seq,
            "envelope_device": opened.device, "kid": opened.kid.hex(),
            "readings": [_reading_json(r) for r in opened.readings],
            "events": [{"code": e.code, "message": e.message, "ts_ns": e.ts_ns}
                       for e in opened.events]}
        if missing:
            data["missing"] = missing
        if opened.kind == KIND_DROP and opened.drop is not None:
            data["drop"] = {"first": opened.drop.first, "last": opened.drop.last,
                            "count": opened.drop.count, "reason": opened.drop.reason}
        verdict = {"ok": "verified", "first": "verified (first seen)",
                   "gap": f"verified, GAP: {missing} envelope(s) missing",
                   "broken": "signature ok, CHAIN BROKEN (prev does not link)",
                   "replayed": "verified, REPLAYED (seq seen before)",
                   "wrong-device": f"KEY OF ANOTHER DEVICE ({owner})"}[state]
        parts = [_reading_text(r) for r in opened.readings[:MAX_READINGS_SHOWN]]
        if len(opened.readings) > MAX_READINGS_SHOWN:
            parts.append(f"(+{len(opened.readings) - MAX_READINGS_SHOWN} more)")
        parts += [f"EVENT {e.code}: {e.message}" for e in opened.events]
        if "drop" in data:
            assert opened.drop is not None
            parts.append(f"DROPPED seq {opened.drop.first}..{opened.drop.last} "
                         f"({opened.drop.reason})")
        text = f"#{opened.seq} {verdict}" + (f"  {'  '.join(parts)}" if parts else "")
        kind = "event" if topic.endswith("/event") else "telemetry"
        return WatchLine(now_ns, topic, device, kind, text, data)

    @staticmethod
    def _status(topic: str, device: str, payload: bytes, now_ns: int) -> WatchLine:
        try:
            value = json.loads(payload[:MAX_STATUS_BYTES])
            state = str(value.get("state", "?")) if isinstance(value, dict) else "?"
        except ValueError:
            value, state = None, "unreadable"
        return WatchLine(now_ns, topic, device, "status", f"status {state}",
                         {"state": state, "status": value if isinstance(value, dict) else None})


def _reading_text(reading: Reading) -> str:
    value = reading.value
    shown = value.hex() if isinstance(value, bytes) else \
        f"{value:g}" if isinstance(value, float) else str(value)
    unit = f" {reading.unit}" if reading.unit else ""
    flags = f" [{','.join(reading.flags)}]" if reading.flags else ""
    return f"{reading.name}={shown}{unit}{flags}"


def _reading_json(reading: Reading) -> dict[str, object]:
    value = reading.value.hex() if isinstance(reading.value, bytes) else reading.value
    return {"name": reading.name, "value": value, "unit": reading.unit, "ts_ns": reading.ts_ns,
            "time_status": str(reading.time_status.value), "source": reading.source,
            "flags": list(reading.flags)}


def render(line: WatchLine, as_json: bool) -> str:
    if as_json:
        return json.dumps({"ts_ns": line.ts_ns, "device": line.device, "kind": line.kind,
                           "topic": line.topic, **line.data}, ensure_ascii=False)
    clock = time.strftime("%H:%M:%S", time.localtime(line.ts_ns / 1e9))
    return f"{clock}.{line.ts_ns // 1_000_000 % 1000:03d} {line.device} {line.text}"


def topics(device: str | None) -> list[str]:
    middle = "+" if device is None else device
    return [f"{ROOT}/{middle}/{kind}" for kind in ("telemetry", "event", "status")]


QUIET_HINT_S = 10.0


def _quiet_hint(device: str | None, url: str) -> str:
    """Said once when nothing arrived for QUIET_HINT_S: a typo in --device is silent."""
    if device is None:
        return (f"watch: nothing on {url} for {QUIET_HINT_S:g} s: is any device publishing to "
                f"this broker? (still watching)")
    return (f"watch: nothing from device {device} for {QUIET_HINT_S:g} s: is the id right "
            f"(`edge-agent keys show` on the device prints it) and is it publishing to {url}? "
            f"(still watching)")


async def watch(url: str, registry: FleetRegistry, *, device: str | None = None,
                as_json: bool = False, count: int | None = None,
                duration_s: float | None = None, connect_timeout_s: float = 10.0,
                ca_file: Path | None = None, cert_file: Path | None = None,
                key_file: Path | None = None, out: TextIO = sys.stdout) -> int:
    """Print every message until interrupted, ``count`` envelopes or ``duration_s``.
    Returns how many envelopes were shown. An unreachable broker is an UplinkError."""
    from agent.live_verify import mqtt_config
    from agent.uplink import Uplink

    view = WatchView(registry)
    config = mqtt_config(url, client_id=None, ca_file=ca_file, cert_file=cert_file,
                         key_file=key_file)
    shown = 0
    async with Uplink(config) as up:
        try:
            async with asyncio.timeout(connect_timeout_s):
                await up.wait_connected()
        except TimeoutError:
            why = f": {up.last_error}" if up.last_error else ""
            raise UplinkError(f"no broker at {url} after {connect_timeout_s:g} s{why}",
                              reason="unreachable") from None
        for topic in topics(device):
            await up.subscribe(topic)
        messages = up.messages()
        deadline = None if duration_s is None else time.monotonic() + duration_s
        hint_at: float | None = time.monotonic() + QUIET_HINT_S  # once, if nothing comes
        # The next message as a task of its own: a wait that ends for the hint must not
        # cancel it (a cancelled anext would end the message stream).
        pending: asyncio.Future[Incoming] | None = None
        try:
            while count is None or shown < count:
                if pending is None:
                    pending = asyncio.ensure_future(anext(messages))
                ends = [t for t in (deadline, hint_at) if t is not None]
                left = max(0.0, min(ends) - time.monotonic()) if ends else None
                done, _ = await asyncio.wait({pending}, timeout=left)
                if not done:
                    if hint_at is not None and time.monotonic() >= hint_at:
                        hint_at = None
                        print(_quiet_hint(device, url), file=sys.stderr, flush=True)
                        continue
                    break
                message, pending, hint_at = pending.result(), None, None
                line = view.feed(message.topic, message.payload, time.time_ns())
                if line is None:
                    continue
                print(render(line, as_json), file=out, flush=True)
                if line.kind in ("telemetry", "event"):
                    shown += 1
        finally:
            if pending is not None:
                pending.cancel()
    return shown


# --- the command ----------------------------------------------------------------------------

def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``edge-agent watch`` (an ``edge_agent.commands`` entry point)."""
    import os

    help_text = ("live view of readings and events from the broker, decoded and verified "
                 "(signature, hash chain) per device; --json for one object a line")
    p = subparsers.add_parser("watch", help=help_text, description=help_text)
    p.add_argument("--mqtt", metavar="URL", default="mqtt://127.0.0.1:1883",
                   help="broker (default mqtt://127.0.0.1:1883; mqtts://... for TLS)")
    p.add_argument("--device", help="only this device id (default: every device)")
    p.add_argument("--registry", type=Path,
                   default=Path(os.environ.get("EDGE_AGENT_REGISTRY", "fleet.toml")),
                   help="fleet registry to verify against (default: $EDGE_AGENT_REGISTRY or "
                        "./fleet.toml)")
    p.add_argument("--json", action="store_true", help="one JSON object per message")
    p.add_argument("--count", type=int, default=None,
                   help="exit after this many envelopes (default: until Ctrl-C)")
    p.add_argument("--duration", type=float, default=None,
                   help="exit after this many seconds (default: until Ctrl-C)")
    p.add_argument("--ca", type=Path, help="with mqtts://: the CA that signed the broker")
    p.add_argument("--cert", type=Path, help="with mqtts://: client certificate")
    p.add_argument("--key", type=Path, help="with mqtts://: client key")
    p.set_defaults(func=cmd_watch)


def cmd_watch(args: argparse.Namespace) -> int:
    if args.device is not None and any(c in args.device for c in "/+#"):
        raise ConfigError(key="--device", expected="one device id (no /, + or #)",
                          found=args.device)
    if not args.registry.exists():
        raise ConfigError(f"{args.registry}: no fleet registry here; watch verifies every "
                          f"envelope against one: give --registry FILE (`edge-agent registry "
                          f"add` makes it)")
    registry = FleetRegistry.load(args.registry)
    try:
        asyncio.run(watch(args.mqtt, registry, device=args.device, as_json=args.json,
                          count=args.count, duration_s=args.duration, ca_file=args.ca,
                          cert_file=args.cert, key_file=args.key))
    except KeyboardInterrupt:
        pass
    return 0
