"""Register decoding, block planning and map loading (sans-I/O: registers in, ints out)."""

from __future__ import annotations

import math
import struct
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.errors import ConfigError, DecodeError
from firmware_adapters.modbus.mapfile import builtin_maps, load_map, map_from_table
from firmware_adapters.modbus.registers import (
    FLOAT32_MAX,
    MAX_REGISTERS_PER_READ,
    DataType,
    IdentityField,
    IdentityKind,
    MeterMap,
    Order,
    RegisterSpec,
    decode,
    plan_blocks,
    raw_for_value,
    raw_to_registers,
    registers_to_raw,
    scale_raw,
)

INT_RANGES = {
    DataType.UINT16: (0, 2**16 - 1), DataType.INT16: (-(2**15), 2**15 - 1),
    DataType.UINT32: (0, 2**32 - 1), DataType.INT32: (-(2**31), 2**31 - 1),
    DataType.UINT64: (0, 2**64 - 1), DataType.INT64: (-(2**63), 2**63 - 1),
}
ORDERS = [(w, b) for w in Order for b in Order]


def spec(dtype: DataType, word: Order = Order.BIG, byte: Order = Order.BIG,
         scale: str = "1") -> RegisterSpec:
    return RegisterSpec("1-0:1.8.0", 3, 0, dtype, Fraction(scale), word, byte)


def reference_words(dtype: DataType, raw: int | float, word: Order, byte: Order) -> list[int]:
    """Independent of the module: struct big-endian bytes, then split and permute."""
    data = struct.pack(">" + {"uint16": "H", "int16": "h", "uint32": "I", "int32": "i",
                              "uint64": "Q", "int64": "q", "float32": "f",
                              "float64": "d"}[dtype.value], raw)
    pairs = [data[i:i + 2] for i in range(0, len(data), 2)]
    if word is Order.LITTLE:
        pairs.reverse()
    if byte is Order.LITTLE:
        pairs = [p[::-1] for p in pairs]
    return [int.from_bytes(p, "big") for p in pairs]


@pytest.mark.parametrize("dtype", list(INT_RANGES))
@pytest.mark.parametrize(("word", "byte"), ORDERS)
@given(data=st.data())
def test_integer_types_round_trip_every_order(dtype, word, byte, data) -> None:
    low, high = INT_RANGES[dtype]
    raw = data.draw(st.integers(low, high))
    words = reference_words(dtype, raw, word, byte)
    assert registers_to_raw(spec(dtype, word, byte), words) == raw
    assert raw_to_registers(spec(dtype, word, byte), raw) == words


@pytest.mark.parametrize("dtype", [DataType.FLOAT32, DataType.FLOAT64])
@pytest.mark.parametrize(("word", "byte"), ORDERS)
@given(data=st.data())
def test_float_types_round_trip_every_order(dtype, word, byte, data) -> None:
    width = 32 if dtype is DataType.FLOAT32 else 64
    raw = data.draw(st.floats(allow_nan=False, allow_infinity=False, width=width))
    words = reference_words(dtype, raw, word, byte)
    decoded = registers_to_raw(spec(dtype, word, byte), words)
    assert struct.pack(">d", decoded) == struct.pack(">d", raw)
    assert raw_to_registers(spec(dtype, word, byte), raw) == words


@pytest.mark.parametrize("dtype", list(DataType))
@pytest.mark.parametrize(("word", "byte"), ORDERS)
@given(data=st.data())
def test_random_registers_decode_or_raise_only_decode_error(dtype, word, byte, data) -> None:
    words = data.draw(st.lists(st.integers(-5, 70_000), min_size=0, max_size=6))
    try:
        value = decode(spec(dtype, word, byte, "0.01"), words)
    except DecodeError:
        return
    assert isinstance(value, int)
    assert len(words) == dtype.words and all(0 <= w <= 0xFFFF for w in words)


@given(st.integers(0, 2**32 - 1), st.sampled_from(["0.1", "0.01", "10", "1000", "1/3"]))
def test_scaling_is_exact_half_even(raw, scale) -> None:
    got = decode(spec(DataType.UINT32, scale=scale), reference_words(DataType.UINT32, raw,
                                                                     Order.BIG, Order.BIG))
    assert got == round(Fraction(raw) * Fraction(scale))
    assert isinstance(got, int)


def test_word_order_trap_gives_a_different_value() -> None:
    # 123456 = 0x0001_E240: the two words differ, so reading LSW-first as MSW-first is wrong.
    lsw_first = [0xE240, 0x0001]
    assert decode(spec(DataType.INT32, Order.LITTLE), lsw_first) == 123456
    assert decode(spec(DataType.INT32, Order.BIG), lsw_first) == 0xE240_0001 - 2**32


def test_float_widening_is_exact() -> None:
    s = spec(DataType.FLOAT32, scale="1000")
    raw = raw_for_value(s, 12_345_678)  # 12345.678 kWh is not a float32
    assert raw == struct.unpack(">f", struct.pack(">f", 12345.678))[0]
    assert scale_raw(s, raw) == round(Fraction(raw) * 1000)


