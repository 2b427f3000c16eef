"""The charger map codec: known answers per shipped map, hostile registers, map errors."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.errors import ConfigError, DecodeError
from firmware_adapters.evse.base import CpState
from firmware_adapters.evse.maps import Read, Write, builtin_maps, load_map


def test_the_shipped_maps_load_and_cite_their_documents() -> None:
    assert set(builtin_maps()) >= {"phoenix-ev-eth", "alfen-ng9xx", "bender-cc612"}
    for name in builtin_maps():
        m = load_map(name)
        assert m.document and m.model
        assert all(r.count <= m.max_read for r in m.reads)
        folder = Path(__file__).parents[3] / "firmware_adapters" / "evse" / "maps"
        assert "Source" in (folder / f"{name}.toml").read_text()


def test_phoenix_status_char_state_coil_and_lsw_first_power() -> None:
    m = load_map("phoenix-ev-eth")
    block = [0] * 22
    block[0] = ord("C")                       # IR 100: 'C' in the low byte
    block[7] = 9                              # IR 107: overload protection
    block[20], block[21] = 0x2B20, 0x0000     # IR 120/121: 11040 W, least significant first
    replies = {Read(4, 100, 22): block, Read(3, 528, 1): [16], Read(1, 400, 1): [1]}
    status = m.decode(1, replies)
    assert (status.state, status.enabled, status.current_limit_a, status.power_w,
            status.fault) == (CpState.C, True, 16.0, 11040, "overload protection")
    block[20], block[21] = 0x0000, 0x2B20     # the other word order reads as 723 MW
    assert m.decode(1, replies).power_w == 0x2B20 << 16


def test_alfen_status_string_state_and_float_limits() -> None:
    m = load_map("alfen-ng9xx")
    power = list(struct.unpack(">2H", struct.pack(">f", 7360.0)))
    block = [1, *(int.from_bytes(b, "big") for b in (b"C2", b"\0\0", b"\0\0", b"\0\0",
                                                        b"\0\0")),
             *struct.unpack(">2H", struct.pack(">f", 10.0))]
    replies = {Read(3, 344, 2): power, Read(3, 1200, 8): block}
    status = m.decode(2, replies)
    assert (status.connector, status.state, status.enabled, status.current_limit_a,
            status.power_w, status.fault) == (2, CpState.C, True, 10.0, 7360, None)
    block[1] = int.from_bytes(b"B1", "big")      # vehicle connected, no PWM
    block[6:8] = [0, 0]                          # 0 A applied: disabled
    block[0] = 0                                 # availability: inoperative
    status = m.decode(2, replies)
    assert (status.state, status.enabled, status.fault) == (CpState.B, False,
                                                            "socket inoperative")
    replies[Read(3, 344, 2)] = [0xFFFF, 0xFFFF]  # s1.2: unavailable reads NaN
    assert m.decode(2, replies).power_w is None
    assert m.current_write(16.0) == Write(16, 1210, (0x4180, 0x0000))
    assert m.enable_write(False, 16.0) == Write(16, 1210, (0, 0))


def test_bender_enum_state_and_unavailable_power() -> None:
    m = load_map("bender-cc612")
    replies = {Read(3, 122, 1): [2], Read(3, 220, 2): [0xFFFF, 0xFFFF], Read(3, 1000, 1): [0]}
    status = m.decode(1, replies)
    assert (status.state, status.enabled, status.power_w) == (CpState.B, False, None)
    replies[Read(3, 122, 1)] = [6]
    with pytest.raises(DecodeError, match="unknown pilot state '6'"):
        m.decode(1, replies)


def test_current_writes_round_down_and_refuse_what_iec_61851_forbids() -> None:
    m = load_map("phoenix-ev-eth")
    assert m.current_write(16.9) == Write(6, 528, (16,))   # never offer more than told
    assert m.enable_write(True, 16.0) == Write(5, 400, (1,))
    for amps in (5.9, 33.0, -1.0, float("nan")):
        with pytest.raises(ValueError):
            m.current_write(amps)
    with pytest.raises(ValueError, match="enable coil"):
        m.current_write(0.0)


@settings(max_examples=300, deadline=None)
@given(name=st.sampled_from(["phoenix-ev-eth", "alfen-ng9xx", "bender-cc612"]),
       data=st.data())
def test_random_registers_raise_only_decode_error(name: str, data: st.DataObject) -> None:
    m = load_map(name)
    word = st.integers(min_value=-2, max_value=0x10001)
    replies = {read: data.draw(st.lists(word, min_size=max(0, read.count - 1),
                                        max_size=read.count + 1))
               for read in m.reads}
    try:
        status = m.decode(1, replies)
    except DecodeError:
        return
    assert isinstance(status.state, CpState)


@pytest.mark.parametrize(("change", "message"), [
    (("unit = 255", 'unit = "one"'), r"unit: expected a unit id 0\.\.255"),
    (('encoding = "char"', 'encoding = "morse"'), r"state\.encoding: expected one of"),
    (('A = "A"', 'A = "Z"'), r"state\.values\.A: expected one of A, B, C, D, E, F"),
    (("functions = [1, 3, 4, 5, 6]", "functions = [3, 4, 6]"),
     r"uses function codes \[1, 5\] the device does not have"),
    (("write = 6", "write = 7"), r"current_limit\.write: expected one of 6, 16"),
    (('method = "coil"', 'method = "relay"'), r"enable\.method: expected one of coil"),
    (("max_connectors = 1", "max_conectors = 1"), r"did you mean \"max_connectors\""),
])
def test_map_errors_name_the_file_and_key(tmp_path: Path, change: tuple[str, str],
                                          message: str) -> None:
    source = Path(__file__).parents[3] / "firmware_adapters/evse/maps/phoenix-ev-eth.toml"
    text = source.read_text()
    assert change[0] in text
    path = tmp_path / "mine.toml"
    path.write_text(text.replace(change[0], change[1], 1))
    with pytest.raises(ConfigError, match=message) as info:
        load_map(str(path))
    assert str(path) in str(info.value)


def test_a_map_file_that_is_not_there_or_not_toml() -> None:
    with pytest.raises(ConfigError, match="cannot read charger map"):
        load_map("/nonexistent/box.toml")
    with pytest.raises(ConfigError, match="expected one of .*phoenix-ev-eth.* or a .toml file"):
        load_map("keba-p30")


def test_every_shipped_map_is_documented() -> None:
    text = (Path(__file__).parents[3] / "docs" / "chargers.md").read_text()
    for name in builtin_maps():
        assert f"`{name}`" in text
