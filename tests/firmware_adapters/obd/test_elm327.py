"""ELM327 reply parser: prompt splitting, frame lines, status lines, garbage, hostile input."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.errors import AdapterUnavailable, DecodeError, OversizeInput
from firmware_adapters.obd.elm327 import Reply, ReplyParser, command, obd_command, protocol_bits


def test_replies_split_at_the_prompt_even_across_chunks() -> None:
    p = ReplyParser(header_digits=3)
    stream = b"SEARCHING...\r7E8064100BE3FA813\r\r>7E803410D0A\r\r>"
    replies = []
    for i in range(len(stream)):
        replies += p.receive_data(stream[i:i + 1])
    assert replies == [
        Reply(frames=((0x7E8, bytes.fromhex("064100BE3FA813")),), status=("searching",)),
        Reply(frames=((0x7E8, bytes.fromhex("03410D0A")),)),
    ]


def test_headers_with_spaces_and_29_bit_ids() -> None:
    p = ReplyParser(header_digits=8)
    (reply,) = p.receive_data(b"18 DA F1 10 03 41 0D 37 \r\r>")
    assert reply.frames == ((0x18DAF110, bytes.fromhex("03410D37")),)


def test_unknown_header_size_follows_line_parity() -> None:
    p = ReplyParser(header_digits=0)
    (reply,) = p.receive_data(b"7E803410D37\r18DAF11003410D37\r>")
    assert [f[0] for f in reply.frames] == [0x7E8, 0x18DAF110]


@pytest.mark.parametrize(("line", "status"), [
    (b"NO DATA", "no-data"), (b"CAN ERROR", "can-error"), (b"BUFFER FULL", "buffer-full"),
    (b"STOPPED", "stopped"), (b"?", "refused"), (b"UNABLE TO CONNECT", "unable-to-connect"),
    (b"BUS INIT: ...ERROR", "bus-init-error"), (b"ERR94", "internal-error"),
    (b"<RX ERROR", "rx-error"), (b"OK", "ok"),
])
def test_status_lines(line: bytes, status: str) -> None:
    (reply,) = ReplyParser().receive_data(line + b"\r\r>")
    assert reply.status == (status,) and not reply.frames


def test_silent_reply_means_no_answer_from_the_car() -> None:
    (reply,) = ReplyParser().receive_data(b"NO DATA\r>")
    assert reply.silent
    (reply,) = ReplyParser().receive_data(b"STOPPED\r>")
    assert not reply.silent


def test_garbage_lines_are_counted_not_raised() -> None:
    (reply,) = ReplyParser().receive_data(b"\xff\xfe\x80\r7E8 0\r\x00\x00ELM327 v1.5\r\x01\x02\r>")
    assert reply.garbage == 2  # the two undecodable / unprintable lines
    assert "ELM327 V1.5" in reply.text and "7E8 0" in reply.text
    assert not reply.frames


def test_a_babbling_adapter_is_cut_off() -> None:
    p = ReplyParser(max_reply=64)
    with pytest.raises(OversizeInput):
        p.receive_data(b"7E8" * 100)
    assert p.receive_data(b"OK\r>") == [Reply(status=("ok",))]


def test_protocol_number() -> None:
    assert protocol_bits(Reply(text=("A6",))) == 11
    assert protocol_bits(Reply(text=("7",))) == 29
    with pytest.raises(AdapterUnavailable):
        protocol_bits(Reply(text=("A3",)))
    with pytest.raises(DecodeError):
        protocol_bits(Reply(status=("no-data",)))


def test_commands() -> None:
    assert obd_command(b"\x01\x0c\x0d") == b"010C0D\r"
    with pytest.raises(ValueError):
        command("ATZ\rATE1")


@given(st.binary(max_size=300))
def test_random_bytes_raise_only_our_errors(data: bytes) -> None:
    p = ReplyParser(max_reply=128)
    try:
        for reply in p.receive_data(data + b">"):
            assert all(len(d) <= 8 for _, d in reply.frames)
    except OversizeInput:
        pass
