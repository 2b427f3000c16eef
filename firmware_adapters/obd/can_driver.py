"""``obd-can``: OBD-II over a python-can bus (socketcan, slcan, virtual, udp_multicast ...).

python-can's reader runs in its Notifier thread and hands frames to the event loop through an
AsyncBufferedReader; everything OBD-specific happens in the sans-I/O cores
(:mod:`~firmware_adapters.obd.requester`, :mod:`~firmware_adapters.obd.isotp`,
:mod:`~firmware_adapters.obd.scheduler`). Config::

    [[sources]]
    id = "obd0"
    kind = "obd-can"
    interface = "socketcan"       # any python-can interface name
    channel = "can0"
    bitrate = 500000              # optional; ISO 15765-4 uses 500 or 250 kbit/s
    addressing = 11               # or 29
    request = "functional"        # or "physical" (one ECU: ecu = 0 is the engine ECU)
    response_timeout_ms = 100     # P2 window; J1979 P2max is 50 ms
    max_pids = 6                  # PIDs per request (SAE J1979 allows up to 6 on CAN)
    pids = { SPEED = 1.0, RPM = 0.5, ODOMETER = 10.0 }   # period in seconds
    profile = "hyundai-egmp"      # optional: UDS DIDs of an EV family (obd/profiles/*.toml)
    bus_options = { tty_baudrate = 115200 }              # passed to can.Bus as is
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any, Self

import can

from agent.errors import AdapterIOError, AdapterUnavailable, ConfigError
from agent.options import Table
from firmware_adapters.base import Clock, system_clock
from firmware_adapters.obd.options import POLL_KEYS, poll_settings
from firmware_adapters.obd.requester import CAN_11, Addressing, Frame, Transaction
from firmware_adapters.obd.scheduler import Plan
from firmware_adapters.obd.source import Exchange, PollingSource

CAN_KEYS = {"interface", "channel", "bitrate", "addressing", "request", "ecu", "max_pids",
            "bus_options"}


def bus_kwargs(o: Table) -> dict[str, Any]:
    """python-can ``Bus`` arguments from a source table (shared with ``dbc`` and ``hil-ecu``)."""
    kwargs: dict[str, Any] = {"interface": o.nonempty_str("interface"), "channel": o.nonempty_str("channel")}
    bitrate = o.opt_int("bitrate", min=10_000, max=1_000_000)
    if bitrate is not None:
        kwargs["bitrate"] = bitrate
    extra = o.data.get("bus_options", {})
    if not isinstance(extra, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str | int | float | bool)
            for k, v in extra.items()):
        raise ConfigError(file=o.where, key=f"{o.prefix}.bus_options",
                          expected="a table of plain values", found=extra)
    kwargs.update(extra)
    return kwargs


class ObdCanSource(PollingSource):
    kind = "obd-can"

    def __init__(self, source_id: str, bus: Mapping[str, Any], poll: Mapping[str, object], *,
                 addressing: Addressing = CAN_11, target: int | None = None,
                 window_ns: int = 100_000_000, slack_km: float = 0.5,
                 clock: Clock = system_clock) -> None:
        super().__init__(source_id, poll, slack_km=slack_km, clock=clock)
        self.bus_config = dict(bus)
        self.addressing = addressing
        self.target = target
        self.window_ns = window_ns
        self._bus: can.BusABC | None = None
        self._notifier: can.Notifier | None = None
        self._reader: can.AsyncBufferedReader | None = None

    @classmethod
    def from_options(cls, source_id: str, options: Mapping[str, object], where: str) -> Self:
        o = Table.source(options, where, source_id)
        o.reject_unknown(CAN_KEYS | POLL_KEYS)
        return cls(source_id, bus_kwargs(o), poll_settings_for_can(o),
                   addressing=Addressing(o.choice("addressing", 11, (11, 29))),
                   target=o.int("ecu", 0, min=0, max=255)
                   if o.choice("request", "functional", ("functional", "physical")) == "physical"
                   else None,
                   window_ns=o.int("response_timeout_ms", 100, min=10, max=10_000) * 1_000_000,
                   slack_km=o.float("slack_km", 0.5, min=0.0, max=100.0))

    async def _open(self) -> None:
        # Only response ids reach us: a car's bus carries thousands of broadcast frames/s.
        filters: list[dict[str, int | bool]] = [self.addressing.response_filter]
        profile = self.poller.profile
        for _, route in profile.ecus if profile is not None else ():
            filters.append({"can_id": route.response_id, "extended": route.extended,
                            "can_mask": 0x1FFFFFFF if route.extended else 0x7FF})
        config = {"can_filters": filters, **self.bus_config}
        try:
            self._bus = await asyncio.to_thread(can.Bus, **config)
        except (can.CanError, OSError, ValueError, ImportError) as exc:
            raise AdapterUnavailable(f"cannot open CAN bus {self.bus_config.get('channel')!r}:"
                                     f" {exc}", source=self.id, reason="bus-open") from exc
        self._reader = can.AsyncBufferedReader()
        self._notifier = can.Notifier(self._bus, [self._reader],
                                      loop=asyncio.get_running_loop())

    async def _close(self) -> None:
        if self._notifier is not None:
            self._notifier.stop(timeout=1.0)
            self._notifier = None
        if self._bus is not None:
            bus, self._bus = self._bus, None
            try:
                bus.shutdown()  # quick, and not awaited: a cancelled task must still close it
            except (can.CanError, OSError):
                self.counters["bus-close-error"] += 1

    def _send(self, frame: Frame) -> None:
        assert self._bus is not None
        msg = can.Message(arbitration_id=frame.arb_id, data=frame.data,
                          is_extended_id=frame.extended)
        try:
            self._bus.send(msg, timeout=0.1)
        except (can.CanError, OSError) as exc:
            raise AdapterIOError(f"CAN send failed: {exc}", source=self.id,
                                 reason="send") from exc

    async def _exchange(self, plan: Plan) -> Exchange:
        reader = self._reader
        assert reader is not None
        while not reader.buffer.empty():  # late answers to an earlier request
            reader.buffer.get_nowait()
            self.counters["late-frame"] += 1
        tx = Transaction(self.addressing, plan.payload, time.monotonic_ns(), self.window_ns,
                         plan.expected, self.target, plan.route)
        extended = tx.request_frame.extended
        self._send(tx.request_frame)
        now = time.monotonic_ns()
        while not tx.done(now):
            try:
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation
                # that races with a ready result (CPython gh-86296), and run() never ends.
                async with asyncio.timeout(max(0, tx.deadline() - now) / 1e9):
                    msg = await reader.get_message()
            except TimeoutError:
                now = time.monotonic_ns()
                continue
            now = time.monotonic_ns()
            if msg.is_error_frame or msg.is_remote_frame:
                self.counters["error-frame"] += 1
                continue
            if msg.is_extended_id != extended:
                continue
            for fc in tx.receive(msg.arbitration_id, bytes(msg.data), now):
                self._send(fc)
        self.rx_errors += tx.errors + tx.incomplete()
        return Exchange(tx.answers, silent=not tx.heard, heard=tx.heard and not tx.answers)


def poll_settings_for_can(o: Table) -> dict[str, object]:
    settings = poll_settings(o)
    settings["max_pids"] = o.int("max_pids", 6, min=1, max=6)
    return settings
