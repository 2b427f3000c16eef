"""PID table, requests and answer decoding: bytes in, values out (SAE J1979 examples)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.errors import DecodeError, LocalProtocolError
from agent.readings import VEHICLE_SIGNALS
from firmware_adapters.obd import pids as P


def test_table_has_the_required_pids_with_known_signal_names() -> None:
    assert len(P.PIDS) >= 40
    for pid in (0x0C, 0x0D, 0x05, 0x2F, 0x31, 0x5B, 0xA6):
        spec = P.PIDS[pid]
        assert VEHICLE_SIGNALS[spec.name].unit == spec.unit
    assert P.PIDS[0x0D].name == "Vehicle.Speed"
    assert P.PIDS[0xA6].name == "Vehicle.TraveledDistance"


@pytest.mark.parametrize(("hexdata", "pid", "value"), [
    ("410C1AF8", 0x0C, 1726.0),     # (256*0x1A + 0xF8) / 4
    ("410D64", 0x0D, 100),
    ("41057B", 0x05, 83),           # 0x7B - 40
    ("412FFF", 0x2F, 100.0),
    ("41310102", 0x31, 258),
    ("415B80", 0x5B, 50.196078),    # 128 * 100 / 255
    ("41A60001E240", 0xA6, 12345.6),  # 123456 / 10
    ("41328000", 0x32, -8192.0),    # signed: -32768 / 4
    ("41420E74", 0x42, 3.7),
    ("410600", 0x06, -100.0),
])
def test_known_answers(hexdata: str, pid: int, value: float) -> None:
    ans = P.decode_answer(bytes.fromhex(hexdata))
    assert ans == P.PidValues(((pid, value),))


def test_multi_pid_answer_in_answer_order() -> None:
    ans = P.decode_answer(bytes.fromhex("410C145F0D37055F"), requested=[0x0C, 0x0D, 0x05])
    assert ans == P.PidValues(((0x0C, 1303.75), (0x0D, 55), (0x05, 55)))


def test_answer_naming_a_pid_not_requested_is_refused() -> None:
    with pytest.raises(DecodeError) as err:
        P.decode_answer(bytes.fromhex("410D37"), requested=[0x0C])
    assert err.value.reason == "unexpected-pid"


def test_truncated_and_unknown_pids() -> None:
    with pytest.raises(DecodeError, match="cut short"):
        P.decode_answer(bytes.fromhex("410C14"))
    with pytest.raises(DecodeError) as err:
        P.decode_answer(bytes.fromhex("41FF00"))
    assert err.value.reason == "unknown-pid"


def test_supported_pid_bitmap_and_discovery_order() -> None:
    ans = P.decode_answer(bytes.fromhex("4100BE3FA813"))
    assert isinstance(ans, P.SupportedPids)
    assert {0x01, 0x04, 0x05, 0x0C, 0x0D, 0x1F, 0x20} <= ans.pids
    assert 0x02 not in ans.pids
    assert P.next_bitmap_pid(set(), set()) == 0x00
    assert P.next_bitmap_pid(ans.pids, {0x00}) == 0x20
    assert P.next_bitmap_pid({0x0D}, {0x00}) is None


def test_vin_is_not_stripped_like_python_obd() -> None:
    vin = "WP0ZZZ99ZTS390000"
    assert P.decode_answer(b"\x49\x02\x01" + vin.encode()) == P.Vin(vin)
    assert P.decode_vin(b"\x00\x00\x00" + vin.encode()) == vin  # NUL padding in front


@pytest.mark.parametrize("bad", [b"\x01WP0ZZZ99ZTS39000", b"\x01WP0ZZZ99ZTS39000O",
                                 b"\x01WP0ZZZ99ZTS39000\xff"])
def test_bad_vins(bad: bytes) -> None:
    with pytest.raises(DecodeError):
        P.decode_vin(bad)


def test_dtcs_decode_to_sae_j2012_codes() -> None:
    ans = P.decode_answer(bytes.fromhex("4304014341238196C300"))
    assert ans == P.Dtcs(3, ("P0143", "C0123", "B0196", "U0300"))
    assert P.decode_answer(bytes.fromhex("4300")) == P.Dtcs(3, ())
    assert P.decode_answer(bytes.fromhex("47010A80")) == P.Dtcs(7, ("P0A80",))
    with pytest.raises(DecodeError):
        P.decode_answer(bytes.fromhex("43020143"))


def test_negative_response() -> None:
    ans = P.decode_answer(bytes.fromhex("7F0112"))
    assert ans == P.NegativeResponse(0x01, 0x12)
    assert ans.reason == "sub-function-not-supported"
    assert P.NegativeResponse(0x09, 0x99).reason == "nrc-99"
    with pytest.raises(DecodeError):
        P.decode_answer(bytes.fromhex("7F01"))


def test_requests() -> None:
    assert P.pid_request([0x0C, 0x0D]) == b"\x01\x0c\x0d"
    assert P.vin_request() == b"\x09\x02"
    assert P.dtc_request() == b"\x03" and P.dtc_request(pending=True) == b"\x07"
    with pytest.raises(LocalProtocolError):
        P.pid_request([0x04, 0x05, 0x0C, 0x0D, 0x0F, 0x11, 0x2F])
    with pytest.raises(LocalProtocolError):
        P.pid_request([0x0D, 0x0D])
    with pytest.raises(LocalProtocolError):
        P.pid_request([0x02])


def test_clear_dtcs_only_when_enabled() -> None:
    with pytest.raises(LocalProtocolError) as err:
        P.clear_dtcs_request(allow_clear=False)
    assert err.value.reason == "clear-dtcs-disabled"
    assert P.clear_dtcs_request(allow_clear=True) == b"\x04"


def test_pid_spec_lookup() -> None:
    assert P.pid_spec("SPEED").pid == 0x0D
    assert P.pid_spec("0x0c").pid == P.pid_spec("0C").pid == 0x0C
    with pytest.raises(LocalProtocolError):
        P.pid_spec("NOPE")


@given(st.binary(max_size=64))
def test_random_answers_raise_only_decode_error(data: bytes) -> None:
    try:
        P.decode_answer(data)
    except DecodeError:
        pass


LINEAR = sorted(pid for pid, spec in P.PIDS.items() if spec.composite is None)
COMPOSITE = sorted(pid for pid, spec in P.PIDS.items() if spec.composite is not None)


@given(st.sampled_from(LINEAR), st.data())
def test_every_pid_decodes_any_data_of_its_length(pid: int, data: st.DataObject) -> None:
    spec = P.PIDS[pid]
    raw = data.draw(st.binary(min_size=spec.length, max_size=spec.length))
    value = P.decode_answer(bytes((0x41, pid)) + raw)
    assert isinstance(value, P.PidValues)
    (got_pid, got), = value.values
    n = int.from_bytes(raw, "big", signed=spec.signed)
    assert got_pid == pid and abs(got - (n * spec.mul / spec.div + spec.offset)) < 1e-5


@given(st.binary(max_size=24))
def test_random_vin_and_dtc_bytes_raise_only_decode_error(data: bytes) -> None:
    for fn in (P.decode_vin, P.decode_dtcs):
        try:
            fn(data)
        except DecodeError:
            pass


def test_docs_embed_the_generated_pid_table() -> None:
    from pathlib import Path
    doc = (Path(__file__).parents[3] / "docs" / "vehicle.md").read_text()
    assert P.markdown_table() in doc


def test_monitor_status_pid_01() -> None:
    # MIL on, 3 DTCs; spark ignition; misfire supported and not complete; catalyst and
    # EVAP supported, EVAP not complete (J1979-DA PID 01 bit layout)
    (ans,) = P.decode_answer(bytes.fromhex("4101831105" + "04")).signals
    assert ans[0] == 0x01
    got = {name: value for name, _, value in ans[1]}
    assert got == {"Vehicle.OBD.Status.IsMILOn": 1, "Vehicle.OBD.Status.DTCCount": 3,
                   "Vehicle.OBD.Status.IgnitionType": "spark",
                   "Vehicle.OBD.Status.MonitorsNotReady": "misfire,evap-system"}
    (ans,) = P.decode_answer(bytes.fromhex("4101000800" + "00")).signals
    assert dict((n, v) for n, _, v in ans[1])["Vehicle.OBD.Status.IgnitionType"] == "compression"


def test_hybrid_battery_pid_9a_emits_only_supported_values() -> None:
    # J1979-DA: A support bits, B charging state, C-D 1/64 V, E-F signed 0.1 A with the
    # battery discharging positive; a B of 0x5A must not shift the voltage (byte C on).
    (ans,) = P.decode_answer(bytes.fromhex("419A07" + "01" + "5A10" + "FF9C")).signals
    assert ans == (0x9A, (("Vehicle.Powertrain.TractionBattery.CurrentVoltage", "V", 360.25),
                          ("Vehicle.Powertrain.TractionBattery.CurrentCurrent", "A", 10.0)))
    (ans,) = P.decode_answer(bytes.fromhex("419A06" + "00" + "3B90" + "0064")).signals
    assert ans[1][1] == ("Vehicle.Powertrain.TractionBattery.CurrentCurrent", "A", -10.0)
    assert ans[1][0][2] == 238.25  # 0x3B90 / 64: a hybrid pack's voltage
    (ans,) = P.decode_answer(bytes.fromhex("419A03" + "00" + "5A10" + "FF9C")).signals
    assert [n for n, _, _ in ans[1]] == ["Vehicle.Powertrain.TractionBattery.CurrentVoltage"]
    (ans,) = P.decode_answer(bytes.fromhex("419A01" + "00" + "5A10" + "FF9C")).signals
    assert ans[1] == ()


def test_obd_standard_and_fuel_type() -> None:
    assert P.decode_answer(bytes.fromhex("411C06")) == P.PidValues(((0x1C, 6),))
    assert P.decode_answer(bytes.fromhex("415108")) == P.PidValues(((0x51, 8),))


def test_freeze_frame_calibration_ids_and_ecu_name() -> None:
    assert P.freeze_frame_request([0x02, 0x0D]) == bytes.fromhex("0202000D00")
    ans = P.decode_answer(bytes.fromhex("42020001430D0037"), requested=[0x02, 0x0D])
    assert ans == P.FreezeFrame(0, "P0143", ((0x0D, 0x37),))
    with pytest.raises(DecodeError):
        P.decode_answer(bytes.fromhex("42020001430D0137"))  # two frame numbers
    cal = b"\x49\x04\x02" + b"CAL-A".ljust(16, b"\0") + b"CAL-B".ljust(16, b"\0")
    assert P.decode_answer(cal) == P.VehicleInfo(0x04, ("CAL-A", "CAL-B"))
    name = b"\x49\x0a\x01" + b"ECM-EngineControl".ljust(20, b"\0")
    assert P.decode_answer(name) == P.VehicleInfo(0x0A, ("ECM-EngineControl",))
    with pytest.raises(DecodeError) as err:
        P.decode_answer(b"\x49\x04\x02" + b"x" * 16)
    assert err.value.reason == "wrong-length"
    assert P.decode_answer(bytes.fromhex("4A010A80")) == P.Dtcs(0x0A, ("P0A80",))


@given(st.sampled_from(COMPOSITE), st.binary(min_size=6, max_size=6))
def test_composite_pids_decode_any_data(pid: int, raw: bytes) -> None:
    data = raw[:P.PIDS[pid].length]
    (got,) = P.decode_answer(bytes((0x41, pid)) + data).signals
    for name, unit, _ in got[1]:
        assert VEHICLE_SIGNALS[name].unit == unit


@given(st.binary(max_size=40))
def test_random_freeze_frames_and_info_raise_only_decode_error(data: bytes) -> None:
    for prefix in (b"\x42", b"\x49\x04", b"\x49\x0a", b"\x4a"):
        try:
            P.decode_answer(prefix + data)
        except DecodeError:
            pass
