"""Issue 16 features of the Modbus source against the meter simulator over loopback TCP:
sentinels and absurd values, identity once per connection, inverted CT, map = "auto",
SunSpec discovery, signed (OCMF) meters verified by our verifier and by pyocmf."""

from __future__ import annotations

import asyncio
import struct

import pyocmf  # the independent OCMF verifier (test extra pyocmf[crypto])
import pytest
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType as SimType
from pymodbus.simulator import SimData, SimDevice

from agent.channel.meter_proof import check_meter_proof
from agent.channel.records import MeterInfo
from agent.envelope import Sealer, open_envelope
from agent.errors import BadSignature, ChannelError
from agent.keys import IdentityKey
from agent.ocmf import verify_record
from agent.verify import Verifier
from firmware_adapters.modbus.driver import ModbusTcpSource
from firmware_adapters.modbus.mapfile import builtin_maps, load_map
from hil.sim.meter import ChargingProfile, ManualClock, MeterSimulator
from tests.firmware_adapters.modbus.support import Sink

FAST = {"timeout_s": 0.5, "retries": 0, "interval_s": 0.05}


def run(coro, timeout: float = 60.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def source(port: int, meters: list[dict], **extra) -> ModbusTcpSource:
    return ModbusTcpSource.from_options("meter0", {"host": "127.0.0.1", "port": port,
                                                   "meters": meters, **FAST, **extra}, "t")


async def polls(sim: MeterSimulator, meters: list[dict], n: int, between=None):
    port = await sim.start_tcp()
    src, sink = source(port, meters), Sink()
    try:
        assert await src.ensure_line(sink)
        for i in range(n):
            await src.poll_once(sink)
            if between:
                between(i)
    finally:
        src.link.close()
        await sim.stop()
    return src, sink


def test_abb_all_ones_is_not_available_and_the_stream_still_verifies() -> None:
    sim = MeterSimulator({1: "abb_b23"}, ChargingProfile.constant(5_000), clock=ManualClock())
    sim.set_raw(1, "1-0:1.8.0", [0xFFFF] * 4)   # ABB: "not available"
    src, sink = run(polls(sim, [{"unit": 1, "map": "abb_b23"}], 3))
    names = {r.name for r in sink.readings}
    assert "1-0:1.8.0" not in names and "1-0:16.7.0" in names  # no reading, the rest goes on
    assert sink.codes().count("meter-value-unavailable") == 1    # one event, not one per poll
    assert src.counters["not-available"] == 3
    key = IdentityKey(bytes(32))
    sealer = Sealer(key, "cs", bytes(16))
    envelope = sealer.seal_readings(sink.readings)
    assert len(open_envelope(envelope.data, lambda kid: key.public).readings) == \
        len(sink.readings)


def test_a_float_glitch_is_flagged_implausible_and_a_bignum_never_sealed() -> None:
    sim = MeterSimulator({1: "sdm630"}, ChargingProfile.constant(5_000), clock=ManualClock())
    glitch = struct.unpack(">HH", struct.pack(">f", 1e30))
    sim.set_raw(1, "1-0:32.7.0", list(glitch))   # 1e30 V: inside 64 bits? no: 1e33 mV
    sim.set_raw(1, "1-0:31.7.0", list(struct.unpack(">HH", struct.pack(">f", 1e9))))
    src, sink = run(polls(sim, [{"unit": 1, "map": "sdm630"}], 1))
    current = next(r for r in sink.readings if r.name == "1-0:31.7.0")
    assert current.flags == ("implausible",) and current.value == 10**12
    assert "1-0:32.7.0" not in {r.name for r in sink.readings}
    assert src.counters["unrepresentable"] == 1 and "meter-value-absurd" in sink.codes()
    assert "meter-value-out-of-range" in sink.codes()


def test_identity_is_read_once_per_connection_and_names_every_reading() -> None:
    async def main():
        sim = MeterSimulator({1: "sdm630", 2: "abb_b23"}, ChargingProfile.constant(3_000),
                             clock=ManualClock(), serial="777")
        port = await sim.start_tcp()
        src, sink = source(port, [{"unit": 1, "map": "sdm630"}, {"unit": 2, "map": "abb_b23"}]), Sink()
        try:
            assert await src.ensure_line(sink)
            await src.poll_once(sink)
            after_first = dict(sim.requests)
            await src.poll_once(sink)
            after_second = dict(sim.requests)
        finally:
            src.link.close()
            await sim.stop()
        return src, sink, after_first, after_second

    src, sink, first, second = run(main())
    # first poll: blocks + one serial read per meter; second: the blocks only
    assert first == {1: 2 + 1, 2: 2 + 1} and second == {1: 5, 2: 5}
    assert {r.meter for r in sink.readings} == {"1/777", "2/777"}
    assert sink.codes().count("meter-identified") == 2
    assert src.identities() == ("1/777", "2/777")


def test_inverted_ct_swaps_the_counters_and_the_sign() -> None:
    sim = MeterSimulator({1: "sdm630"}, ChargingProfile.constant(-3_000), clock=ManualClock())
    served = sim.served_values(1)
    _, sink = run(polls(sim, [{"unit": 1, "map": "sdm630", "inverted": True}], 1))
    got = {r.name: r.value for r in sink.readings}
    assert got["1-0:16.7.0"] == 3_000
    assert got["1-0:1.8.0"] == served["1-0:2.8.0"] and got["1-0:2.8.0"] == served["1-0:1.8.0"]


@pytest.mark.parametrize("map_name", [n for n in builtin_maps() if load_map(n).model_id])
def test_map_auto_finds_the_model_from_its_identity_registers(map_name) -> None:
    sim = MeterSimulator({5: map_name}, ChargingProfile.constant(2_000), clock=ManualClock())
    served = sim.served_values(5)
    _, sink = run(polls(sim, [{"unit": 5, "map": "auto"}], 1))
    assert {r.name: r.value for r in sink.readings} == served


def sunspec_registers(model: int) -> list[int]:
    """A SunSpec device laid out by hand (SunSpec Information Model, Meter Models):
    "SunS", common model 1 (L = 66, serial at data offset 50), meter model, end."""
    regs = [0x5375, 0x6E53, 1, 66] + [0] * 66
    serial = b"SN-4242".ljust(32, b"\0")
    regs[4 + 50:4 + 66] = [int.from_bytes(serial[i:i + 2], "big") for i in range(0, 32, 2)]
    data = [0x8000] * 105                  # everything "not implemented" ...
    data[1], data[4] = 1_600, 0xFFFE       # AphA 16.00 A, A_SF -2
    data[6], data[13] = 2_301, 0xFFFF      # PhVphA 230.1 V, V_SF -1
    data[14], data[15] = 4_998, 0xFFFE     # Hz 49.98, Hz_SF -2
    data[16], data[17], data[20] = 1_100, 1_100, 1  # W, WphA 11000 (x 10^1), W_SF 1
    data[31], data[35] = 990, 0xFFFF       # PF 99.0 %, PF_SF -1
    data[36:38] = [0, 1_000]               # TotWhExp 1000 x 10^2 Wh
    data[44:46] = [0x0001, 0xE240]         # TotWhImp 123456 x 10^2 Wh
    data[52] = 2                           # TotWh_SF 2
    return regs + [model, 105] + data + [0xFFFF, 0]


@pytest.mark.parametrize("model", [201, 203])
def test_sunspec_meter_is_discovered_with_its_scale_factors(model) -> None:
    async def main():
        regs = [0] * 40000 + sunspec_registers(model)
        holding = SimData(0, values=regs, datatype=SimType.REGISTERS)
        bits = [SimData(0, count=16, values=False, datatype=SimType.BITS)]
        inputs = SimData(0, count=1, values=0, datatype=SimType.REGISTERS)
        server = ModbusTcpServer([SimDevice(id=1, simdata=(bits, list(bits), [holding],
                                                           [inputs]))],
                                 address=("127.0.0.1", 0))
        await server.serve_forever(background=True)
        port = server.transport.sockets[0].getsockname()[1]
        src, sink = source(port, [{"unit": 1, "map": "sunspec"}]), Sink()
        try:
            assert await src.ensure_line(sink)
            assert await src.poll_once(sink) == 1, sink.codes()
        finally:
            src.link.close()
            await server.shutdown()
        return sink

    sink = run(main())
    got = {r.name: r.value for r in sink.readings}
    assert got["1-0:1.8.0"] == 12_345_600 and got["1-0:2.8.0"] == 100_000
    assert got["1-0:16.7.0"] == 11_000 and got["1-0:32.7.0"] == 230_100
    assert got["1-0:31.7.0"] == 16_000 and got["1-0:14.7.0"] == 49_980
    assert got["1-0:13.7.0"] == 990
    assert {r.meter for r in sink.readings} == {"1/SN-4242"}
    # 203 (wye) declares phases B and C; their "not implemented" is no reading + an event
    assert ("1-0:52.7.0" in got) is False
    assert ("meter-value-unavailable" in sink.codes()) is (model == 203)


# ---------------------------------------------------------------- Eichrecht (OCMF) meters


def signed_session():
    async def main():
        clock = ManualClock()
        sim = MeterSimulator({3: "wm3m4"}, ChargingProfile.constant(11_000), clock=clock,
                             serial="WM420001")
        port = await sim.start_tcp()
        src, sink = source(port, [{"unit": 3, "map": "wm3m4", "signed_meter": True}]), Sink()
        try:
            src._emit = sink
            assert await src.ensure_line(sink)
            await src.poll_once(sink)
            await src.begin_transaction(3, {"FV": "1.0", "GI": "ev-edge-agent", "ID": "car-1"})
            clock.advance(3600)  # one hour at 11 kW
            record = await src.end_transaction(3)
        finally:
            src.link.close()
            await sim.stop()
        return sim, sink, record

    return run(main())


def test_signed_meter_record_verifies_with_our_verifier_and_pyocmf() -> None:
    sim, sink, record = signed_session()
    key = next(r.value for r in sink.readings if r.name == "Meter.PublicKey")
    assert key == sim.signed[3].public_key_der.hex().upper()
    assert record == sim.signed[3].records[-1]          # unchanged, as the meter signed it
    assert [r.value for r in sink.readings if r.name == "Meter.OCMF"] == [record]
    parsed = verify_record(record, key)
    begin, end = (r.energy_wh for r in parsed.readings)
    assert end - begin == 11_000 and parsed.meter_serial == "WM420001"
    assert parsed.payload["ID"] == "car-1"                # the host's metadata is in it
    assert pyocmf.OCMF.from_string(record).verify_signature(key) is True
    tampered = record.replace('"RV":', '"RV":1', 1)
    with pytest.raises(BadSignature):
        verify_record(tampered, key)
    assert pyocmf.OCMF.from_string(tampered).verify_signature(key) is False


def test_the_verifier_shows_the_meter_signed_verdict() -> None:
    _, sink, record = signed_session()
    key = IdentityKey(bytes(range(32)))
    sealer = Sealer(key, "cs-1", bytes(16))

    class Registry:
        def lookup(self, kid: bytes) -> bytes:
            return key.public

        def device_of(self, kid: bytes) -> str:
            return "cs-1"

    verifier = Verifier(Registry())  # type: ignore[arg-type]
    verifier.add(sealer.seal_readings(sink.readings).data)
    good = verifier.report()
    assert good.ok and good.devices["cs-1"].meter_signed_ok == 1
    forged = [r if r.name != "Meter.OCMF" else type(r)(r.name, r.value.replace(
        '"RV":', '"RV":9', 1), r.unit, r.ts_ns, r.time_status, r.source, r.flags, r.meter)
        for r in sink.readings]
    verifier.add(sealer.seal_readings(forged).data)
    bad = verifier.report()
    assert not bad.ok and bad.devices["cs-1"].meter_signed_bad == 1
    assert "meter-signed OCMF records that FAIL: 1" in bad.format()


def test_the_vehicle_checks_a_meter_statement_against_the_meter_key() -> None:
    sim, sink, record = signed_session()
    key = sim.signed[3].public_key_der.hex()
    meter = MeterInfo(7, 11_000, 0, 1, 0, 0, bytes(16), False, record)
    assert MeterInfo.from_body(meter.to_body()) == meter
    assert 8 not in MeterInfo(7, 1, 0, 1, 0, 0, bytes(16)).to_body()  # optional field
    assert check_meter_proof(meter, key, meter_serial="WM420001").meter_serial == "WM420001"
    for bad, reason in ((MeterInfo(7, 11_500, 0, 1, 0, 0, bytes(16), False, record),
                         "meter-proof-energy"),
                        (MeterInfo(7, 1, 0, 1, 0, 0, bytes(16)), "meter-proof-missing")):
        with pytest.raises(ChannelError) as info:
            check_meter_proof(bad, key)
        assert info.value.reason == reason
    with pytest.raises(ChannelError) as info:
        check_meter_proof(meter, key, meter_serial="someone-else")
    assert info.value.reason == "meter-proof-serial"


def test_a_meter_record_that_mixes_energy_registers_proves_nothing() -> None:
    """A begin on the import register and an end on another (export, a tariff register):
    their difference is not the energy of the session."""
    import json

    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    public = key.public_key().public_bytes(serialization.Encoding.DER,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)

    def reading(kind: str, kwh: float, register: str) -> dict[str, object]:
        return {"TM": "2026-12-01T10:00:00,000+0000 S", "TX": kind, "RV": kwh,
                "RI": register, "RU": "kWh", "RT": "AC", "EF": "", "ST": "G"}

    def record(end_register: str) -> str:
        payload = json.dumps({"FV": "1.0", "PG": "T1", "MS": "WM420001", "RD": [
            reading("B", 1.0, "1-0:1.8.0"), reading("E", 21.0, end_register)]},
            separators=(",", ":"))
        signature = key.sign(payload.encode(), ec.ECDSA(hashes.SHA256()))
        return f'OCMF|{payload}|{{"SA":"ECDSA-secp256r1-SHA256","SD":"{signature.hex()}"}}'

    same = MeterInfo(7, 11_000, 0, 1, 0, 0, bytes(16), False, record("1-0:1.8.0"))
    assert check_meter_proof(same, public).meter_serial == "WM420001"   # 20 kWh signed
    mixed = MeterInfo(7, 11_000, 0, 1, 0, 0, bytes(16), False, record("1-0:2.8.0"))
    with pytest.raises(ChannelError) as info:
        check_meter_proof(mixed, public)
    assert info.value.reason == "meter-proof-invalid" and "mixes energy registers" in \
        str(info.value)
