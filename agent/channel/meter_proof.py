"""The vehicle's check of a METER against the station's own Eichrecht meter (sans-I/O).

A METER statement is signed by the station. When the station's meter is an Eichrecht
meter, the METER can also carry the record that meter signed itself (``MeterInfo.ocmf``,
S.A.F.E. OCMF). The vehicle then checks, with the meter's public key (published with the
station's connector, or pinned by the fleet), that

1. the record's signature verifies (agent.ocmf.verify_record): the meter said it;
2. the record is of the meter the vehicle expects (``MS``, when given);
3. the energy the METER bills since the channel opened is not more than the meter's
   signed energy between the record's begin (``TX = "B"``) and its last reading, plus
   ``tolerance_wh`` (the meter signs in its own resolution, usually 1 Wh), all of one
   energy register (``RI``).

What it does not prove: that the record is of this session (the meter key comes with the
station's offer, and an older record of the same meter with more energy would pass); the
vehicle's own energy count (``[channel.energy]``) is what bounds the bill against that.

It raises, never returns a bool (agent.errors.ChannelError with a reason code the
vehicle can put in its REJECT): ``meter-proof-missing``, ``meter-proof-invalid``,
``meter-proof-serial``, ``meter-proof-energy``.
"""

from __future__ import annotations

from agent.channel.records import MeterInfo
from agent.errors import BadSignature, ChannelError, MalformedEnvelope
from agent.ocmf import OcmfRecord, verify_record


def check_meter_proof(meter: MeterInfo, meter_public_key: str | bytes, *,
                      meter_serial: str = "", tolerance_wh: int = 1) -> OcmfRecord:
    """The verified record, or ChannelError(reason) (module rules 1-3)."""
    if not meter.ocmf:
        raise ChannelError("METER carries no meter-signed record", reason="meter-proof-missing")
    try:
        record = verify_record(meter.ocmf, meter_public_key)
    except (BadSignature, MalformedEnvelope) as exc:
        raise ChannelError(f"meter-signed record refused: {exc}",
                           reason="meter-proof-invalid") from None
    if meter_serial and record.meter_serial != meter_serial:
        raise ChannelError(f"record of meter {record.meter_serial!r}, expected "
                           f"{meter_serial!r}", reason="meter-proof-serial")
    energies = [(r.kind, wh) for r in record.readings if (wh := r.energy_wh) is not None]
    registers = {r.obis for r in record.readings if r.energy_wh is not None}
    if len(registers) > 1:  # a begin of one register and an end of another proves nothing
        raise ChannelError(f"record mixes energy registers {sorted(registers)}",
                           reason="meter-proof-invalid")
    begin = next((wh for kind, wh in energies if kind == "B"), None)
    if begin is None or len(energies) < 2:
        raise ChannelError("record has no begin and later energy reading",
                           reason="meter-proof-invalid")
    signed_wh = energies[-1][1] - begin
    if meter.import_wh > signed_wh + tolerance_wh:
        raise ChannelError(f"METER bills {meter.import_wh} Wh, the meter signed "
                           f"{signed_wh} Wh", reason="meter-proof-energy")
    return record
