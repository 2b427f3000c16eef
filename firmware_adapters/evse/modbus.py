"""``kind = "modbus-evse"``: a charge controller over Modbus TCP, driven by a register map.

Thin asyncio around pymodbus's public client and the sans-I/O map codec (``maps.py``): a
status poll sends the map's planned reads and decodes the replies; enable/disable and the
current limit are one write each. Config::

    [[chargers]]
    id = "wb0"
    kind = "modbus-evse"
    map = "phoenix-ev-eth"     # or "alfen-ng9xx", "bender-cc612", or a .toml path
    host = "192.168.1.50"
    port = 502                 # optional
    connectors = [1]           # Alfen Eve Double: [1, 2] (unit id = connector)
    # optional: unit (override the map's unit id), timeout_s, retries, silent_after,
    # backoff_initial_s, backoff_max_s, max_current_a (cap below the map's maximum,
    # e.g. the installation's fuse), setpoint_valid_s (the station's configured validity
    # time, for maps that have one)

Faults (DESIGN s9) map onto AdapterError reasons the base counts: ``no-response`` (time-out
or garbled reply), ``exception`` (a Modbus exception reply), ``line-down`` (TCP refused or
lost: reconnect with back-off). The base (``Charger.watch``) turns them into events and the
silent-charger treatment.

Controllers that forget a set-point (Alfen's validity time, default 60 s) get it rewritten
by :meth:`keepalive` every third of that time, so a healthy agent never lets the station
fall back to its safe current, and a dead one does.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Mapping, Sequence
from typing import Self

from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusException
from pymodbus.pdu import ModbusPDU

from agent.errors import AdapterIOError, AdapterTimeout, AdapterUnavailable
from firmware_adapters.base import raise_if_cancelled
from firmware_adapters.evse.base import Charger, ChargerStatus, charger_table, connector_list
from firmware_adapters.evse.maps import (
    READ_COILS,
    READ_HOLDING,
    WRITE_COIL,
    WRITE_REGISTER,
    ChargerMap,
    Read,
    Write,
    load_map,
)

# pymodbus logs every timeout at ERROR with its own wording; our events say it better.
logging.getLogger("pymodbus").setLevel(logging.CRITICAL)


class ModbusEvseCharger(Charger):
    kind = "modbus-evse"

    def __init__(self, charger_id: str, connectors: tuple[int, ...], charger_map: ChargerMap,
                 host: str, port: int = 502, *, unit: int | None = None,
                 timeout_s: float = 1.0, retries: int = 1, silent_after: int = 3,
                 backoff_initial_s: float = 0.2, backoff_max_s: float = 10.0,
                 max_current_a: float | None = None,
                 setpoint_valid_s: float | None = None) -> None:
        super().__init__(charger_id, connectors, silent_after=silent_after,
                         backoff_initial_s=backoff_initial_s, backoff_max_s=backoff_max_s)
        if max(connectors) > charger_map.max_connectors:
            raise ValueError(f"{charger_map.model} has {charger_map.max_connectors} "
                             "connector(s)")
        self.map, self.host, self.port, self.unit = charger_map, host, port, unit
        self.timeout_s, self.retries = timeout_s, retries
        self.max_current_a = float(charger_map.max_current_a) if max_current_a is None \
            else min(max_current_a, float(charger_map.max_current_a))
        self.setpoint_valid_s = setpoint_valid_s or charger_map.setpoint_valid_s
        self.client: AsyncModbusTcpClient | None = None
        # What we last told each connector: the limit to offer when enabling a controller
        # without an enable switch, and what the keep-alive rewrites.
        self.commanded_a = dict.fromkeys(connectors, float(charger_map.min_current_a))
        self.commanded_on = dict.fromkeys(connectors, False)
        self._written_at: dict[int, float] = {}

    @classmethod
    def from_options(cls, charger_id: str, options: Mapping[str, object], where: str) -> Self:
        o = charger_table(options, where, charger_id)
        map_name = o.nonempty_str("map")
        charger_map = load_map(map_name)
        connectors = connector_list(o)
        if max(connectors) > charger_map.max_connectors:
            raise o.error("connectors", f"connector numbers 1..{charger_map.max_connectors} "
                          f"({charger_map.model})", list(connectors))
        limit = o.raw("max_current_a", None)
        valid = o.raw("setpoint_valid_s", None)
        charger = cls(
            charger_id, connectors, charger_map, o.nonempty_str("host"),
            o.int("port", 502, min=1, max=65535), unit=o.opt_int("unit", min=0, max=255),
            timeout_s=o.float("timeout_s", 1.0, min=0.01, max=60.0),
            retries=o.int("retries", 1, min=0, max=10),
            silent_after=o.int("silent_after", 3, min=1, max=1000),
            backoff_initial_s=o.float("backoff_initial_s", 0.2, min=0.01, max=60.0),
            backoff_max_s=o.float("backoff_max_s", 10.0, min=0.01, max=3600.0),
            max_current_a=None if limit is None else o.float(
                "max_current_a", min=float(charger_map.min_current_a),
                max=float(charger_map.max_current_a)),
            setpoint_valid_s=None if valid is None else o.float(
                "setpoint_valid_s", min=1.0, max=86_400.0))
        o.reject_unknown()
        return charger

    # ------------------------------------------------------------------ connection

    async def open(self) -> None:
        self.close()
        client = AsyncModbusTcpClient(self.host, port=self.port, timeout=self.timeout_s,
                                      retries=self.retries, reconnect_delay=0)
        if not await client.connect():
            client.close()
            raise AdapterUnavailable(f"cannot connect to {self.host}:{self.port}",
                                     reason="line-down")
        self.client = client

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None

    def _client(self) -> AsyncModbusTcpClient:
        if self.client is None or not self.client.connected:
            raise AdapterUnavailable(f"{self.id}: charger connection lost", reason="line-down")
        return self.client

    # ------------------------------------------------------------------ requests

    async def _read(self, read: Read, unit: int) -> Sequence[int]:
        client = self._client()
        if read.function == READ_COILS:
            request = client.read_coils(read.address, count=read.count, device_id=unit)
        elif read.function == READ_HOLDING:
            request = client.read_holding_registers(read.address, count=read.count,
                                                    device_id=unit)
        else:
            request = client.read_input_registers(read.address, count=read.count,
                                                  device_id=unit)
        reply = await self._ask(request, unit, "no valid reply", "exception reply {code} to "
                                f"FC {read.function} at {read.address}")
        if read.function == READ_COILS:
            return [int(bit) for bit in reply.bits[:read.count]]
        return list(reply.registers)

    async def _write(self, write: Write, unit: int) -> None:
        client = self._client()
        if write.function == WRITE_COIL:
            request = client.write_coil(write.address, bool(write.values[0]), device_id=unit)
        elif write.function == WRITE_REGISTER:
            request = client.write_register(write.address, write.values[0], device_id=unit)
        else:
            request = client.write_registers(write.address, list(write.values), device_id=unit)
        await self._ask(request, unit, "no reply to a write",
                        f"write to {write.address} refused (exception {{code}})")

    async def _ask(self, request: Awaitable[ModbusPDU], unit: int, silent: str,
                   refused: str) -> ModbusPDU:
        """One request's reply, pymodbus's failures as ours: the line down, no reply
        (``silent``), an exception reply (``refused``, with ``{code}``)."""
        try:
            reply = await request
        except ConnectionException as exc:
            raise AdapterUnavailable(f"{self.id}: charger line is down",
                                     reason="line-down") from exc
        except ModbusException as exc:
            raise AdapterTimeout(f"{self.id} unit {unit}: {silent}",
                                 reason="no-response") from exc
        raise_if_cancelled()   # pymodbus's wait_for can lose our cancel (adapters' base)
        if reply.isError():
            code = getattr(reply, "exception_code", 0)
            raise AdapterIOError(f"{self.id} unit {unit}: {refused.format(code=code)}",
                                 reason="exception")
        return reply

    def _unit(self, connector: int) -> int:
        return self.map.unit_for(connector, self.unit)

    # ------------------------------------------------------------------ the interface

    async def read_status(self, connector: int) -> ChargerStatus:
        self._check_connector(connector)
        unit = self._unit(connector)
        replies = {read: await self._read(read, unit) for read in self.map.reads}
        return self.map.decode(connector, replies)

    async def set_enabled(self, connector: int, enabled: bool) -> None:
        self._check_connector(connector)
        await self._write(self.map.enable_write(enabled, self.commanded_a[connector]),
                          self._unit(connector))
        self.commanded_on[connector] = enabled
        self._written_at[connector] = time.monotonic()

    async def set_current_limit(self, connector: int, amps: float) -> None:
        self._check_connector(connector)
        if amps > self.max_current_a:
            raise ValueError(f"{self.id}: {amps} A above the configured maximum "
                             f"{self.max_current_a} A")
        if amps == 0:
            raise ValueError(f"{self.id}: 0 A: use set_enabled(connector, False)")
        write = self.map.current_write(amps)   # ValueError for what the device refuses
        self.commanded_a[connector] = amps
        if self.map.enable_coil is None and not self.commanded_on[connector]:
            return  # writing a limit would enable a controller without an enable switch
        await self._write(write, self._unit(connector))
        self._written_at[connector] = time.monotonic()

    async def keepalive(self) -> None:
        """Rewrite the set-point before the controller's validity time runs out."""
        if self.setpoint_valid_s is None:
            return
        now = time.monotonic()
        for connector in self.connectors:
            last = self._written_at.get(connector)
            if last is not None and now - last < self.setpoint_valid_s / 3:
                continue
            await self._write(self.map.enable_write(self.commanded_on[connector],
                                                    self.commanded_a[connector]),
                              self._unit(connector))
            self._written_at[connector] = now
