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
"""

from __future__ import annotations

import asyncio
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
from firmware_adapters.obd.source import PollingSource

ELM_KEYS = {"port", "baudrate", "command_timeout_ms", "max_pids", "max_timeouts"}
INIT_TIMEOUT_S = 5.0
SEARCH_TIMEOUT_S = 15.0  # protocol auto-detect tries every protocol in turn


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
        self._parser.clear()
        self._replies = asyncio.Queue()
        self._timeouts = 0
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

    async def _command(self, text: str, timeout_s: float) -> elm327.Reply:
        """Send one command and wait for its prompt. Stale replies are dropped first."""
        assert self._serial is not None
        while not self._replies.empty():
            stale = self._replies.get_nowait()
            if isinstance(stale, Exception):
                raise stale
            self.counters["elm-stale-reply"] += 1
        try:
            self._serial.write(elm327.command(text))
        except (serial.SerialException, OSError) as exc:
            raise AdapterIOError(f"write to {self.port} failed: {exc}", source=self.id,
                                 reason="port-write") from exc
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

    async def _initialise(self) -> None:
        for text in elm327.INIT_COMMANDS:
            reply = await self._command(text, INIT_TIMEOUT_S)
            if "timeout" in reply.status or (
                    "refused" in reply.status and text not in elm327.OPTIONAL_COMMANDS):
                raise AdapterIOError(f"adapter refused {text}: {reply}"[:200], source=self.id,
                                     reason="elm-init")
        await self._command(elm327.PROBE_COMMAND, SEARCH_TIMEOUT_S)  # make it search now
        reply = await self._command(elm327.PROTOCOL_COMMAND, INIT_TIMEOUT_S)
        try:
            self.protocol_bits = elm327.protocol_bits(reply)
            self._parser.header_digits = 3 if self.protocol_bits == 11 else 8
        except DecodeError:
            # Not found yet (ignition off): header size follows from each line's parity.
            self._parser.header_digits = 0
            self.counters["elm-protocol-unknown"] += 1

    async def _exchange(self, plan: Plan) -> dict[int, bytes]:
        reply = await self._command(elm327.obd_command(plan.payload).decode().strip(),
                                    self.command_timeout_s)
        if "refused" in reply.status and len(plan.pids) > 1 and self.poller.max_pids > 1:
            self.poller.max_pids = 1  # this clone cannot do multi-PID requests
            self.counters["elm-multi-pid-off"] += 1
        if "stopped" in reply.status or "buffer-full" in reply.status:
            self.counters["elm-retry"] += 1
        bits = self.protocol_bits
        if self._parser.header_digits == 0 and reply.frames:
            bits = 29 if reply.frames[0][0] > 0x7FF else 11
        if reply.text:
            self.counters["elm-unexpected-text"] += len(reply.text)
        now = time.monotonic_ns()
        tx = Transaction(Addressing(bits), plan.payload, now, 0, plan.expected)
        for arb_id, data in reply.frames:
            tx.receive(arb_id, data, now)  # the adapter itself sends the flow control
        self.rx_errors += tx.errors + tx.incomplete()
        return tx.answers
