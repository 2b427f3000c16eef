"""``j1939`` source: the sans-I/O core (ids, BAM and RTS/CTS transport, address claim, DM1)
with time passed in, hypothesis on random frames, and the source on a python-can virtual
bus against a scripted J1939 peer sending real multi-packet sequences, broken ones too."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import can
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.errors import DecodeError
from agent.readings import Event, Reading
from firmware_adapters.j1939 import (
    CM_BAM,
    CM_RTS,
    PGN_DM1,
    PGN_TP_CM,
    PGN_TP_DT,
    J1939Core,
    J1939Id,
    J1939Source,
    decode_dm1,
)
from tests.firmware_adapters.obd.peers import collect

DBC = Path(__file__).parents[2] / "firmware_adapters" / "j1939_example.dbc"
SIGNALS = {"CCVS1.WheelBasedVehicleSpeed": "Vehicle.Speed",
           "VDHR.HighResolutionTotalVehicleDistance": "Vehicle.TraveledDistance",
           "PROP_BMS.BatterySoC": "Vehicle.Powertrain.TractionBattery.StateOfCharge.Current",
           "EEC1.EngineSpeed": "Vehicle.OBD.EngineSpeed"}
MS = 1_000_000
PEER = 0x27  # the peer ECU's source address


def dm1(*dtcs: tuple[int, int]) -> bytes:
    body = b"\x04\xff"  # lamps: amber warning on
    for spn, fmi in dtcs:
        body += bytes((spn & 0xFF, spn >> 8 & 0xFF, (spn >> 16) << 5 | fmi, 1))
    return body


def bam(data: bytes, pgn: int = PGN_DM1, sa: int = PEER) -> list[tuple[int, bytes]]:
    """A real BAM sequence: TP.CM BAM then TP.DT packets 1..n (J1939-21 s5.10.3)."""
    n = -(-len(data) // 7)
    cm = bytes((CM_BAM,)) + len(data).to_bytes(2, "little") + bytes((n, 0xFF)) + \
        pgn.to_bytes(3, "little")
    frames = [(J1939Id(7, PGN_TP_CM, sa, 0xFF).arb_id(), cm)]
    for i in range(n):
        chunk = data[7 * i:7 * i + 7]
        frames.append((J1939Id(7, PGN_TP_DT, sa, 0xFF).arb_id(),
                       bytes((i + 1,)) + chunk + b"\xff" * (7 - len(chunk))))
    return frames


def test_ids_pdu1_and_pdu2() -> None:
    ccvs = J1939Id.parse(0x18FEF127)
    assert (ccvs.priority, ccvs.pgn, ccvs.source, ccvs.destination) == (6, 0xFEF1, 0x27, 0xFF)
    tp = J1939Id.parse(0x1CEC0027)
    assert (tp.pgn, tp.destination, tp.source) == (0xEC00, 0x00, 0x27)
    assert J1939Id(6, 0xFEF1, 0x27, 0xFF).arb_id() == 0x18FEF127
    assert J1939Id(7, 0xEC00, 0x27, 0x00).arb_id() == 0x1CEC0027


def test_bam_reassembles_dm1_and_dtc_events() -> None:
    core, out = J1939Core(source="t"), []
    data = dm1((5464, 3), (190, 2), (0x7FFFF, 31))
    for i, (arb, frame) in enumerate(bam(data)):
        msgs, send = core.receive(arb, frame, i * 50 * MS)
        assert send == []  # listen-only: never a frame on the bus
        out += msgs
    (msg,) = out
    assert msg.pgn == PGN_DM1 and msg.source == PEER and msg.data == data
    events = core.dm1(msg, 7)
    assert [(e.code, dict(e.details)["spn"], dict(e.details)["fmi"]) for e in events] == [
        ("j1939-dtc-active", 190, 2), ("j1939-dtc-active", 5464, 3),
        ("j1939-dtc-active", 0x7FFFF, 31)]
    assert core.dm1(type(msg)(PGN_DM1, PEER, dm1((190, 2))), 8)[0].code == "j1939-dtc-cleared"
    assert decode_dm1(b"\x00\xff\x00\x00\x00\x00\xff\xff") == frozenset()


def test_broken_sequences_are_decode_errors_and_the_next_session_works() -> None:
    data = dm1((100, 1), (200, 2))
    frames = bam(data)
    core = J1939Core()
    core.receive(*frames[0], 0)
    with pytest.raises(DecodeError) as err:  # packet 2 missing
        core.receive(*frames[2], MS)
    assert err.value.reason == "j1939-tp-sequence"
    core.receive(*frames[0], 2 * MS)
    core.receive(*frames[1], 3 * MS)
    with pytest.raises(DecodeError) as err:  # packet 1 twice
        core.receive(*frames[1], 4 * MS)
    assert err.value.reason == "j1939-tp-sequence"
    core.receive(*frames[0], 5 * MS)
    abort = bytes((255, 3, 0xFF, 0xFF, 0xFF)) + PGN_DM1.to_bytes(3, "little")
    with pytest.raises(DecodeError) as err:
        core.receive(J1939Id(7, PGN_TP_CM, PEER, 0xFF).arb_id(), abort, 6 * MS)
    assert err.value.reason == "j1939-tp-abort"
    core.receive(*frames[0], 10 * MS)  # T1: 750 ms without a packet drops the session
    assert core.receive(*frames[1], 900 * MS) == ([], [])
    assert core.counters["j1939-tp-timeout"] == 1
    got = [m for i, f in enumerate(frames) for m in core.receive(*f, (1000 + i) * MS)[0]]
    assert [m.data for m in got] == [data]


def test_rts_cts_when_claiming_an_address_and_losing_the_claim() -> None:
    core = J1939Core(address=0x80, name=0x8000A00000000005)
    ((arb, claim),) = core.start()
    assert J1939Id.parse(arb).pgn == 0xEE00 and int.from_bytes(claim, "little") == core.name
    data = bytes(range(20))
    rts = bytes((CM_RTS,)) + (20).to_bytes(2, "little") + bytes((3, 0xFF)) + \
        (0xFF10).to_bytes(3, "little")
    _, send = core.receive(J1939Id(7, PGN_TP_CM, PEER, 0x80).arb_id(), rts, 0)
    ((cts_id, cts),) = send
    assert J1939Id.parse(cts_id).destination == PEER and cts[:3] == bytes((17, 3, 1))
    msgs: list[object] = []
    for i in range(3):
        m, send = core.receive(J1939Id(7, PGN_TP_DT, PEER, 0x80).arb_id(),
                               bytes((i + 1,)) + data[7 * i:7 * i + 7].ljust(7, b"\xff"), MS)
        msgs += m
    assert [m.data for m in msgs] == [data]  # type: ignore[attr-defined]
    assert send[0][1][0] == 19  # End of Message Acknowledgement
    # another node claims 0x80 with a lower NAME: it wins, we send "cannot claim" (SA 254)
    lower = (0x8000A00000000001).to_bytes(8, "little")
    _, send = core.receive(J1939Id(6, 0xEE00, 0x80, 0xFF).arb_id(), lower, 2 * MS)
    assert J1939Id.parse(send[0][0]).source == 0xFE and not core.claimed
    _, send = core.receive(J1939Id(7, PGN_TP_CM, PEER, 0x80).arb_id(), rts, 3 * MS)
    assert send == []  # no address: no CTS


@given(st.integers(0, 0x1FFFFFFF), st.binary(max_size=8), st.integers(0, 10**12))
def test_random_frames_raise_only_decode_error(arb: int, data: bytes, now: int) -> None:
    core = J1939Core(address=0x80)
    for frame in ((arb, data), *bam(data * 3 + b"\x00" * 3)):
        try:
            core.receive(frame[0], frame[1], now)
        except DecodeError:
            pass


@given(st.binary(max_size=64))
def test_random_dm1_raise_only_decode_error(data: bytes) -> None:
    try:
        for spn, fmi in decode_dm1(data):
            assert 0 <= spn < 2**19 and 0 <= fmi < 32
    except DecodeError:
        pass


def test_source_against_a_j1939_peer_on_a_virtual_bus() -> None:
    channel = f"j1939-{uuid.uuid4().hex}"
    src = J1939Source.from_options("truck", {"dbc": str(DBC), "interface": "virtual",
                                             "channel": channel, "signals": SIGNALS}, "t.toml")
    peer = can.Bus(interface="virtual", channel=channel)
    good = dm1((5464, 3), (190, 2))
    broken = bam(dm1((1, 1), (2, 2), (3, 3), (4, 4)))  # 18 bytes: 3 packets

    def frame(arb: int, data: bytes) -> can.Message:
        return can.Message(arbitration_id=arb, data=data, is_extended_id=True)

    async def scenario() -> list[Reading | Event]:
        async def send() -> None:
            while not src.counters["bus-opened"]:  # readiness: the source listens
                await asyncio.sleep(0.005)
            speed = round(88.5 * 256).to_bytes(2, "little")
            peer.send(frame(0x18FEF127, b"\xff" + speed + b"\xff" * 5))
            peer.send(frame(0x18FEC127, round(123456.7 / 0.005).to_bytes(4, "little") +
                            b"\xff" * 4))
            peer.send(frame(0x18FF1027, bytes((150,)) + b"\xff" * 7))  # 60 %
            for arb, data in broken[:2] + broken[3:]:  # packet 2 lost
                peer.send(frame(arb, data))
            for arb, data in bam(good):
                peer.send(frame(arb, data))
            peer.send(frame(0x0CF00427, b"\xff" * 3 + (8000).to_bytes(2, "little") + b"\xff" * 3))

        sender = asyncio.create_task(send())
        got = await collect(src, lambda xs: any(getattr(x, "name", "") ==
                                                "Vehicle.OBD.EngineSpeed" for x in xs), 10)
        await sender
        return got

    try:
        got = asyncio.run(scenario())
    finally:
        peer.shutdown()
    values = {g.name: g.value for g in got if isinstance(g, Reading)}
    assert values == {"Vehicle.Speed": 88.5, "Vehicle.TraveledDistance": pytest.approx(123456.7),
                      "Vehicle.Powertrain.TractionBattery.StateOfCharge.Current": 60.0,
                      "Vehicle.OBD.EngineSpeed": 1000.0}
    codes = [(g.code, dict(g.details).get("spn")) for g in got if isinstance(g, Event)]
    assert codes == [("j1939-bad-message", None), ("j1939-dtc-active", 190),
                     ("j1939-dtc-active", 5464)]
    assert src.counters["j1939-tp-sequence"] == 1


def test_docs_list_the_pgns() -> None:
    from firmware_adapters.j1939 import markdown_pgns
    doc = (Path(__file__).parents[2] / "docs" / "vehicle.md").read_text()
    assert markdown_pgns() in doc
