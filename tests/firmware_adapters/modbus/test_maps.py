"""Every built-in map against a pymodbus peer holding hand-written register contents.

The peer here is not the meter simulator: its registers are written by this test from
each maker's document (address, type, word order, scale), independent of the map files.
The trap value of each map decodes to the expected Wh only when the map's address, type,
word order and scale are all right; every other register holds junk.
"""

from __future__ import annotations

import asyncio
import struct

import pytest
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType as SimType
from pymodbus.simulator import SimData, SimDevice

from firmware_adapters.modbus.driver import ModbusTcpSource
from firmware_adapters.modbus.mapfile import builtin_maps
from tests.firmware_adapters.modbus.support import Sink

TRAP_WH = 12_345_678  # 12345.678 kWh


def f32(value: float) -> list[int]:
    data = struct.pack(">f", value)
    return [int.from_bytes(data[:2], "big"), int.from_bytes(data[2:], "big")]


def be(value: int, words: int) -> list[int]:
    data = value.to_bytes(2 * words, "big", signed=True)
    return [int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2)]


def lsw_first(value: int) -> list[int]:
    return list(reversed(be(value, 2)))


# map -> (function, {address: words}) for the import energy trap, as each document says.
# float32 kWh cannot hold 12345.678 exactly: the expected value is the float's own.
F32_KWH = round(struct.unpack(">f", struct.pack(">f", 12345.678))[0] * 1000)
TRAPS: dict[str, tuple[int, dict[int, list[int]], int]] = {
    "sdm630": (4, {0x0048: f32(12345.678)}, F32_KWH),     # 30073 import kWh, float32
    "sdm120": (4, {0x0048: f32(12345.678)}, F32_KWH),
    "sdm72d": (4, {0x0048: f32(12345.678)}, F32_KWH),
    "sdm230": (4, {0x0048: f32(12345.678)}, F32_KWH),
    "abb_b23": (3, {0x5000: be(1_234_568, 4)}, 12_345_680),  # uint64 0.01 kWh
    "em340": (4, {0x0034: lsw_first(123_457)}, 12_345_700),  # int32 LSW first, 0.1 kWh
    "eem350": (4, {0x003E: lsw_first(123_457)}, 12_345_700),  # int32 LSW first, 0.1 kWh
    "iem3x5x": (3, {3203: be(TRAP_WH, 4)}, TRAP_WH),          # reg 3204, int64 Wh
    "dtsu666": (3, {0x101E: f32(12345.678)}, F32_KWH),        # float32 kWh
    "finder7m": (4, {2752: f32(12345678.0)}, 12_345_678),     # float32 Wh
    "wm3m4": (4, {418: be(1_234_568, 2), 414: [1]}, 12_345_680),  # int32 x 10^1 Wh
}


def test_every_builtin_map_has_a_trap() -> None:
    assert set(TRAPS) == set(builtin_maps())


async def serve(function: int, registers: dict[int, list[int]]) -> tuple[ModbusTcpServer, int]:
    """A plain pymodbus server: junk (0x4D4D) everywhere, the trap where it belongs."""
    junk = [0x4D4D] * 65_535
    for address, words in registers.items():
        junk[address:address + len(words)] = words
    regs = SimData(0, values=junk, datatype=SimType.REGISTERS)
    empty = SimData(0, count=65_535, values=0x4D4D, datatype=SimType.REGISTERS)
    bits = [SimData(0, count=16, values=False, datatype=SimType.BITS)]
    holding, inputs = (regs, empty) if function == 3 else (empty, regs)
    device = SimDevice(id=1, simdata=(bits, list(bits), [holding], [inputs]))
    server = ModbusTcpServer([device], address=("127.0.0.1", 0))
    await server.serve_forever(background=True)
    return server, server.transport.sockets[0].getsockname()[1]  # type: ignore[union-attr]


@pytest.mark.parametrize("map_name", sorted(TRAPS))
def test_the_trap_value_decodes_only_with_the_right_map(map_name) -> None:
    function, registers, expected = TRAPS[map_name]

    async def main():
        server, port = await serve(function, registers)
        source = ModbusTcpSource.from_options("m", {"host": "127.0.0.1", "port": port,
                                                    "map": map_name, "timeout_s": 1.0,
                                                    "retries": 0}, "t")
        sink = Sink()
        try:
            assert await source.ensure_line(sink)
            assert await source.poll_once(sink) == 1, sink.codes()
        finally:
            source.link.close()
            await server.shutdown()
        return sink

    sink = asyncio.run(asyncio.wait_for(main(), 30))
    energy = [r for r in sink.readings if r.name == "1-0:1.8.0"]
    assert [r.value for r in energy] == [expected]
