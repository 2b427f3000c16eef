"""What the channel persists, and the values both roles share. Sans-I/O.

The protocol returns ``Persist(record)`` actions; the driver writes them durably
(agent/channel/store.py) BEFORE it executes the actions that follow (DESIGN s5: "persist the
highest nonce you signed before releasing a signature; persist a co-signed state before
acting on it"). A restarted party rebuilds itself from the records alone.

Records (deterministic CBOR arrays, first element the record kind):

    [1, open params]                                OpenRecord: the channel exists
    [2, funding reference]                          FundedRecord: deposits are in
    [3, meter item, base_import, base_export]       MeterRecord: a METER the station signed
    [4, state item, sig, meter item]                SignedRecord: a state we signed (vehicle)
    [5, state item, sig_ev, sig_cs]                 CosignedRecord: both signatures
    [6, counter_hi, base_import, base_export]       MeterReserveRecord: METER counters up to
                                                    counter_hi may have been signed; the
                                                    meter registers at the channel's start
    [7, nonce_hi]                                   NonceReserveRecord: state nonces up to
                                                    nonce_hi may have been signed (vehicle)
    [8, wall_s]                                     ClockRecord: the vehicle's own clock
                                                    (unix s) when it accepted OPEN: the
                                                    earliest time its first METER may price
"""

from __future__ import annotations

from dataclasses import dataclass

from agent import dcbor
from agent.channel.messages import Tariff, field
from agent.channel.state import ChannelState, derive_channel_id
from agent.errors import MalformedEnvelope

# METERs the station remembers (and its store keeps) to check the PAYs that refer to them.
KEEP_METERS = 256


@dataclass(frozen=True, slots=True)
class Party:
    """One side's public keys: Ed25519 identity (transport) and settlement address."""

    identity: bytes
    address: bytes

    def __post_init__(self) -> None:
        if not (isinstance(self.identity, bytes) and len(self.identity) == 32):
            raise ValueError("identity public key must be 32 bytes")
        if not (isinstance(self.address, bytes) and len(self.address) == 20):
            raise ValueError("settlement address must be 20 bytes")


