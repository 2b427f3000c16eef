"""The vehicle's side of the payment channel (sans-I/O): checks OPEN and METERs against
the signed tariff and its own estimate, and proposes (signs first) every state. Rules and
the verbs' contract: agent/channel/protocol.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from agent.channel import messages as m
from agent.channel.messages import MsgType
from agent.channel.protocol import (
    Action,
    Channel,
    IdentitySigner,
    MeterAccepted,
    Opened,
    PaymentWithheld,
    Persist,
    Phase,
    Role,
    Send,
    SettlementSigner,
    _check_signer,
)
from agent.channel.records import (
    CosignedRecord,
    FundedRecord,
    MeterInfo,
    NonceReserveRecord,
    OpenParams,
    OpenRecord,
    Party,
    Record,
    SignedRecord,
)
from agent.channel.state import ChannelState
from agent.errors import ChannelError, LocalProtocolError

# State nonces reserved per synced record (a restart skips the unused rest).
NONCE_RESERVE = 64


class VehicleChannel(Channel):
    """The vehicle: checks OPEN and METERs, proposes (and signs first) every state."""

    role = Role.VEHICLE

    def __init__(self, identity: IdentitySigner, settlement: SettlementSigner, station: Party, *,
                 chain_id: int, contract: bytes, salt: bytes, max_price_per_kwh: int,
                 max_deposit_ev: int, tolerance_wh: int = 50, tolerance_ppm: int = 20_000,
                 window: int = 1) -> None:
        super().__init__(identity, settlement, station, chain_id, contract, salt)
        self.max_price_per_kwh, self.max_deposit_ev = max_price_per_kwh, max_deposit_ev
        self.tolerance_wh, self.tolerance_ppm = tolerance_wh, tolerance_ppm
        if window < 1:
            raise ValueError("window must be at least 1")
        self.window = window  # proposals in flight at most (1: stop-and-wait)
        self.estimate_wh: int | None = None
        # Set when the station's offer names its Eichrecht meter's key: the final METER is
        # signed only if its meter-signed record checks (raises ChannelError(reason)).
        self.final_meter_check: Callable[[MeterInfo], object] | None = None
        self.meter_seen: MeterInfo | None = None
        self.signed: dict[int, SignedRecord] = {}   # our proposals above the co-signed nonce
        self.highest_signed = 0
        self.nonce_reserved = 0  # nonces up to this may have been signed (persisted, synced)
        self.abandoned: set[int] = set()
        self.withheld: int | None = None            # METER counter we refused to pay
        self.paid_counter = 0                       # highest METER counter we proposed for
        self._digests: dict[int, bytes] = {}        # EIP-712 digests of our live proposals
        self.close_wanted = False

    # ---- verbs

    def funded(self, reference: bytes, now: float) -> list[Action]:
        """The funding step is done: tell the station (FUNDED)."""
        if self.phase is not Phase.OPENING:
            raise LocalProtocolError(f"funded() in phase {self.phase.value}",
                                     reason="not-opening")
        self.phase = Phase.ACTIVE
        self.funding_ref = reference
        return [Persist(FundedRecord(reference)), self._send(MsgType.FUNDED, {0: reference})]

    def estimate(self, delivered_wh: int, now: float) -> list[Action]:
        """The vehicle's own cumulative estimate of energy received (Wh since the start)."""
        self.estimate_wh = delivered_wh
        return self._maybe_pay(now)

    def close(self, now: float) -> list[Action]:
        """Ask the station to stop and send its final METER."""
        if self.phase is not Phase.ACTIVE:
            raise LocalProtocolError(f"close() in phase {self.phase.value}", reason="not-active")
        self.phase = Phase.CLOSING
        self.close_wanted = True
        self._arm(now)
        return [self._send(MsgType.CLOSE, {0: None, 1: None, 2: None})]

    def _live(self) -> list[int]:
        return [n for n in self.signed if n > self.nonce and n not in self.abandoned]

    @property
    def pending(self) -> SignedRecord | None:
        """Our highest proposal not yet co-signed (a co-signed higher nonce supersedes
        lower ones, so retransmitting this one is enough)."""
        live = self._live()
        return self.signed[max(live)] if live else None

    # ---- handlers

    def _on_open(self, body: dict[int, object], now: float) -> list[Action]:
        params = OpenParams.from_body(body)
        if self.params is not None:
            if params == self.params:
                self.duplicates += 1
                if self.phase is Phase.OPENING:
                    return []
                return [self._send(MsgType.FUNDED, {0: self.funding_ref})]
            reason = "tariff-changed" if params.tariff != self.params.tariff else "open-mismatch"
            raise ChannelError("OPEN differs from the accepted one", reason=reason)
        ev, cs = self._parties()
        if params.chain_id != self.chain_id:
            raise ChannelError("OPEN for another chain", reason="wrong-chain")
        if params.contract != self.contract:
            raise ChannelError("OPEN for another contract", reason="wrong-contract")
        if (params.ev, params.cs, params.salt) != (ev, cs, self.salt):
            raise ChannelError("OPEN names other parties or salt", reason="open-mismatch")
        m.check_tariff(params.tariff, params.tariff_sig, cs.identity)
        highest = max([params.tariff.price_per_kwh] + [p for _, p in params.tariff.tou])
        if highest > self.max_price_per_kwh:
            raise ChannelError("tariff above our limit", reason="tariff-too-expensive")
        if params.deposit_ev > self.max_deposit_ev:
            raise ChannelError("deposit above our limit", reason="deposit-too-large")
        self.params = params
        self.phase = Phase.OPENING
        return [Persist(OpenRecord(params)), Opened(params)]

    def _on_meter(self, body: dict[int, object], now: float) -> list[Action]:
        info = MeterInfo.from_body(body)
        assert self.params is not None
        if info.tariff_id != self.params.tariff.tariff_id():
            raise ChannelError("METER under another tariff", reason="tariff-changed")
        seen = self.meter_seen
        if seen is not None:
            if info.counter < seen.counter:
                raise ChannelError("METER older than the last one", reason="stale-meter")
            if info.counter == seen.counter:
                if info != seen:
                    raise ChannelError("two METERs with one counter",
                                       reason="meter-equivocation")
                self.duplicates += 1
                return self._maybe_pay(now)
        self._check_meter(seen, info)
        self.meter_seen = info
        return [MeterAccepted(info), *self._maybe_pay(now)]

    def _check_meter(self, seen: MeterInfo | None, info: MeterInfo) -> None:
        assert self.params is not None
        base_imp = seen.import_wh if seen else 0
        base_exp = seen.export_wh if seen else 0
        base_charge = seen.charge_milli if seen else 0
        base_credit = seen.credit_milli if seen else 0
        if (info.import_wh < base_imp or info.export_wh < base_exp
                or info.charge_milli < base_charge or info.credit_milli < base_credit):
            raise ChannelError("cumulative values went down", reason="meter-decreased")
        tariff = self.params.tariff
        if seen is not None and info.ts_s < seen.ts_s:
            raise ChannelError("METER time went backwards", reason="meter-time-backwards")
        # Only an upper bound: it is what protects the vehicle. No lower bound, so a station
        # that re-meters after losing an unsynced METER in a crash (station._send_meter) and
        # prices that energy at a later, lower time-of-use rate is not refused.
        _, high = tariff.price_range(seen.ts_s, info.ts_s) if seen else tariff.price_range(0, 86_400)
        d_imp = info.import_wh - base_imp
        d_charge = info.charge_milli - base_charge
        d_credit = info.credit_milli - base_credit
        if not d_charge <= d_imp * high or (
                d_credit != (info.export_wh - base_exp) * tariff.export_price_per_kwh):
            raise ChannelError("METER charge does not follow the signed tariff",
                               reason="meter-charge-mismatch")

    def _on_ack(self, body: dict[int, object], now: float) -> list[Action]:
        return self._on_countersigned(body, now, final=False)

    def _on_closed(self, body: dict[int, object], now: float) -> list[Action]:
        return self._on_countersigned(body, now, final=True)

    def _on_countersigned(self, body: dict[int, object], now: float, *,
                          final: bool) -> list[Action]:
        nonce: int = m.field(body, 0, int)  # type: ignore[assignment]
        sig_cs: bytes = m.field(body, 1, bytes)  # type: ignore[assignment]
        if nonce <= self.nonce:
            self.duplicates += 1
            return []
        proposal = self.signed.get(nonce)
        if proposal is None or proposal.state.final != final:
            raise ChannelError(f"countersignature for nonce {nonce} we did not propose",
                               reason="unknown-nonce", nonce=nonce)
        digest = self._digests.pop(nonce, None) or proposal.state.digest()
        _check_signer(digest, sig_cs, self.peer.address)
        out = self._adopt(CosignedRecord(proposal.state, proposal.sig, sig_cs))
        self._deadline = (now + self._rto) if self._live() else None
        return out + self._maybe_pay(now)

    def _adopt(self, record: CosignedRecord) -> list[Action]:
        out = super()._adopt(record)
        nonce = record.state.nonce
        self.signed = {n: r for n, r in self.signed.items() if n > nonce}
        self.abandoned = {n for n in self.abandoned if n > nonce}
        return out

    def _sync_cosigned(self, state: ChannelState) -> bool:
        """The final state, and any state that raises t_cs (what the station owes us for
        V2G); not one that only raises t_ev. Losing a co-signed state in a crash costs the
        vehicle nothing unless it holds a claim of ours: a later state that only pays the
        station more is the station's to keep (it holds it too, and sends it again with
        REESTABLISH or the duplicate ACK). So the durable latest state always carries our
        highest V2G claim, and plain charging costs the vehicle no fsync per update."""
        previous = self.cosigned.state if self.cosigned is not None else None
        return state.final or previous is None or state.t_cs > previous.t_cs

    def _peer_rejected(self, nonce: int | None) -> list[Action]:
        if nonce is not None and nonce in self.signed:
            self.abandoned.add(nonce)
            if self.pending is None:
                self._deadline = None
        return []

    # ---- paying

    def _maybe_pay(self, now: float) -> list[Action]:
        meter = self.meter_seen
        if (self.phase not in (Phase.ACTIVE, Phase.CLOSING) or meter is None
                or len(self._live()) >= self.window):
            return []
        if meter.counter <= self.paid_counter:
            return []
        cos = self.cosigned.state if self.cosigned else None
        if not meter.final and (meter.t_ev, meter.t_cs, meter.import_wh) == (
                (cos.t_ev, cos.t_cs, cos.wh) if cos else (0, 0, 0)):
            return []  # nothing new to pay for
        if self.estimate_wh is not None:
            allowed = self.estimate_wh + self.tolerance_wh + \
                meter.import_wh * self.tolerance_ppm // 1_000_000
            if meter.import_wh > allowed:
                if self.withheld == meter.counter:
                    return []
                self.withheld = meter.counter
                self.counters["energy-mismatch"] += 1
                return [PaymentWithheld("energy-mismatch", meter.counter),
                        self._send(MsgType.REJECT, {0: "energy-mismatch", 1: None,
                                                    2: self.nonce})]
        if meter.final and self.final_meter_check is not None:
            try:
                self.final_meter_check(meter)
            except ChannelError as exc:
                if self.withheld == meter.counter:
                    return []
                self.withheld = meter.counter
                self.counters[exc.reason] += 1
                return [PaymentWithheld(exc.reason, meter.counter),
                        self._send(MsgType.REJECT, {0: exc.reason, 1: None, 2: self.nonce})]
        return self._propose(meter, now)

    def _propose(self, meter: MeterInfo, now: float) -> list[Action]:
        assert self.params is not None
        nonce = max(self.highest_signed, self.nonce) + 1
        state = ChannelState(self.chain_id, self.contract, self._domain.channel_id, nonce,
                             meter.t_ev, meter.t_cs, meter.import_wh, meter.final)
        try:
            self._check_progress(state)
        except ChannelError as exc:
            self.counters[exc.reason] += 1
            return [PaymentWithheld(exc.reason, meter.counter)]
        digest = state.digest()
        sig = self.settlement.sign_digest(digest)
        record = SignedRecord(state, sig, meter)
        self._digests[nonce] = digest
        if len(self._digests) > 4 * self.window + 8:
            del self._digests[min(self._digests)]
        self.signed[nonce] = record
        self.highest_signed = nonce
        self.paid_counter = meter.counter
        if meter.final:
            self.phase = Phase.CLOSING
        self._arm(now)
        out: list[Action] = []
        if nonce > self.nonce_reserved:
            self.nonce_reserved = nonce + NONCE_RESERVE - 1
            out.append(Persist(NonceReserveRecord(self.nonce_reserved)))
        # The proposal itself need not be synced: its nonce is covered by the reservation,
        # so a restart never signs another state with it ("persist the highest nonce you
        # signed before releasing a signature", DESIGN s5, kept one fsync per NONCE_RESERVE
        # updates instead of one per update). A proposal lost in a crash is only made again
        # under a fresh nonce for the same cumulative amounts (states are cumulative: paying
        # twice for one METER pays once). The final one is synced: the close depends on it.
        return out + [Persist(record, sync=meter.final), self._proposal_message(record)]

    def _proposal_message(self, record: SignedRecord) -> Send:
        kind = MsgType.CLOSE if record.state.final else MsgType.PAY
        return self._send(kind, {0: record.state.to_cbor_item(), 1: record.sig,
                                 2: record.meter.counter})

    def _retransmit(self, now: float) -> list[Action]:
        if self.phase is Phase.OPENING or self.phase is Phase.IDLE:
            return []
        pending = self.pending
        if pending is not None:
            return [self._proposal_message(pending)]
        if self.phase is Phase.CLOSING and self.close_wanted and self.cosigned and \
                not self.cosigned.state.final:
            return [self._send(MsgType.CLOSE, {0: None, 1: None, 2: None})]
        return []

    # ---- restart

    @classmethod
    def restore(cls, records: Iterable[Record], **kwargs: object) -> VehicleChannel:
        ch = cls(**kwargs)  # type: ignore[arg-type]
        ch.funding_ref = b""
        for record in records:
            if isinstance(record, OpenRecord):
                ch.params, ch.phase = record.params, Phase.OPENING
            elif isinstance(record, FundedRecord):
                ch.phase, ch.funding_ref = Phase.ACTIVE, record.reference
            elif isinstance(record, SignedRecord):
                ch.signed[record.state.nonce] = record
                ch.highest_signed = max(ch.highest_signed, record.state.nonce)
                ch.paid_counter = max(ch.paid_counter, record.meter.counter)
                if ch.meter_seen is None or record.meter.counter > ch.meter_seen.counter:
                    ch.meter_seen = record.meter
                if record.state.final:
                    ch.phase = Phase.CLOSING
            elif isinstance(record, NonceReserveRecord):
                ch.nonce_reserved = max(ch.nonce_reserved, record.nonce_hi)
            elif isinstance(record, CosignedRecord):
                if record.state.nonce > ch.nonce:
                    ch.cosigned = record
                    if record.state.final:
                        ch.phase = Phase.CLOSED
        ch.signed = {n: r for n, r in ch.signed.items() if n > ch.nonce}
        # Nonces up to the reservation may have been signed before the crash: skip them all.
        ch.highest_signed = max(ch.highest_signed, ch.nonce_reserved)
        return ch
