"""Optional Prometheus endpoint: ``GET /metrics`` on a loopback port.

Scope: render an :class:`agent.status.AgentStatus` snapshot in the Prometheus text
exposition format 0.0.4 (``# HELP``/``# TYPE`` lines, ``name{label="value"} number``;
label values escape backslash, double quote and newline), and a tiny asyncio HTTP/1.1
server that serves it. The numbers are the ones the status file shows: one source of truth.

The server speaks just enough HTTP (RFC 9112): a request line and headers within 8 KiB and
5 s, ``GET``/``HEAD`` on ``/metrics``, one response, ``Connection: close``. Anything else gets
400/404/405 and is counted in ``counters``; a slow or hostile client cannot hold more than
``MAX_CLIENTS`` connections. It binds loopback only: a node exporter or an SSH tunnel reaches
it, the fleet network does not (the agent exposes no port to the outside).

Config, ``[metrics]``: ``enabled`` (false), ``host`` ("127.0.0.1"), ``port`` (9466).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import math
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from agent.options import Table
from agent.status import AgentStatus

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_REQUEST_BYTES = 8192
REQUEST_TIMEOUT_S = 5.0
MAX_CLIENTS = 8
DEFAULT_PORT = 9466

log = logging.getLogger("edge_agent.metrics")


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT

    @classmethod
    def from_table(cls, table: Table) -> MetricsConfig:
        host = table.str("host", "127.0.0.1")
        if host != "localhost":
            try:
                loopback = ipaddress.ip_address(host).is_loopback
            except ValueError:
                loopback = False
            if not loopback:
                raise table.error("host", "a loopback address (127.0.0.1, ::1, localhost)", host)
        value = cls(enabled=table.bool("enabled", False), host=host,
                    port=table.int("port", DEFAULT_PORT, min=0, max=65535))
        table.reject_unknown()
        return value


# --- exposition -----------------------------------------------------------------------------

def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    """Integers exactly; floats as repr, with the format's spellings of NaN and infinities."""
    if not isinstance(value, float):
        return str(int(value))
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


def _sample(name: str, value: float, **labels: str) -> str:
    text = ",".join(f'{key}="{_escape(val)}"' for key, val in labels.items())
    number = _number(value)
    return f"{name}{{{text}}} {number}" if text else f"{name} {number}"


class _Family:
    def __init__(self, name: str, kind: str, help_text: str) -> None:
        self.name, self.lines = name, [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]

    def add(self, value: float, **labels: str) -> None:
        self.lines.append(_sample(self.name, value, **labels))


def _families(status: AgentStatus) -> Iterator[_Family]:
    def family(name: str, kind: str, help_text: str) -> _Family:
        return _Family(f"edge_agent_{name}", kind, help_text)

    info = family("info", "gauge", "Agent identity; always 1.")
    info.add(1, device=status.device_id, role=status.role, version=status.version)
    yield info
    start = family("start_time_seconds", "gauge", "When the agent started (Unix time).")
    start.add(status.started_ns / 1e9)
    yield start
    running = family("running", "gauge", "1 while the runtime is in state running.")
    running.add(1 if status.state == "running" else 0)
    yield running

    up = family("source_up", "gauge", "1 while the source is running.")
    readings = family("source_readings_total", "counter", "Readings emitted by the source.")
    rate = family("source_rate_hz", "gauge", "Readings per second over the last window.")
    faults = family("source_faults_total", "counter", "Faults counted by the source, by reason.")
    requests = family("source_requests_total", "counter",
                      "Requests the source sent (OBD polls), by kind: work, not faults.")
    for source in status.sources:
        up.add(1 if source.state == "running" else 0, source=source.id, kind=source.kind)
        readings.add(source.readings, source=source.id)
        rate.add(float(source.rate_hz), source=source.id)
        for reason, count in sorted(source.counters.items()):
            faults.add(count, source=source.id, reason=reason)
        for kind, count in sorted(source.requests.items()):
            requests.add(count, source=source.id, kind=kind)
    yield from (up, readings, rate, faults, requests)

    if status.spool is not None:
        spool = status.spool
        for name, kind, text, value in (
            ("spool_envelopes", "gauge", "Envelopes committed, not yet acknowledged.",
             spool.depth),
            ("spool_bytes", "gauge", "Bytes held by the spool.", spool.bytes),
            ("spool_capacity_bytes", "gauge", "Spool capacity limit.", spool.capacity_bytes),
            ("spool_dropped_total", "counter", "Envelopes deleted unsent (declared drops).",
             spool.dropped),
            ("next_seq", "gauge", "The next envelope sequence number.", spool.next_seq),
        ):
            item = family(name, kind, text)
            item.add(value)
            yield item

    if status.uplink is not None:
        link = status.uplink
        connected = family("uplink_connected", "gauge", "1 while connected to the broker.")
        connected.add(1 if link.state == "connected" else 0, broker=link.broker)
        yield connected
        for name, kind, text, value in (
            ("uplink_published_total", "counter", "Messages acknowledged by the broker.",
             link.published),
            ("uplink_in_flight", "gauge", "Messages sent, not yet acknowledged.", link.in_flight),
            ("uplink_reconnects_total", "counter", "Reconnections to the broker.",
             link.reconnects),
        ):
            item = family(name, kind, text)
            item.add(value)
            yield item

    nonce = family("channel_nonce", "gauge", "Latest co-signed state nonce.")
    energy = family("channel_energy_wh", "gauge", "Cumulative metered energy in the channel.")
    paid = family("channel_paid", "gauge", "Cumulative amount paid, token's smallest unit.")
    session = family("channel_session", "gauge",
                     "1 per session, labelled with its phase and settlement job state.")
    for ch in status.channels:
        session.add(1, channel=ch.channel_id, peer=ch.peer, phase=ch.state,
                    settlement=ch.settlement or "none")
        nonce.add(ch.nonce, channel=ch.channel_id, peer=ch.peer)
        energy.add(ch.energy_wh, channel=ch.channel_id, peer=ch.peer)
        paid.add(ch.t_ev, channel=ch.channel_id, direction="vehicle_to_station")
        paid.add(ch.t_cs, channel=ch.channel_id, direction="station_to_vehicle")
    yield from (session, nonce, energy, paid)

    errors = family("recent_errors", "gauge", "Errors among the last ones kept, by place/reason.")
    for (where, reason), count in sorted(Counter((e.where, e.reason)
                                                 for e in status.errors).items()):
        errors.add(count, where=where, reason=reason)
    yield errors


