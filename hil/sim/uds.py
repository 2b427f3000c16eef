"""The simulated car's manufacturer data: what an EV's BMS, cluster and gateway answer to
UDS ReadDataByIdentifier (ISO 14229-1 0x22), for any profile in
``firmware_adapters/obd/profiles``.

The physical values come from the driving profile's :class:`~hil.sim.ecu.VehicleState`
(one battery model: SoC, pack voltage from SoC, current from power, lifetime energy
counters that integrate charging and driving). The encoder here inverts each field's
formula on its own (``raw = (value - add) * div / mul``, a state table read backwards), so a
scaling error in the agent's decoder shows up as a test failure instead of cancelling out.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from firmware_adapters.obd.uds import Did, Field, Profile

if TYPE_CHECKING:  # hil.sim.ecu imports this module
    from hil.sim.ecu import VehicleState

_B = "Vehicle.Powertrain.TractionBattery."
CELLS = 96  # a 96s NMC pack: ~360-420 V
CHARGED_START_KWH = 12_000.0  # a few years old: lifetime counters well away from zero
USED_START_KWH = 11_000.0
SOH_PCT = 95.5


def physical(state: VehicleState) -> dict[str, float]:
    """VSS name -> physical value for a :class:`~hil.sim.ecu.VehicleState`."""
    soc = state.soc_pct
    volts = 360.0 + 0.6 * soc
    power_kw = state.power_kw
    charging = state.charging
    return {
        _B + "StateOfCharge.Current": soc,
        _B + "StateOfCharge.Displayed": soc,
        _B + "StateOfHealth": SOH_PCT,
        _B + "CurrentVoltage": volts,
        _B + "CurrentCurrent": power_kw * 1000 / volts,
        _B + "CellVoltage.Max": volts / CELLS + 0.02,
        _B + "CellVoltage.Min": volts / CELLS - 0.02,
        _B + "Temperature.Max": 27.0,
        _B + "Temperature.Min": 24.0,
        _B + "Temperature.Average": 25.5,
        _B + "AccumulatedChargedEnergy":
            (CHARGED_START_KWH + state.charged_kwh) * 1000,
        _B + "AccumulatedConsumedEnergy":
            (USED_START_KWH + state.used_kwh) * 1000,
        _B + "Charging.IsCharging": 1.0 if charging else 0.0,
        _B + "Charging.IsChargingCableConnected": 1.0 if charging else 0.0,
        "Vehicle.TraveledDistance": state.odometer_km,
        "Vehicle.Speed": state.speed_kmh,
    }


def raw_of(field: Field, value: float) -> int:
    """The raw code a real ECU would send for ``value``."""
    if field.states:
        for code, mapped in field.states:
            if mapped == round(value):
                return code
        taken = {code for code, _ in field.states}
        return next(c for c in range(256) if c not in taken)  # the "default" state
    raw = round((value - field.add) * field.div / field.mul)
    bits = 8 * field.length
    if field.signed:
        return max(-(1 << bits - 1), min((1 << bits - 1) - 1, raw))
    return max(0, min((1 << bits) - 1, raw))


def encode(did: Did, values: dict[str, float]) -> bytes:
    """The data of a positive answer (after ``62 <DID>``); unknown bytes stay 0."""
    data = bytearray(did.min_length)
    for f in did.fields:
        raw = raw_of(f, values[f.name])
        if f.mask is not None:
            old = int.from_bytes(data[f.offset:f.offset + f.length], "big")
            raw = old & ~f.mask | (raw << f.shift) & f.mask
            chunk = raw.to_bytes(f.length, "big")
        else:
            chunk = raw.to_bytes(f.length, "big", signed=f.signed)
        data[f.offset:f.offset + f.length] = chunk
    return bytes(data)


def answer(did: Did, values: dict[str, float]) -> bytes:
    return bytes((0x62,)) + did.did.to_bytes(2, "big") + encode(did, values)


def routes(profile: Profile) -> dict[int, int]:
    """Request id -> response id of every ECU in the profile."""
    return {r.request_id: r.response_id for _, r in profile.ecus}