@pytest.mark.parametrize("words", [[0x7FC0, 0x0000], [0x7F80, 0x0000], [0xFF80, 0]])
def test_nan_and_infinity_are_decode_errors(words) -> None:
    with pytest.raises(DecodeError) as info:
        decode(spec(DataType.FLOAT32), words)
    assert info.value.reason == "not-a-number"


def test_raw_for_value_clamps_to_the_type() -> None:
    assert raw_for_value(spec(DataType.UINT16), 70_000) == 0xFFFF
    assert raw_for_value(spec(DataType.INT16), -70_000) == -(2**15)
    assert raw_for_value(spec(DataType.FLOAT32), 10**40) == FLOAT32_MAX
    assert not math.isinf(raw_for_value(spec(DataType.FLOAT32), -(10**40)))


@pytest.mark.parametrize("name", ["sdm630", "sdm120", "abb_b23", "em340"])
def test_builtin_maps_load_cite_their_document_and_plan(name) -> None:
    meter_map = load_map(name)
    assert meter_map.document and meter_map.rated_power_w > 0
    names = {s.name for s in meter_map.registers}
    assert {"1-0:1.8.0", "1-0:2.8.0", "1-0:16.7.0"} <= names
    blocks = plan_blocks(meter_map)
    covered = [s for b in blocks for s in b.specs]
    assert sorted(s.name for s in covered) == sorted(names)
    for block in blocks:
        assert block.count <= meter_map.max_read <= MAX_REGISTERS_PER_READ
        for s in block.specs:
            assert block.address <= s.address and s.end <= block.address + block.count


def test_builtin_map_list() -> None:
    assert {"sdm630", "sdm120", "abb_b23", "em340"} <= set(builtin_maps())


def test_planner_merges_small_gaps_and_splits_large_ones() -> None:
    regs = (RegisterSpec("1-0:1.8.0", 4, 0, DataType.FLOAT32),
            RegisterSpec("1-0:2.8.0", 4, 10, DataType.FLOAT32),    # gap 8: merged
            RegisterSpec("1-0:16.7.0", 4, 40, DataType.FLOAT32),   # gap 28: new block
            RegisterSpec("1-0:14.7.0", 3, 40, DataType.UINT16))    # other function
    blocks = plan_blocks(MeterMap("t", "", regs, 1000, max_read=125, max_gap=8))
    assert [(b.function, b.address, b.count) for b in blocks] == [(3, 40, 1), (4, 0, 12),
                                                                  (4, 40, 2)]


def test_planner_respects_max_read() -> None:
    regs = tuple(RegisterSpec(n, 4, a, DataType.FLOAT32)
                 for n, a in (("1-0:1.8.0", 0), ("1-0:2.8.0", 2), ("1-0:16.7.0", 4)))
    blocks = plan_blocks(MeterMap("t", "", regs, 1000, max_read=4, max_gap=0))
    assert [(b.address, b.count) for b in blocks] == [(0, 4), (4, 2)]


def test_block_decode_rejects_a_short_reply() -> None:
    block = plan_blocks(load_map("sdm630"))[0]
    with pytest.raises(DecodeError) as info:
        block.decode([0] * (block.count - 1))
    assert info.value.reason == "short-read"


def test_custom_map_from_a_table() -> None:
    table = {"model": "custom", "rated_power_w": 22000, "function": 3,
             "word_order": "little",
             "register": [{"name": "1-0:1.8.0", "address": 0x10, "type": "uint32",
                           "scale": "10"},
                          {"name": "1-0:16.7.0", "address": 0x20, "type": "int16",
                           "word_order": "big"}]}
    meter_map = map_from_table(table, "station.toml")
    assert meter_map.spec("1-0:1.8.0").word_order is Order.LITTLE
    assert meter_map.spec("1-0:16.7.0").word_order is Order.BIG
    assert meter_map.spec("1-0:1.8.0").scale == 10


@pytest.mark.parametrize(("change", "key"), [
    ({"register": [{"name": "1-0:99.9.9", "address": 0, "type": "uint16"}]}, "register[0].name"),
    ({"register": [{"name": "1-0:1.8.0", "address": 0, "type": "uint128"}]}, "register[0].type"),
    ({"register": [{"name": "1-0:1.8.0", "address": 0, "type": "uint16", "scale": "-1"}]},
     "register[0].scale"),
    ({"register": [{"name": "1-0:1.8.0", "type": "uint16"}]}, "register[0].address"),
    ({"register": []}, "register"),
    ({"word_order": "middle"}, "word_order"),
    ({"rated_power_w": "lots"}, "rated_power_w"),
])
def test_bad_maps_name_the_key(change, key) -> None:
    table = {"model": "m", "rated_power_w": 1000,
             "register": [{"name": "1-0:1.8.0", "address": 0, "type": "uint16"}], **change}
    with pytest.raises(ConfigError) as info:
        map_from_table(table, "bad.toml")
    assert info.value.file == "bad.toml" and info.value.key == key