@dataclass(frozen=True, slots=True)
class OpenParams:
    """Everything OPEN fixes for the life of the channel."""

    chain_id: int
    contract: bytes
    salt: bytes
    ev: Party
    cs: Party
    deposit_ev: int
    deposit_cs: int
    dispute_window_s: int
    tariff: Tariff
    tariff_sig: bytes
    credit_window_wh: int
    pay_step_wh: int

    def __post_init__(self) -> None:
        for name in ("chain_id", "deposit_ev", "deposit_cs", "dispute_window_s",
                     "credit_window_wh", "pay_step_wh"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer")
        if self.pay_step_wh < 1:
            raise ValueError("pay_step_wh must be at least 1")

    @property
    def channel_id(self) -> bytes:
        return derive_channel_id(self.chain_id, self.contract, self.ev.address,
                                 self.cs.address, self.salt)

    def to_body(self) -> dict[int, object]:
        return {0: self.chain_id, 1: self.contract, 2: self.salt, 3: self.ev.identity,
                4: self.cs.identity, 5: self.ev.address, 6: self.cs.address,
                7: self.deposit_ev, 8: self.deposit_cs, 9: self.dispute_window_s,
                10: self.tariff.to_cbor_item(), 11: self.tariff_sig,
                12: self.credit_window_wh, 13: self.pay_step_wh}

    @classmethod
    def from_body(cls, body: dict[int, object]) -> OpenParams:
        b = body
        try:
            return cls(
                chain_id=field(b, 0, int), contract=field(b, 1, bytes, size=20),
                salt=field(b, 2, bytes, size=32),
                ev=Party(field(b, 3, bytes, size=32), field(b, 5, bytes, size=20)),
                cs=Party(field(b, 4, bytes, size=32), field(b, 6, bytes, size=20)),
                deposit_ev=field(b, 7, int), deposit_cs=field(b, 8, int),
                dispute_window_s=field(b, 9, int),
                tariff=Tariff.from_cbor_item(b.get(10)),
                tariff_sig=field(b, 11, bytes, size=64),
                credit_window_wh=field(b, 12, int), pay_step_wh=field(b, 13, int))
        except ValueError as exc:
            raise MalformedEnvelope(f"bad OPEN: {exc}", reason="malformed-message") from None


@dataclass(frozen=True, slots=True)
class MeterInfo:
    """A station-signed cumulative meter statement (energy since the channel opened).

    ``charge_milli`` = sum over readings of (import Wh x import price per kWh in force at the
    reading), ``credit_milli`` likewise for export: exact integers in 1/1000 of the token's
    smallest unit. The state pays ``t_ev = charge_milli // 1000`` and
    ``t_cs = credit_milli // 1000`` (floor: nobody pays for a fraction not yet due; the
    remainder is carried in the cumulative sum, so rounding never drifts).

    ``ocmf`` (optional, body key 8, encoded only when set): the record the station's
    Eichrecht meter signed itself (``OCMF|payload|signature``), carried unchanged so that
    the vehicle can check the METER against the meter's own key, not only the station's
    (agent.channel.meter_proof).
    """

    counter: int
    import_wh: int
    export_wh: int
    ts_s: int
    charge_milli: int
    credit_milli: int
    tariff_id: bytes
    final: bool = False
    ocmf: str = ""

    @property
    def t_ev(self) -> int:
        return self.charge_milli // 1000

    @property
    def t_cs(self) -> int:
        return self.credit_milli // 1000

    def to_body(self) -> dict[int, object]:
        body: dict[int, object] = {
            0: self.counter, 1: self.import_wh, 2: self.export_wh, 3: self.ts_s,
            4: self.charge_milli, 5: self.credit_milli, 6: self.tariff_id, 7: self.final}
        if self.ocmf:
            body[8] = self.ocmf
        return body

    @classmethod
    def from_body(cls, b: dict[int, object]) -> MeterInfo:
        final = b.get(7)
        if not isinstance(final, bool):
            raise MalformedEnvelope("METER final must be a bool", reason="malformed-message")
        ocmf = b.get(8, "")
        if not isinstance(ocmf, str) or 8 in b and not ocmf or len(ocmf) > 8192:
            raise MalformedEnvelope("METER ocmf must be a non-empty string when present",
                                    reason="malformed-message")
        return cls(field(b, 0, int), field(b, 1, int), field(b, 2, int),
                   field(b, 3, int), field(b, 4, int), field(b, 5, int),
                   field(b, 6, bytes, size=16), final, ocmf)


@dataclass(frozen=True, slots=True)
class OpenRecord:
    params: OpenParams


@dataclass(frozen=True, slots=True)
class FundedRecord:
    reference: bytes = b""


@dataclass(frozen=True, slots=True)
class MeterRecord:
    meter: MeterInfo
    base_import: int
    base_export: int


@dataclass(frozen=True, slots=True)
class SignedRecord:
    state: ChannelState
    sig: bytes
    meter: MeterInfo


@dataclass(frozen=True, slots=True)
class CosignedRecord:
    state: ChannelState
    sig_ev: bytes
    sig_cs: bytes


@dataclass(frozen=True, slots=True)
class MeterReserveRecord:
    counter_hi: int
    base_import: int
    base_export: int


@dataclass(frozen=True, slots=True)
class NonceReserveRecord:
    nonce_hi: int


@dataclass(frozen=True, slots=True)
class ClockRecord:
    wall_s: int


Record = (OpenRecord | FundedRecord | MeterRecord | SignedRecord | CosignedRecord
          | MeterReserveRecord | NonceReserveRecord | ClockRecord)


def encode_record(record: Record) -> bytes:
    if isinstance(record, OpenRecord):
        item: list[object] = [1, record.params.to_body()]
    elif isinstance(record, FundedRecord):
        item = [2, record.reference]
    elif isinstance(record, MeterRecord):
        item = [3, record.meter.to_body(), record.base_import, record.base_export]
    elif isinstance(record, SignedRecord):
        item = [4, record.state.to_cbor_item(), record.sig, record.meter.to_body()]
    elif isinstance(record, CosignedRecord):
        item = [5, record.state.to_cbor_item(), record.sig_ev, record.sig_cs]
    elif isinstance(record, MeterReserveRecord):
        item = [6, record.counter_hi, record.base_import, record.base_export]
    elif isinstance(record, NonceReserveRecord):
        item = [7, record.nonce_hi]
    else:
        item = [8, record.wall_s]
    return dcbor.dumps(item)


def decode_record(data: bytes) -> Record:
    item = dcbor.loads(data, max_bytes=8192)
    if not (isinstance(item, list) and item and isinstance(item[0], int)):
        raise MalformedEnvelope("not a channel record", reason="malformed-record")
    kind, rest = item[0], item[1:]
    try:
        if kind == 1:
            return OpenRecord(OpenParams.from_body(rest[0]))
        if kind == 2:
            return FundedRecord(rest[0])
        if kind == 3:
            return MeterRecord(MeterInfo.from_body(rest[0]), rest[1], rest[2])
        if kind == 4:
            return SignedRecord(ChannelState.from_cbor_item(rest[0]), rest[1],
                                MeterInfo.from_body(rest[2]))
        if kind == 5:
            return CosignedRecord(ChannelState.from_cbor_item(rest[0]), rest[1], rest[2])
        if kind == 6 and all(isinstance(x, int) for x in rest[:3]):
            return MeterReserveRecord(rest[0], rest[1], rest[2])
        if kind == 7 and len(rest) == 1 and isinstance(rest[0], int) \
                and not isinstance(rest[0], bool):
            return NonceReserveRecord(rest[0])
        if kind == 8 and len(rest) == 1 and isinstance(rest[0], int) \
                and not isinstance(rest[0], bool):
            return ClockRecord(rest[0])
    except (IndexError, TypeError, AttributeError) as exc:
        raise MalformedEnvelope(f"bad channel record: {exc}", reason="malformed-record") from None
    raise MalformedEnvelope(f"unknown record kind {kind}", reason="malformed-record")
