"""RTU framing facts: CRC against published vectors, sizes, timing, fault diagnosis."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from firmware_adapters.modbus.rtu import (
    CRC_ERROR,
    GARBAGE,
    NO_RESPONSE,
    SHORT_FRAME,
    WRONG_UNIT,
    LineFormat,
    crc16,
    crc_ok,
    diagnose_reply,
    with_crc,
)


def test_crc_known_answers() -> None:
    # MODBUS over Serial Line V1.02 s6.2.2 and the Modbus Application Protocol examples:
    # read holding registers, unit 1, address 0, 1 register -> 01 03 00 00 00 01 84 0A.
    assert with_crc(bytes.fromhex("010300000001")) == bytes.fromhex("010300000001840A")
    assert crc16(b"123456789") == 0x4B37  # CRC-16/MODBUS check value


@given(st.binary(min_size=2, max_size=64))  # an RTU frame is at least 4 bytes
def test_crc_round_trip_and_single_bit_errors(frame) -> None:
    good = with_crc(frame)
    assert crc_ok(good)
    flipped = bytes([good[0] ^ 0x01]) + good[1:]
    assert not crc_ok(flipped)


def reply(unit: int, count: int) -> bytes:
    return with_crc(bytes([unit, 4, 2 * count]) + bytes(2 * count))


def test_diagnosis() -> None:
    good = reply(7, 4)
    assert diagnose_reply(b"", 7, 4) == NO_RESPONSE
    assert diagnose_reply(good[:6], 7, 4) == SHORT_FRAME
    assert diagnose_reply(good[:2], 7, 4) == SHORT_FRAME
    assert diagnose_reply(good[:-1] + bytes([good[-1] ^ 0xFF]), 7, 4) == CRC_ERROR
    assert diagnose_reply(reply(8, 4), 7, 4) == WRONG_UNIT
    assert diagnose_reply(bytes([7, 0x2B, 0, 0, 0]), 7, 4) == GARBAGE


@given(st.binary(max_size=300), st.integers(1, 247), st.sampled_from([3, 4]))
def test_diagnosis_never_raises(data, unit, function) -> None:
    assert diagnose_reply(data, unit, function) in {NO_RESPONSE, CRC_ERROR, SHORT_FRAME,
                                                    WRONG_UNIT, GARBAGE}


def test_line_timing() -> None:
    line = LineFormat(9600)
    assert line.bits_per_char == 10
    assert line.char_time_s == pytest.approx(10 / 9600)
    assert line.silent_interval_s == pytest.approx(3.5 * 10 / 9600)
    assert LineFormat(9600, parity="E").bits_per_char == 11
    assert LineFormat(115200).silent_interval_s == 0.00175
    # 80 registers: 8 + 165 bytes and two t3.5 gaps.
    assert line.transaction_time_s(80) == pytest.approx((173 + 7) * 10 / 9600)


def test_bad_line_format() -> None:
    with pytest.raises(ValueError):
        LineFormat(9600, parity="X")
