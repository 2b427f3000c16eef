"""Links to Modbus meters: TCP, and RTU lines shared by every source on one serial port.

A link reads and writes registers or raises one of our AdapterErrors (``line-down``,
``no-response`` and the RTU diagnoses of :func:`rtu.diagnose_reply`, ``exception``).

RS-485 sharing: every source on the same serial port in one event loop shares one
pymodbus client and one lock (:class:`_SharedLine`), so requests to different unit ids
never overlap on the wire, and consecutive frames keep the 3.5-character silent interval
("MODBUS over Serial Line V1.02" s2.5.1.1). Two sources naming one port with different
line settings is a configuration error, found before anything runs
(``ModbusRtuSource.claims`` and ``agent.runtime.build_sources``).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from pymodbus import FramerType
from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusException

from agent.errors import AdapterIOError, AdapterTimeout, AdapterUnavailable
from firmware_adapters.base import raise_if_cancelled
from firmware_adapters.modbus.registers import FUNCTION_INPUT
from firmware_adapters.modbus.rtu import LineFormat, diagnose_reply


@dataclass(frozen=True, slots=True)
class PollConfig:
    interval_s: float = 1.0
    timeout_s: float = 0.5
    retries: int = 1
    backoff_initial_s: float = 0.2
    backoff_max_s: float = 10.0
    silent_after: int = 3

class Link:
    """One connection to meters: read registers or raise one of our AdapterErrors."""

    async def open(self) -> None:
        raise NotImplementedError

    async def read(self, function: int, address: int, count: int, unit: int) -> list[int]:
        raise NotImplementedError

    async def write(self, address: int, values: list[int], unit: int) -> None:
        """Write holding registers (function 16; a signed meter's transaction commands)."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


async def _read_with(client: AsyncModbusTcpClient | AsyncModbusSerialClient, function: int,
                     address: int, count: int, unit: int) -> list[int]:
    call = client.read_input_registers if function == FUNCTION_INPUT \
        else client.read_holding_registers
    try:
        reply = await call(address, count=count, device_id=unit)
    except ConnectionException as exc:
        raise AdapterUnavailable("meter line is down", reason="line-down") from exc
    except ModbusException as exc:
        raise AdapterTimeout(f"unit {unit}: no valid reply", reason="no-response") from exc
    raise_if_cancelled()   # pymodbus's wait_for can lose our cancel (firmware_adapters.base)
    if reply.isError():
        code = getattr(reply, "exception_code", 0)
        raise AdapterIOError(f"unit {unit}: exception reply {code}", reason="exception")
    return list(reply.registers)


async def _write_with(client: AsyncModbusTcpClient | AsyncModbusSerialClient, address: int,
                      values: list[int], unit: int) -> None:
    try:
        reply = await client.write_registers(address, values, device_id=unit)
    except ConnectionException as exc:
        raise AdapterUnavailable("meter line is down", reason="line-down") from exc
    except ModbusException as exc:
        raise AdapterTimeout(f"unit {unit}: no valid reply", reason="no-response") from exc
    raise_if_cancelled()
    if reply.isError():
        code = getattr(reply, "exception_code", 0)
        raise AdapterIOError(f"unit {unit}: exception reply {code} to a write",
                             reason="exception")


class TcpLink(Link):
    def __init__(self, host: str, port: int, poll: PollConfig) -> None:
        self.host, self.port, self.poll = host, port, poll
        self.client: AsyncModbusTcpClient | None = None

    async def open(self) -> None:
        self.close()
        client = AsyncModbusTcpClient(self.host, port=self.port, timeout=self.poll.timeout_s,
                                      retries=self.poll.retries, reconnect_delay=0)
        if not await client.connect():
            client.close()
            raise AdapterUnavailable(f"cannot connect to {self.host}:{self.port}",
                                     reason="line-down")
        self.client = client

    async def read(self, function: int, address: int, count: int, unit: int) -> list[int]:
        if self.client is None or not self.client.connected:
            raise AdapterUnavailable("meter connection lost", reason="line-down")
        return await _read_with(self.client, function, address, count, unit)

    async def write(self, address: int, values: list[int], unit: int) -> None:
        if self.client is None or not self.client.connected:
            raise AdapterUnavailable("meter connection lost", reason="line-down")
        await _write_with(self.client, address, values, unit)

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None


class _SharedLine:
    """One RS-485 port: one client, one lock, shared by every source on that port."""

    _lines: dict[tuple[int, str], _SharedLine] = {}

    def __init__(self, key: tuple[int, str], line: LineFormat, poll: PollConfig) -> None:
        self.key, self.port, self.line, self.poll = key, key[1], line, poll
        self.lock = asyncio.Lock()
        self.client: AsyncModbusSerialClient | None = None
        self.users = 0
        self.received = b""
        self.last_frame_end = 0.0

    @classmethod
    def acquire(cls, port: str, line: LineFormat, poll: PollConfig) -> _SharedLine:
        key = (id(asyncio.get_running_loop()), port)
        shared = cls._lines.get(key)
        if shared is None:
            shared = cls._lines[key] = cls(key, line, poll)
        elif shared.line != line:
            raise AdapterUnavailable(f"{port} is already open with {shared.line}",
                                     reason="line-conflict")
        shared.users += 1
        return shared

    def release(self) -> None:
        self.users -= 1
        if self.users <= 0:
            self._drop()
            _SharedLine._lines.pop(self.key, None)

    def _trace(self, sending: bool, data: bytes) -> bytes:
        # pymodbus hands the whole receive buffer each time; keep the latest for diagnosis.
        if sending:
            self.received = b""
        else:
            self.received = data
        return data

    async def ensure_open(self) -> AsyncModbusSerialClient:
        if self.client is not None and self.client.connected:
            return self.client
        self._drop()
        client = AsyncModbusSerialClient(
            self.port, framer=FramerType.RTU, baudrate=self.line.baudrate,
            bytesize=self.line.bytesize, parity=self.line.parity,
            stopbits=self.line.stopbits, timeout=self.poll.timeout_s,
            retries=self.poll.retries, reconnect_delay=0, trace_packet=self._trace)
        if not await client.connect():
            client.close()
            raise AdapterUnavailable(f"cannot open {self.port}", reason="line-down")
        self.client = client
        return client

    def _drop(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None

    async def read(self, function: int, address: int, count: int, unit: int) -> list[int]:
        async with self.lock:
            client = await self.ensure_open()
            gap = self.last_frame_end + self.line.silent_interval_s - time.monotonic()
            if gap > 0:
                await asyncio.sleep(gap)
            try:
                return await _read_with(client, function, address, count, unit)
            except AdapterTimeout as exc:
                reason = diagnose_reply(self.received, unit, function)
                raise AdapterTimeout(f"unit {unit}: {reason}", reason=reason) from exc
            except AdapterUnavailable:
                self._drop()
                raise
            finally:
                self.last_frame_end = time.monotonic()

    async def write(self, address: int, values: list[int], unit: int) -> None:
        async with self.lock:
            client = await self.ensure_open()
            gap = self.last_frame_end + self.line.silent_interval_s - time.monotonic()
            if gap > 0:
                await asyncio.sleep(gap)
            try:
                await _write_with(client, address, values, unit)
            except AdapterUnavailable:
                self._drop()
                raise
            finally:
                self.last_frame_end = time.monotonic()


class RtuLink(Link):
    def __init__(self, port: str, line: LineFormat, poll: PollConfig) -> None:
        self.port, self.line, self.poll = port, line, poll
        self.shared: _SharedLine | None = None

    async def open(self) -> None:
        if self.shared is None:
            self.shared = _SharedLine.acquire(self.port, self.line, self.poll)
        async with self.shared.lock:
            await self.shared.ensure_open()

    async def read(self, function: int, address: int, count: int, unit: int) -> list[int]:
        if self.shared is None:
            raise AdapterUnavailable("line not opened", reason="line-down")
        return await self.shared.read(function, address, count, unit)

    async def write(self, address: int, values: list[int], unit: int) -> None:
        if self.shared is None:
            raise AdapterUnavailable("line not opened", reason="line-down")
        await self.shared.write(address, values, unit)

    def close(self) -> None:
        if self.shared is not None:
            self.shared.release()
            self.shared = None


