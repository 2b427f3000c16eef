"""The vehicle's side of the payment channel (sans-I/O): checks OPEN and METERs against
the signed tariff, its own clock and its own estimate, and proposes (signs first) every
state. Rules and the verbs' contract: agent/channel/protocol.py.

Vehicle policy (issue 14; constructor arguments with safe defaults, filled from config):

- ``min_dispute_window_s``: an OPEN with a shorter dispute window is refused (a 1-second
  window leaves no time to challenge a stale close).
- ``clock_tolerance_s``: a METER whose time is further than this from the vehicle's own
  clock is refused; the charge is bounded by the tariff over [previous METER time, this
  METER time] (the first: from the vehicle's clock at OPEN minus the tolerance), so a
  station cannot stamp a night-time METER with a peak-hour time.
- ``export_credit_window_wh``: with a V2G tariff, export is allowed (ExportResumed) only
  while the vehicle's own exported energy minus the export paid by the latest co-signed
  state stays below it, and only once the ledger shows the station's deposit
  (``require_funding_check``, on by default: ``funding_checked()``); ExportPaused
  otherwise. An OPEN whose station deposit cannot pay one such window is refused.
- ``tolerance_wh`` + ``tolerance_ppm``: how far the station's metered import may run ahead
  of the vehicle's own estimate (worst case for a 30 kWh session at the defaults:
  50 + 1 % x 30,000 = 350 Wh; docs/channel.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from agent.channel import messages as m
from agent.channel.messages import MsgType
from agent.channel.protocol import (
    Action,
    Channel,
    ExportPaused,
    ExportResumed,
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
    ClockRecord,
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
DEFAULT_MIN_DISPUTE_WINDOW_S = 3600
DEFAULT_CLOCK_TOLERANCE_S = 120
DEFAULT_EXPORT_CREDIT_WINDOW_WH = 500


class VehicleChannel(Channel):
    """The vehicle: checks OPEN and METERs, proposes (and signs first) every state."""

    role = Role.VEHICLE

    def __init__(self, identity: IdentitySigner, settlement: SettlementSigner, station: Party, *,
                 chain_id: int, contract: bytes, salt: bytes, max_price_per_kwh: int,
                 max_deposit_ev: int, tolerance_wh: int = 50, tolerance_ppm: int = 10_000,
                 window: int = 1,
                 min_dispute_window_s: int = DEFAULT_MIN_DISPUTE_WINDOW_S,
                 clock_tolerance_s: int = DEFAULT_CLOCK_TOLERANCE_S,
                 export_credit_window_wh: int = DEFAULT_EXPORT_CREDIT_WINDOW_WH,
                 require_funding_check: bool = True) -> None:
        super().__init__(identity, settlement, station, chain_id, contract, salt)
        self.max_price_per_kwh, self.max_deposit_ev = max_price_per_kwh, max_deposit_ev
        self.tolerance_wh, self.tolerance_ppm = tolerance_wh, tolerance_ppm
        if window < 1:
            raise ValueError("window must be at least 1")
        if min(min_dispute_window_s, clock_tolerance_s, export_credit_window_wh) < 0:
            raise ValueError("policy windows and tolerances must be >= 0")
        self.min_dispute_window_s = min_dispute_window_s
        self.clock_tolerance_s = clock_tolerance_s
        self.export_credit_window_wh = export_credit_window_wh
        self.funding_verified = not require_funding_check
        self.opened_wall_s: int | None = None   # our clock when we accepted OPEN
        self.exported_wh: int | None = None     # our own count of energy fed back
        self.paid_export_wh = 0                 # export paid by the latest co-signed state
        self.exporting = False
        self.window = window  # proposals in flight at most (1: stop-and-wait)
        self.estimate_wh: int | None = None
        # Our own energy count is configured ([channel.energy]): until it has a value, the
        # energy we know we received is 0 Wh, not "unknown, pay what the station says" (a
        # station that never switches on would be paid the whole deposit for one METER).
        self.counts_energy = False
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
        return [Persist(FundedRecord(reference)), self._send(MsgType.FUNDED, {0: reference}),
                *self._export_events()]

    def estimate(self, delivered_wh: int, now: float,
                 exported_wh: int | None = None) -> list[Action]:
        """The vehicle's own cumulative estimates of energy received and, with V2G, fed
        back (Wh since the start)."""
        self.estimate_wh = delivered_wh
        if exported_wh is not None:
            self.exported_wh = exported_wh
        return self._maybe_pay(now) + self._export_events()

    def funding_checked(self, now: float) -> list[Action]:
        """The ledger shows the channel as OPEN said, with the station's deposit in place
        (agent/settlement/funding.py): export may start."""
        self.funding_verified = True
        return self._export_events()

    @property
    def unpaid_export_wh(self) -> int:
        """Energy fed back that no co-signed state pays yet (our own count, else the
        station's METERs)."""
        exported = self.exported_wh
        if exported is None:
            exported = self.meter_seen.export_wh if self.meter_seen else 0
        return max(0, exported - self.paid_export_wh)

    @property
    def export_allowed(self) -> bool:
        p = self.params
        return (p is not None and p.tariff.export_price_per_kwh > 0
                and self.phase is Phase.ACTIVE and self.funding_verified
                and self.unpaid_export_wh < self.export_credit_window_wh)

    def _export_events(self) -> list[Action]:
        allowed = self.export_allowed
        if allowed == self.exporting:
            return []
        self.exporting = allowed
        unpaid = self.unpaid_export_wh
        return [ExportResumed(unpaid) if allowed else ExportPaused(unpaid)]

    def close(self, now: float) -> list[Action]:
        """Ask the station to stop and send its final METER."""
        if self.phase is not Phase.ACTIVE:
            raise LocalProtocolError(f"close() in phase {self.phase.value}", reason="not-active")
        self.phase = Phase.CLOSING
        self.close_wanted = True
        self._arm(now)
        return [self._send(MsgType.CLOSE, {0: None, 1: None, 2: None}), *self._export_events()]

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
        if params.dispute_window_s < self.min_dispute_window_s:
            raise ChannelError(f"dispute window {params.dispute_window_s} s below our "
                               f"minimum {self.min_dispute_window_s} s",
                               reason="dispute-window-too-short")
        export_price = params.tariff.export_price_per_kwh
        if export_price and params.deposit_cs * 1000 < self.export_credit_window_wh * export_price:
            raise ChannelError("the station's deposit cannot pay one export credit window",
                               reason="station-deposit-too-small")
        self.params = params
        self.phase = Phase.OPENING
        out: list[Action] = [Persist(OpenRecord(params))]
        if self.wall_s is not None:
            self.opened_wall_s = int(self.wall_s)
            out.append(Persist(ClockRecord(self.opened_wall_s)))
        return out + [Opened(params)]

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
        return [MeterAccepted(info), *self._maybe_pay(now), *self._export_events()]

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
        since = self._priced_since(seen, info)
        if info.ts_s < since:
            raise ChannelError("METER time went backwards", reason="meter-time-backwards")
        # Only an upper bound: it is what protects the vehicle. No lower bound, so a station
        # that re-meters after losing an unsynced METER in a crash (station._send_meter) and
        # prices that energy at a later, lower time-of-use rate is not refused.
        _, high = tariff.price_range(since, info.ts_s)
        d_imp = info.import_wh - base_imp
        d_charge = info.charge_milli - base_charge
        d_credit = info.credit_milli - base_credit
        if not d_charge <= d_imp * high or (
                d_credit != (info.export_wh - base_exp) * tariff.export_price_per_kwh):
            raise ChannelError("METER charge does not follow the signed tariff",
                               reason="meter-charge-mismatch")

    def _priced_since(self, seen: MeterInfo | None, info: MeterInfo) -> int:
        """The earliest time the energy of ``info`` can have been delivered, after checking
        the METER's time against our own clock (rule 6). The previous METER's time was
        checked the same way when it came; before the first, our clock at OPEN."""
        assert self.params is not None
        wall, tol = self.wall_s, self.clock_tolerance_s
        if wall is not None:
            if abs(info.ts_s - wall) > tol:
                raise ChannelError(f"METER time {info.ts_s} is {info.ts_s - wall:+.0f} s from "
                                   f"our clock (tolerance {tol} s)",
                                   reason="meter-clock-mismatch")
        elif self.params.tariff.tou:
            raise ChannelError("no clock to check a time-of-use METER by",
                               reason="meter-clock-unknown")
        if seen is not None:
            return seen.ts_s
        if self.opened_wall_s is not None:
            return self.opened_wall_s - tol
        return info.ts_s - 86_400  # no clock at OPEN: any time of the day (flat tariffs)

    def _on_ack(self, body: dict[int, object], now: float) -> list[Action]:
        return self._on_countersigned(body, now, final=False)

    def _on_closed(self, body: dict[int, object], now: float) -> list[Action]:
        return self._on_countersigned(body, now, final=True)

    def _on_countersigned(self, body: dict[int, object], now: float, *,
                          final: bool) -> list[Action]:
        nonce: int = m.field(body, 0, int)
        sig_cs: bytes = m.field(body, 1, bytes)
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
        self.paid_export_wh = max(self.paid_export_wh, proposal.meter.export_wh)
        self._deadline = (now + self._rto) if self._live() else None
        return out + self._maybe_pay(now) + self._export_events()

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
        estimate = self.estimate_wh
        if estimate is None and self.counts_energy:
            estimate = 0
        if estimate is not None:
            allowed = estimate + self.tolerance_wh + \
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
            elif isinstance(record, ClockRecord):
                ch.opened_wall_s = record.wall_s
            elif isinstance(record, CosignedRecord):
                if record.state.nonce > ch.nonce:
                    ch.cosigned = record
                    if record.state.final:
                        ch.phase = Phase.CLOSED
        paid = ch.signed.get(ch.nonce)
        if paid is not None:  # our own proposal, co-signed: it says what export it paid
            ch.paid_export_wh = paid.meter.export_wh
        ch.signed = {n: r for n, r in ch.signed.items() if n > ch.nonce}
        # Nonces up to the reservation may have been signed before the crash: skip them all.
        ch.highest_signed = max(ch.highest_signed, ch.nonce_reserved)
        return ch
