"""ISO-TP core: segmenting/reassembly, hostile frames, N_Cr timing passed as ``now``, and a
cross-check against can-isotp as an independent sender on a python-can virtual bus."""

from __future__ import annotations

import threading
import time
import uuid

import can
import isotp as can_isotp
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.errors import DecodeError, LocalProtocolError
from firmware_adapters.obd.isotp import FC_CONTINUE, N_CR_NS, Reassembler, segment, single_frame
from firmware_adapters.obd.requester import Addressing, Transaction


def reassemble(frames: list[bytes], now: int = 0) -> tuple[bytes | None, int]:
    r = Reassembler(max_length=4095)
    message, fcs = None, 0
    for f in frames:
        got = r.feed(f, now)
        fcs += got.flow_control is not None
        message = got.message or message
    return message, fcs


@given(st.binary(min_size=1, max_size=600))
def test_segment_then_reassemble_round_trips(payload: bytes) -> None:
    frames = segment(payload)
    assert all(len(f) <= 8 for f in frames)
    message, fcs = reassemble(frames)
    assert message == payload
    assert fcs == (1 if len(payload) > 7 else 0)


def test_vin_frames_match_iso_15765_2_layout() -> None:
    frames = segment(b"\x49\x02\x01WP0ZZZ99ZTS390000")
    assert frames[0] == bytes.fromhex("1014490201575030")
    assert frames[1][0] == 0x21 and frames[2][0] == 0x22
    assert single_frame(b"\x01\x0d") == bytes.fromhex("02010DCCCCCCCCCC")
    with pytest.raises(LocalProtocolError):
        single_frame(b"")


@pytest.mark.parametrize(("frames", "reason"), [
    ([bytes.fromhex("0941")], "isotp-bad-length"),                # SF longer than frame
    ([bytes.fromhex("00")], "isotp-bad-length"),                  # SF_DL 0
    ([bytes.fromhex("2141")], "isotp-unexpected-cf"),             # CF without FF
    ([bytes.fromhex("1005414243444546")], "isotp-bad-length"),    # FF_DL fits an SF
    ([bytes.fromhex("1FFF414243444546")], "isotp-oversize"),      # 4095 > limit 256
    ([bytes.fromhex("10144902")], "isotp-bad-length"),            # FF shorter than 8
    ([bytes.fromhex("1014490201575030"), bytes.fromhex("225A")], "isotp-wrong-sn"),
    ([bytes.fromhex("300000")], "isotp-unexpected-fc"),
    ([bytes.fromhex("4000")], "isotp-bad-pci"),
    ([b""], "isotp-empty"),
    ([bytes(9)], "isotp-oversize"),
])
def test_hostile_frames(frames: list[bytes], reason: str) -> None:
    r = Reassembler()
    with pytest.raises(DecodeError) as err:
        for f in frames:
            r.feed(f, 0)
    assert err.value.reason == reason


def test_consecutive_frame_after_n_cr_is_dropped() -> None:
    r = Reassembler()
    assert r.feed(bytes.fromhex("1014490201575030"), now=0).flow_control == FC_CONTINUE
    with pytest.raises(DecodeError) as err:
        r.feed(bytes.fromhex("215A5A5A39395A54"), now=N_CR_NS + 1)
    assert err.value.reason == "isotp-timeout"
    assert not r.busy
    r.feed(bytes.fromhex("1014490201575030"), now=0)
    with pytest.raises(DecodeError):
        r.expire(N_CR_NS + 1)


def test_new_first_frame_aborts_the_message_in_progress() -> None:
    r = Reassembler()
    r.feed(bytes.fromhex("1014490201575030"), 0)
    assert r.feed(bytes.fromhex("03410D37"), 1).message == bytes.fromhex("410D37")
    assert not r.busy


@given(st.lists(st.binary(max_size=10), max_size=20))
def test_random_frames_raise_only_decode_error(frames: list[bytes]) -> None:
    r = Reassembler()
    for f in frames:
        try:
            r.feed(f, 0)
        except DecodeError:
            pass


def test_transaction_collects_several_ecus_and_ends_when_all_expected_answered() -> None:
    a = Addressing(11)
    tx = Transaction(a, b"\x01\x0d", 0, 50_000_000, expected=frozenset({0, 1}))
    assert tx.request_frame.arb_id == 0x7DF
    assert tx.receive(0x7E8, bytes.fromhex("03410D37"), 1) == []
    assert not tx.done(2)
    tx.receive(0x123, bytes.fromhex("03410D37"), 2)  # not a responder id: ignored
    tx.receive(0x7E9, bytes.fromhex("03410D38"), 3)
    assert tx.done(4)
    assert tx.answers == {0: bytes.fromhex("410D37"), 1: bytes.fromhex("410D38")}


def test_transaction_29_bit_flow_control_goes_to_the_physical_id() -> None:
    a = Addressing(29)
    tx = Transaction(a, b"\x09\x02", 0, 50_000_000)
    assert tx.request_frame.arb_id == 0x18DB33F1 and tx.request_frame.extended
    fcs = tx.receive(0x18DAF110, bytes.fromhex("1014490201575030"), 1)
    assert fcs[0].arb_id == 0x18DA10F1 and fcs[0].data == FC_CONTINUE
    assert not tx.done(10**8)  # a half-received message keeps the window open (N_Cr)
    assert tx.done(N_CR_NS + 2)
    assert [e.reason for e in tx.incomplete()] == ["isotp-incomplete"]


def test_can_isotp_sender_is_reassembled_by_our_core() -> None:
    """can-isotp (independent implementation) sends a VIN answer; we send the flow control."""
    channel = f"isotp-{uuid.uuid4().hex}"
    ecu_bus = can.Bus(interface="virtual", channel=channel)
    tester = can.Bus(interface="virtual", channel=channel)
    stack = can_isotp.CanStack(ecu_bus, address=can_isotp.Address(
        can_isotp.AddressingMode.Normal_11bits, txid=0x7E8, rxid=0x7E0))
    payload = b"\x49\x02\x01WP0ZZZ99ZTS390000"
    stop = threading.Event()

    def pump() -> None:
        while not stop.is_set():
            stack.process()
            time.sleep(0.001)

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    try:
        stack.send(payload)
        tx = Transaction(Addressing(11), b"\x09\x02", time.monotonic_ns(), 500_000_000)
        while not tx.answers:
            msg = tester.recv(2.0)
            assert msg is not None, "can-isotp sent nothing"
            for fc in tx.receive(msg.arbitration_id, bytes(msg.data), time.monotonic_ns()):
                tester.send(can.Message(arbitration_id=fc.arb_id, data=fc.data,
                                        is_extended_id=False))
        assert tx.answers == {0: payload} and not tx.errors
    finally:
        stop.set()
        thread.join(2)
        ecu_bus.shutdown()
        tester.shutdown()


@pytest.mark.slow
def test_fuzz_loop_transactions_with_hostile_responders() -> None:
    """Long variant: 200k random frames from 8 responders into transactions."""
    import random
    rng = random.Random(4)
    a = Addressing(11)
    for round_ in range(2000):
        tx = Transaction(a, b"\x01\x0d", 0, 50_000_000)
        for i in range(100):
            data = bytes(rng.randrange(256) for _ in range(rng.randrange(10)))
            tx.receive(0x7E8 + rng.randrange(8), data, round_ * 10**9 + i)
        assert all(isinstance(e, DecodeError) for e in tx.errors)
