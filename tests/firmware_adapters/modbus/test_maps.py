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


async def serve(function: int, registers: dict[int, list[int]],
                other: dict[int, list[int]] | None = None) -> tuple[ModbusTcpServer, int]:
    """A plain pymodbus server: junk (0x4D4D) everywhere, the trap where it belongs in the
    ``function`` table, and ``other`` (identity registers) in the other table."""
    def table(contents: dict[int, list[int]]) -> SimData:
        junk = [0x4D4D] * 65_535
        for address, words in contents.items():
            junk[address:address + len(words)] = words
        return SimData(0, values=junk, datatype=SimType.REGISTERS)

    regs, rest = table(registers), table(other or {})
    bits = [SimData(0, count=16, values=False, datatype=SimType.BITS)]
    holding, inputs = (regs, rest) if function == 3 else (rest, regs)
    device = SimDevice(id=1, simdata=(bits, list(bits), [holding], [inputs]))
    server = ModbusTcpServer([device], address=("127.0.0.1", 0))
    await server.serve_forever(background=True)
    return server, server.transport.sockets[0].getsockname()[1]  # type: ignore[union-attr]


def text(value: str, words: int) -> list[int]:
    data = value.encode("ascii").ljust(2 * words, b"\0")
    return [int.from_bytes(data[i:i + 2], "big") for i in range(0, 2 * words, 2)]


# map -> (function, {address: words}): the model register as each maker documents it (or
# as real meters answer it, where the document is silent; see each map file's notes).
IDENTITY: dict[str, tuple[int, dict[int, list[int]]]] = {
    "abb_b23": (3, {0x8960: text("B23 ", 6)}),       # type designation, ASCII
    "iem3x5x": (3, {49: text("iEM3255", 20)}),       # register 50 "Meter Model", UTF8
    "wm3m4": (4, {1: text("WM3M4C", 8)}),            # 30001-30008 model, ASCII
    "sdm120": (3, {0xFC02: [32]}),                    # 464515 meter code
    "sdm230": (3, {0xFC02: [43]}),
    "sdm630": (3, {0xFC02: [112]}),
    "sdm72d": (3, {0xFC02: [137]}),
    "finder7m": (4, {9000: [5]}),                     # 39000 device group 5 = "7M"
    "em340": (4, {0x000B: [341]}),                    # 000Bh CG identification code
}


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


def test_every_map_with_a_model_register_has_an_identity() -> None:
    from firmware_adapters.modbus.mapfile import load_map
    assert set(IDENTITY) == {name for name in builtin_maps() if load_map(name).model_id}


async def read_auto(function: int, registers: dict[int, list[int]],
                    identity: tuple[int, dict[int, list[int]]]) -> Sink:
    id_function, id_registers = identity
    same = id_function == function
    server, port = await serve(function, {**registers, **id_registers} if same else registers,
                               None if same else id_registers)
    source = ModbusTcpSource.from_options("m", {"host": "127.0.0.1", "port": port,
                                                "map": "auto", "timeout_s": 1.0,
                                                "retries": 0}, "t")
    sink = Sink()
    try:
        assert await source.ensure_line(sink)
        await source.poll_once(sink)
    finally:
        source.link.close()
        await server.shutdown()
    return sink


@pytest.mark.parametrize("map_name", sorted(IDENTITY))
def test_map_auto_picks_the_model_its_document_names(map_name) -> None:
    """The peer holds only the documented model register (junk elsewhere) and the trap:
    map = "auto" must pick exactly this map, and the trap then decodes."""
    from firmware_adapters.modbus.mapfile import load_map
    function, registers, expected = TRAPS[map_name]
    sink = asyncio.run(asyncio.wait_for(read_auto(function, registers, IDENTITY[map_name]), 30))
    identified = [e for e in sink.events if e.code == "meter-identified"]
    assert [dict(e.details)["model"] for e in identified] == [load_map(map_name).model[:64]]
    energy = [r for r in sink.readings if r.name == "1-0:1.8.0"]
    assert [r.value for r in energy] == [expected]


@pytest.mark.parametrize("code", [340, 3410, 34])
def test_a_model_code_must_equal_a_documented_value(code) -> None:
    """340 is the EM340 engineering sample with the other word order (CG protocol v2r17,
    table 2.8-2): no map; 3410 and 34 only share digits with 341."""
    function, registers, _ = TRAPS["em340"]
    sink = asyncio.run(asyncio.wait_for(read_auto(function, registers, (4, {0x000B: [code]})),
                                        30))
    assert not sink.readings
    assert [dict(e.details).get("reason") for e in sink.events] == ["unidentified"]