def test_overlapping_registers_are_rejected() -> None:
    table = {"model": "m", "rated_power_w": 1000, "register": [
        {"name": "1-0:1.8.0", "address": 0, "type": "uint32"},
        {"name": "1-0:2.8.0", "address": 1, "type": "uint32"}]}
    with pytest.raises(ValueError, match="overlaps"):
        plan_blocks(map_from_table(table, "x.toml"))


def test_load_map_errors(tmp_path) -> None:
    with pytest.raises(ConfigError):
        load_map("no-such-meter")
    broken = tmp_path / "broken.toml"
    broken.write_text("model = [", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_map(str(broken))
    with pytest.raises(ConfigError, match="cannot read"):
        load_map(str(tmp_path / "missing.toml"))


# Known answers: register dumps written by hand from each vendor's format, independent of
# this module's encoder. 12345.6 kWh import, 230.1 V, -3000 W (V2G).
KNOWN_ANSWERS = [
    ("sdm630", "1-0:1.8.0", [0x4640, 0xE666], 12_345_600),   # float32 12345.6 kWh
    ("sdm630", "1-0:32.7.0", [0x4366, 0x199A], 230_100),     # float32 230.1 V
    ("sdm120", "1-0:14.7.0", [0x4247, 0xEB85], 49_980),      # float32 49.98 Hz
    ("sdm120", "1-0:16.7.0", [0xC53B, 0x8000], -3_000),      # float32 -3000 W
    ("abb_b23", "1-0:1.8.0", [0x0000, 0x0000, 0x0012, 0xD680], 12_345_600),  # 0.01 kWh
    ("abb_b23", "1-0:32.7.0", [0x0000, 0x08FD], 230_100),    # uint32 0.1 V
    ("abb_b23", "1-0:16.7.0", [0xFFFB, 0x6C20], -3_000),     # int32 0.01 W = -300000
    ("em340", "1-0:1.8.0", [0xE240, 0x0001], 12_345_600),    # int32 LSW first, 0.1 kWh
    ("em340", "1-0:32.7.0", [0x08FD, 0x0000], 230_100),      # int32 LSW first, 0.1 V
    ("em340", "1-0:16.7.0", [0x8AD0, 0xFFFF], -3_000),       # int32 LSW first, 0.1 W
]


@pytest.mark.parametrize(("map_name", "name", "words", "expected"), KNOWN_ANSWERS)
def test_known_answers_per_map(map_name, name, words, expected) -> None:
    assert decode(load_map(map_name).spec(name), words) == expected


@pytest.mark.slow
@settings(max_examples=3000, deadline=None)
@given(st.sampled_from(["sdm630", "sdm120", "abb_b23", "em340"]), st.data())
def test_fuzz_block_decode_raises_only_decode_error(map_name, data) -> None:
    for block in plan_blocks(load_map(map_name)):
        words = data.draw(st.lists(st.integers(0, 0xFFFF), min_size=block.count - 1,
                                   max_size=block.count + 1))
        try:
            values = block.decode(words)
        except DecodeError:
            continue
        assert all(isinstance(v, int) for v in values.values())


def test_identity_kinds_decode_as_the_makers_lay_them_out() -> None:
    # Carlo Gavazzi 5000h: one letter per register, in the low byte (protocol s2.9.9)
    cg = IdentityField(4, 0x5000, IdentityKind.CHAR, 7)
    assert cg.decode([0x32, 0x33, 0x35, 0x34, 0x31, 0x31, 0x57]) == "235411W"
    assert cg.decode([0xFF32, 0x33, 0x35, 0x34, 0x31, 0x31, 0x00]) == "235411"
    # ABB 8960h: two per register, high byte first, NUL padded
    abb = IdentityField(3, 0x8960, IdentityKind.ASCII, 6, ("B23",))
    assert abb.decode([0x4232, 0x3320, 0, 0, 0, 0]) == "B23" and abb.matches("B23")
    # codes must be equal, texts only start alike
    code = IdentityField(4, 0x000B, IdentityKind.UINT16, 1, ("341",))
    assert code.matches(code.decode([341])) and not code.matches(code.decode([3410]))
    assert not code.matches("34")
    serial = IdentityField(3, 0xFC00, IdentityKind.UINT32, 2)
    assert serial.decode([0x0001, 0xE240]) == "123456"


@given(st.sampled_from(list(IdentityKind)), st.lists(st.integers(-5, 0x1_0005), min_size=0, max_size=9))
def test_identity_decode_raises_only_decode_error(kind, words) -> None:
    field = IdentityField(3, 0, kind, {"uint16": 1, "uint32": 2}.get(kind.value, 4))
    try:
        out = field.decode(words)
    except DecodeError:
        return
    assert len(out) <= 32 and all(c.isalnum() or c in "._-" for c in out)
