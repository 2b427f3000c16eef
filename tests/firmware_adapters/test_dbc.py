"""``dbc`` source: cantools decoding to VSS readings, rate limit / change-only, hostile frames,
and the source on a python-can virtual bus with frames encoded by cantools as the peer."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import can
import cantools
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.errors import ConfigError, DecodeError
from agent.readings import Event, Reading
from firmware_adapters.dbc import DbcDecoder, DbcSource
from tests.firmware_adapters.obd.peers import collect

DBC = Path(__file__).parent.parent / "data" / "dbc" / "ev_test.dbc"
SOC = "Vehicle.Powertrain.TractionBattery.StateOfCharge.Current"
MAP = {
    "VehicleSpeed.Speed": "Vehicle.Speed",
    "SoC": {"name": SOC, "change_only": True},
    "BMS_Status.PackCurrent": {"name": "Vehicle.Powertrain.TractionBattery.CurrentCurrent",
                               "min_interval_s": 1.0},
    "Cluster_Odometer.Odometer": "Vehicle.TraveledDistance",
}
S = 1_000_000_000


def decoder() -> DbcDecoder:
    return DbcDecoder.from_map(cantools.database.load_file(str(DBC)), MAP, "t.toml", "body")


def test_known_frames_decode_to_vss_readings() -> None:
    d = decoder()
    (speed,) = d.decode(0x123, bytes.fromhex("8813000000000000"), False, 0, 7)
    assert speed == Reading("Vehicle.Speed", 50.0, "km/h", 7, source="body")
    (odo,) = d.decode(0x18FF1234, bytes.fromhex("0001e2403a000000"), True, 0, 7)
    assert odo.name == "Vehicle.TraveledDistance" and odo.value == pytest.approx(12345.6)
    assert odo.unit == "km"
    bms = d.decode(0x3E8, bytes.fromhex("7808 0e 38ff 01 0000".replace(" ", "")), False, 0, 7)
    values = {r.name: r.value for r in bms}
    assert values[SOC] == 60.0
    assert values["Vehicle.Powertrain.TractionBattery.CurrentCurrent"] == pytest.approx(-20.0)


def test_rate_limit_and_change_only() -> None:
    d = decoder()
    frame = bytes.fromhex("780e0e38ff010000")
    assert len(d.decode(0x3E8, frame, False, 0, 0)) == 2
    assert d.decode(0x3E8, frame, False, S // 2, 0) == []  # same SoC, current too soon
    assert d.counters["unchanged"] == 1 and d.counters["rate-limited"] == 1
    (current,) = d.decode(0x3E8, frame, False, S + 1, 0)
    assert current.name.endswith("CurrentCurrent")
    (soc,) = d.decode(0x3E8, bytes.fromhex("7a0e0e38ff010000"), False, S + 2, 0)
    assert soc.value == 61.0


def test_unknown_ids_and_extended_flag_are_not_confused() -> None:
    d = decoder()
    assert d.decode(0x7FF, bytes(8), False, 0, 0) == []
    assert d.decode(0x123, bytes(8), True, 0, 0) == []  # same id as 29-bit: another frame
    assert d.counters["unknown-id"] == 2


def test_short_frame_is_a_decode_error() -> None:
    with pytest.raises(DecodeError) as err:
        decoder().decode(0x123, b"\x01", False, 0, 0)
    assert err.value.reason == "dbc-short-frame"


@given(st.sampled_from([(0x123, False), (0x3E8, False), (0x18FF1234, True)]),
       st.binary(max_size=12))
def test_random_payloads_raise_only_decode_error(frame: tuple[int, bool], data: bytes) -> None:
    try:
        for r in decoder().decode(frame[0], data, frame[1], 0, 0):
            assert isinstance(r, Reading)
    except DecodeError:
        pass


@pytest.mark.parametrize(("signals", "key"), [
    ({"NoSuch.Signal": "Vehicle.Speed"}, "signals.NoSuch.Signal"),
    ({"Speed": "Vehicle.NotASignal"}, "signals.Speed.name"),
    ({"Speed": {"name": "Vehicle.Speed", "every": 2}}, "signals.Speed"),
    ({"Speed": {"name": "Vehicle.Speed", "min_interval_s": -1}}, "signals.Speed.min_interval_s"),
])
def test_config_errors_name_the_key(signals: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        DbcSource.from_options("body", {"dbc": str(DBC), "interface": "virtual",
                                        "channel": "x", "signals": signals}, "car.toml")
    assert err.value.file == "car.toml" and key in (err.value.key or "")


def test_missing_dbc_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        DbcSource.from_options("body", {"dbc": str(tmp_path / "none.dbc"),
                                        "interface": "virtual", "channel": "x",
                                        "signals": MAP}, "car.toml")


def test_source_on_a_virtual_bus_with_a_cantools_peer() -> None:
    channel = f"dbc-{uuid.uuid4().hex}"
    db = cantools.database.load_file(str(DBC))
    src = DbcSource.from_options("body", {"dbc": str(DBC), "interface": "virtual",
                                          "channel": channel, "signals": MAP}, "car.toml")
    peer = can.Bus(interface="virtual", channel=channel)

    def frame(name: str, values: dict[str, float]) -> can.Message:
        m = db.get_message_by_name(name)
        return can.Message(arbitration_id=m.frame_id, is_extended_id=m.is_extended_frame,
                           data=m.encode(values))

    async def scenario() -> list[Reading | Event]:
        async def send() -> None:
            await listening(src)
            peer.send(frame("VehicleSpeed", {"Speed": 88.5, "Gear": 3}))
            peer.send(frame("Cluster_Odometer", {"Odometer": 1000.0, "AmbientTemp": 18}))
            peer.send(can.Message(arbitration_id=0x123, data=b"\x01", is_extended_id=False))
            peer.send(frame("Cluster_Odometer", {"Odometer": 900.0, "AmbientTemp": 18}))
            peer.send(frame("VehicleSpeed", {"Speed": 90.0, "Gear": 3}))

        sender = asyncio.create_task(send())
        got = await collect(src, lambda xs: len(
            [g for g in xs if getattr(g, "name", "") == "Vehicle.Speed"]) == 2, 10)
        await sender
        return got

    try:
        got = asyncio.run(scenario())
    finally:
        peer.shutdown()
    speeds = [g.value for g in got if isinstance(g, Reading) and g.name == "Vehicle.Speed"]
    assert speeds == [88.5, 90.0]
    codes = [g.code for g in got if isinstance(g, Event)]
    assert codes == ["dbc-bad-frame", "odometer-decreased"]
    assert src.counters["dbc-short-frame"] == 1


async def listening(src: DbcSource) -> None:
    """Readiness: the source has opened its bus (a virtual bus delivers every frame sent
    after that), signalled by its counter."""
    while not src.counters["bus-opened"]:
        await asyncio.sleep(0.005)


def test_odometer_clocked_back_between_two_runs_is_caught(tmp_path: Path) -> None:
    """The DBC source keeps the odometer's last value in the state directory, so the
    first value after a restart is judged against it (a decrease only)."""
    db = cantools.database.load_file(str(DBC))
    message = db.get_message_by_name("Cluster_Odometer")

    def run_once(km: float) -> list[Reading | Event]:
        channel = f"dbc-{uuid.uuid4().hex}"
        src = DbcSource.from_options("body", {"dbc": str(DBC), "interface": "virtual",
                                              "channel": channel, "signals": MAP}, "car.toml")
        src.attach_state(tmp_path)
        peer = can.Bus(interface="virtual", channel=channel)

        async def scenario() -> list[Reading | Event]:
            async def send() -> None:  # once the source listens
                await listening(src)
                peer.send(can.Message(arbitration_id=message.frame_id,
                                      is_extended_id=message.is_extended_frame,
                                      data=message.encode({"Odometer": km, "AmbientTemp": 18})))

            sender = asyncio.create_task(send())
            got = await collect(src, lambda xs: any(
                getattr(g, "name", "") == "Vehicle.TraveledDistance" for g in xs), 10)
            await sender
            return got

        try:
            return asyncio.run(scenario())
        finally:
            peer.shutdown()

    assert [g for g in run_once(1000.0) if isinstance(g, Event)] == []
    assert (tmp_path / "sources" / "body.odometer").read_text() == "1000.0\n"
    assert [g for g in run_once(1010.0) if isinstance(g, Event)] == []  # driven meanwhile
    (event,) = [g for g in run_once(400.0) if isinstance(g, Event)]
    assert event.code == "odometer-decreased" and dict(event.details)["across_restart"] == 1


def test_reader_queue_is_bounded_and_waits_for_the_runtime() -> None:
    """Back-pressure: while emit() is held, the reader thread stops at QUEUE_MAX frames and
    waits (counted); once released, every frame is decoded, none dropped."""
    from firmware_adapters.dbc import QUEUE_MAX
    channel = f"dbc-{uuid.uuid4().hex}"
    db = cantools.database.load_file(str(DBC))
    msg = db.get_message_by_name("VehicleSpeed")
    src = DbcSource.from_options("body", {"dbc": str(DBC), "interface": "virtual",
                                          "channel": channel,
                                          "signals": {"VehicleSpeed.Speed": "Vehicle.Speed"}},
                                 "car.toml")
    peer = can.Bus(interface="virtual", channel=channel)
    n = QUEUE_MAX + 700

    async def scenario() -> list[Reading | Event]:
        got: list[Reading | Event] = []
        release, done = asyncio.Event(), asyncio.Event()

        async def emit(item: Reading | Event) -> None:
            await release.wait()
            got.append(item)
            if len(got) == n:
                done.set()

        task = asyncio.create_task(src.run(emit))
        await listening(src)
        for i in range(n):
            peer.send(can.Message(arbitration_id=msg.frame_id, is_extended_id=False,
                                  data=msg.encode({"Speed": i % 200, "Gear": 3})))
        while not src.counters["reader-waits"]:  # readiness: the reader hit the bound
            await asyncio.sleep(0.01)
        release.set()
        await asyncio.wait_for(done.wait(), 30)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        return got

    try:
        got = asyncio.run(scenario())
    finally:
        peer.shutdown()
    assert [r.value for r in got if isinstance(r, Reading)] == [i % 200 for i in range(n)]
    assert src.counters["reader-waits"] >= 1