def render_metrics(status: AgentStatus) -> str:
    """The whole exposition, newline-terminated (the format requires the final newline)."""
    return "".join(line + "\n" for item in _families(status) for line in item.lines)


# --- server ---------------------------------------------------------------------------------

class MetricsServer:
    """``async with MetricsServer(snapshot, host, port) as server:`` or ``await serve()``.

    ``snapshot`` returns the current AgentStatus (the runtime's ``status()``); it is called
    once per scrape, in the event loop, so it must be cheap and not block.
    """

    def __init__(self, snapshot: Callable[[], AgentStatus], host: str = "127.0.0.1",
                 port: int = DEFAULT_PORT) -> None:
        self.snapshot, self.host, self.port = snapshot, host, port
        self.counters: Counter[str] = Counter()
        self._server: asyncio.Server | None = None
        self._clients = asyncio.Semaphore(MAX_CLIENTS)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port,
                                                  limit=MAX_REQUEST_BYTES)
        self.port = self._server.sockets[0].getsockname()[1]   # the real one when port=0

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def serve(self) -> None:
        """For the runtime's TaskGroup (task ``metrics``): serve until cancelled."""
        await self.start()
        try:
            await asyncio.Event().wait()
        finally:
            await self.close()

    async def __aenter__(self) -> MetricsServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._clients.locked():
            self.counters["busy"] += 1
            writer.close()
            return
        async with self._clients:
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT_S):   # not wait_for: gh-86296
                    status, body, head_only = await self._respond(reader)
            except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                    ValueError, ConnectionError):
                self.counters["bad-request"] += 1
                status, body, head_only = "400 Bad Request", "bad request\n", False
            try:
                self.counters[status.split()[0]] += 1
                writer.write(_response(status, body, head_only))
                await writer.drain()
            except ConnectionError:
                self.counters["client-gone"] += 1
            finally:
                writer.close()
                with contextlib.suppress(ConnectionError):
                    await writer.wait_closed()

    async def _respond(self, reader: asyncio.StreamReader) -> tuple[str, str, bool]:
        request = await reader.readuntil(b"\r\n\r\n")      # LimitOverrunError past 8 KiB
        parts = request.split(b"\r\n", 1)[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            raise ValueError("not an HTTP/1.x request line")
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        if method not in (b"GET", b"HEAD"):
            return "405 Method Not Allowed", "only GET and HEAD\n", False
        if target != b"/metrics":
            return "404 Not Found", "try /metrics\n", method == b"HEAD"
        try:
            body = render_metrics(self.snapshot())
        except Exception:  # noqa: BLE001 - a bug behind the snapshot must not kill the server
            # ... but it is a bug: log it with its traceback, so it can be found and fixed.
            self.counters["render-failed"] += 1
            log.exception("metrics: rendering the status snapshot failed")
            return "500 Internal Server Error", "snapshot failed\n", False
        return "200 OK", body, method == b"HEAD"


def _response(status: str, body: str, head_only: bool) -> bytes:
    data = body.encode()
    content_type = CONTENT_TYPE if status.startswith("200") else "text/plain; charset=utf-8"
    head = (f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n"
            + ("Allow: GET, HEAD\r\n" if status.startswith("405") else "") + "\r\n")
    return head.encode() + (b"" if head_only else data)
