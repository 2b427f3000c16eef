"""``elm327``: OBD-II through an ELM327 (or compatible) adapter on a serial port.

The port is opened non-blocking and watched with ``loop.add_reader``: bytes go straight into
the sans-I/O :class:`~firmware_adapters.obd.elm327.ReplyParser`; frame lines go through the
same ISO-TP reassembly and :class:`~firmware_adapters.obd.scheduler.Poller` as on CAN. A port
that vanishes (adapter unplugged, pty closed) or stays mute for ``max_timeouts`` commands is
closed and reopened with back-off, and the adapter is initialised again. Config::

    [[sources]]
    id = "elm0"
    kind = "elm327"
    port = "/dev/ttyUSB0"
    baudrate = 38400            # 38400 is the ELM327 default; many clones use 115200
    command_timeout_ms = 2000   # until the prompt; the adapter's own ATST answers NO DATA first
    max_pids = 6                # 1 for clones that refuse multi-PID requests (they say "?")
    pids = { SPEED = 1.0, RPM = 0.5 }
    profile = "vw-meb"          # optional: UDS DIDs of an EV family (ATSH/ATCRA per ECU)

At open the port is flushed and the init checks each reply against its command: a reply
that does not match (a stale one, left by another program) makes the driver resynchronise
(``ATI``, drop replies until the version banner) before going on; so does an OBD reply that
does not answer its request (:func:`~firmware_adapters.obd.requester.answers_request`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Mapping
from typing import Self

import serial

from agent.errors import (
    AdapterIOError,
    AdapterTimeout,
    AdapterUnavailable,
    DecodeError,
    OversizeInput,
)
from agent.options import Table
from firmware_adapters.base import Clock, system_clock
from firmware_adapters.obd import elm327
from firmware_adapters.obd.options import POLL_KEYS, poll_settings
from firmware_adapters.obd.requester import Addressing, Transaction
from firmware_adapters.obd.scheduler import Plan
from firmware_adapters.obd.source import Exchange, PollingSource

ELM_KEYS = {"port", "baudrate", "command_timeout_ms", "max_pids", "max_timeouts"}
INIT_TIMEOUT_S = 5.0
SEARCH_TIMEOUT_S = 15.0  # protocol auto-detect tries every protocol in turn
RESYNC_REPLIES = 8
log = logging.getLogger(__name__)  # stale replies dropped at most before giving up and reconnecting


class Elm327Source(PollingSource):
    kind = "elm327"

    def __init__(self, source_id: str, port: str, poll: Mapping[str, object], *,
                 baudrate: int = 38400, command_timeout_s: float = 2.0, max_timeouts: int = 3,
                 slack_km: float = 0.5, clock: Clock = system_clock) -> None:
        super().__init__(source_id, poll, slack_km=slack_km, clock=clock)
        self.port = port
        self.baudrate = baudrate
        self.command_timeout_s = command_timeout_s
        self.max_timeouts = max_timeouts
        self.protocol_bits = 11
        self._serial: serial.Serial | None = None
        self._parser = elm327.ReplyParser(header_digits=0)
        self._replies: asyncio.Queue[elm327.Reply | Exception] = asyncio.Queue()
        self._timeouts = 0
        self._protocol = "6"
        self._header = elm327.Header(11)

    @classmethod
    def from_options(cls, source_id: str, options: Mapping[str, object], where: str) -> Self:
        o = Table.source(options, where, source_id)
        o.reject_unknown(ELM_KEYS | POLL_KEYS)
        poll = poll_settings(o)
        poll["max_pids"] = o.int("max_pids", 6, min=1, max=6)
        return cls(source_id, o.nonempty_str("port"), poll,
                   baudrate=o.int("baudrate", 38400, min=1200, max=4_000_000),
                   command_timeout_s=o.int("command_timeout_ms", 2000, min=50, max=60_000) / 1000,
                   max_timeouts=o.int("max_timeouts", 3, min=1, max=100),
                   slack_km=o.float("slack_km", 0.5, min=0.0, max=100.0))

    # ------------------------------------------------------------------ transport
    async def _open(self) -> None:
        try:
            self._serial = serial.Serial(self.port, self.baudrate, timeout=0,
                                         write_timeout=1.0, exclusive=True)
        except (serial.SerialException, OSError, ValueError) as exc:
            raise AdapterUnavailable(f"cannot open {self.port}: {exc}", source=self.id,
                                     reason="port-open") from exc
        try:  # bytes another program left in the adapter's or the driver's buffer
            self._serial.reset_input_buffer()
        except (serial.SerialException, OSError):
            self.counters["port-flush-error"] += 1
        self._parser.clear()
        self._replies = asyncio.Queue()
        self._timeouts = 0
        self._header = elm327.Header(11)
        asyncio.get_running_loop().add_reader(self._serial.fileno(), self._on_readable)
        await self._initialise()

    async def _close(self) -> None:
        if self._serial is not None:
            ser, self._serial = self._serial, None
            try:
                asyncio.get_running_loop().remove_reader(ser.fileno())
            except (OSError, ValueError):
                pass
            try:
                ser.close()
            except (serial.SerialException, OSError):
                self.counters["port-close-error"] += 1

    def _on_readable(self) -> None:
        assert self._serial is not None
        try:
            data = os.read(self._serial.fileno(), 4096)
        except BlockingIOError:
            return
        except OSError as exc:  # EIO: the pty peer or USB adapter went away
            self._lost(exc)
            return
        if not data:
            self._lost(OSError("end of file on serial port"))
            return
        try:
            for reply in self._parser.receive_data(data):
                self._replies.put_nowait(reply)
        except OversizeInput as exc:
            self.counters[f"elm-{exc.reason}"] += 1

    def _lost(self, exc: Exception) -> None:
        if self._serial is not None:
            try:
                asyncio.get_running_loop().remove_reader(self._serial.fileno())
            except (OSError, ValueError):
                pass
        self._replies.put_nowait(AdapterIOError(f"serial port lost: {exc}", source=self.id,
                                                reason="port-lost"))

    def _drop_stale(self) -> None:
        while not self._replies.empty():
            stale = self._replies.get_nowait()
            if isinstance(stale, Exception):
                raise stale
            self.counters["elm-stale-reply"] += 1

    def _write(self, text: str) -> None:
        assert self._serial is not None
        try:
            self._serial.write(elm327.command(text))
        except (serial.SerialException, OSError) as exc:
            raise AdapterIOError(f"write to {self.port} failed: {exc}", source=self.id,
                                 reason="port-write") from exc

    async def _command(self, text: str, timeout_s: float) -> elm327.Reply:
        """Send one command and wait for its prompt. Stale replies are dropped first."""
        self._drop_stale()
        self._write(text)
        return await self._reply(timeout_s)

    async def _reply(self, timeout_s: float) -> elm327.Reply:
        try:
            async with asyncio.timeout(timeout_s):  # not wait_for: see can_driver
                reply = await self._replies.get()
        except TimeoutError:
            self._timeouts += 1
            self.counters["elm-timeout"] += 1
            if self._timeouts >= self.max_timeouts:
                raise AdapterTimeout(f"no prompt from {self.port} after {self._timeouts} "
                                     "commands", source=self.id, reason="elm-mute") from None
            return elm327.Reply(status=("timeout",))
        if isinstance(reply, Exception):
            raise reply
        self._timeouts = 0
        if reply.garbage:
            self.counters["elm-garbage-line"] += reply.garbage
        for status in reply.status:
            if status not in ("ok", "searching"):
                self.counters[f"elm-{status}"] += 1
        return reply

    async def _resync(self, why: str) -> None:
        """Replies and commands are out of step: send ATI and drop replies until the banner.
        AdapterIOError (reconnect) when the adapter never gets back in step."""
        self.counters["elm-resync"] += 1
        log.info("source %s: resynchronising with the adapter (%s)", self.id, why)
        self._drop_stale()
        self._write(elm327.RESYNC_COMMAND)
        for _ in range(RESYNC_REPLIES):
            reply = await self._reply(INIT_TIMEOUT_S)
            if elm327.is_banner(reply):
                self._header = elm327.Header(-1)  # unknown: set it again before the next use
                return
            self.counters["elm-stale-reply"] += 1
        raise AdapterIOError(f"adapter on {self.port} out of step ({why})", source=self.id,
                             reason="elm-desync")

    async def _at(self, text: str, timeout_s: float = INIT_TIMEOUT_S) -> elm327.Reply:
        """An AT command whose answer is OK (or, for ATZ/ATI, the banner); any other reply
        is stale: resynchronise once and ask again."""
        banner = text in ("ATZ", elm327.RESYNC_COMMAND)
        for attempt in range(2):
            reply = await self._command(text, timeout_s)
            if "timeout" in reply.status or "refused" in reply.status:
                return reply
            if (elm327.is_banner(reply) if banner else "ok" in reply.status) \
                    and not reply.frames:
                return reply
            if attempt == 0:
                await self._resync(f"{text} answered {reply}"[:120])
        return reply

    async def _initialise(self) -> None:
        for text in elm327.INIT_COMMANDS:
            reply = await self._at(text)
            if "timeout" in reply.status or (
                    "refused" in reply.status and text not in elm327.OPTIONAL_COMMANDS):
                raise AdapterIOError(f"adapter refused {text}: {reply}"[:200], source=self.id,
                                     reason="elm-init")
        await self._command(elm327.PROBE_COMMAND, SEARCH_TIMEOUT_S)  # make it search now
        reply = await self._command(elm327.PROTOCOL_COMMAND, INIT_TIMEOUT_S)
        try:
            self.protocol_bits = elm327.protocol_bits(reply)
            self._protocol = next(line[-1] for line in reply.text if line[-1] in "6789A")
            self._parser.header_digits = 3 if self.protocol_bits == 11 else 8
        except (DecodeError, StopIteration):
            # Not found yet (ignition off): header size follows from each line's parity.
            self._parser.header_digits = 0
            self.counters["elm-protocol-unknown"] += 1
        self._header = elm327.Header(self.protocol_bits)

    async def _select(self, plan: Plan) -> int:
        """Point the adapter at the plan's ECU (or back at OBD); returns the id size."""
        route = plan.route
        want = elm327.Header(self.protocol_bits) if route is None else elm327.Header(
            29 if route.extended else 11, route.request_id, route.response_id)
        if want == self._header:
            return want.bits
        old = self._header if self._header.bits > 0 else elm327.Header(
            -1, request_id=0, response_id=0)
        for text in elm327.header_commands(old, want, self._protocol):
            reply = await self._at(text)
            if "ok" not in reply.status:
                self.counters["elm-header-refused"] += 1  # ATCP on some clones
        self._header = want
        if self._parser.header_digits or route is not None:
            self._parser.header_digits = 8 if want.bits == 29 else 3
        return want.bits

    async def _exchange(self, plan: Plan) -> Exchange:
        bits = await self._select(plan)
        reply = await self._command(elm327.obd_command(plan.payload).decode().strip(),
                                    self.command_timeout_s)
        if "refused" in reply.status and len(plan.pids) > 1 and self.poller.max_pids > 1:
            self.poller.max_pids = 1  # this clone cannot do multi-PID requests
            self.counters["elm-multi-pid-off"] += 1
        if "stopped" in reply.status or "buffer-full" in reply.status:
            self.counters["elm-retry"] += 1
        if self._parser.header_digits == 0 and reply.frames:
            bits = 29 if reply.frames[0][0] > 0x7FF else 11
        if reply.text:
            self.counters["elm-unexpected-text"] += len(reply.text)
        now = time.monotonic_ns()
        tx = Transaction(Addressing(bits), plan.payload, now, 0, plan.expected,
                         route=plan.route)
        for arb_id, data in reply.frames:
            tx.receive(arb_id, data, now)  # the adapter itself sends the flow control
        self.rx_errors += tx.errors + tx.incomplete()
        if tx.mismatched:  # the reply answers another request: replies are out of step
            await self._resync(f"reply to {plan.payload.hex()} answers something else")
        return Exchange(tx.answers, silent=reply.silent, heard=tx.heard and not tx.answers)
