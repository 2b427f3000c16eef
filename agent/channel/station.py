"""The station's side of the payment channel (sans-I/O): opens the channel, meters, and
countersigns the vehicle's proposals. Rules and the verbs' contract: agent/channel/protocol.py.

Funding check (issue 14, on by default: ``require_funding_check``): a vehicle may say FUNDED
without a deposit, and every state it then signs is worthless on the ledger. Until the
driver reports ``funding_checked()`` (agent/settlement/funding.py read the channel's record),
the station delivers at most ``credit_window_wh`` in total, not per payment.
"""

from __future__ import annotations

from collections.abc import Iterable

from agent.channel import messages as m
from agent.channel.messages import MsgType, Tariff
from agent.channel.protocol import (
    Action,
    Channel,
    CloseRequested,
    DeliveryPaused,
    DeliveryResumed,
    Funded,
    IdentitySigner,
    Persist,
    Phase,
    Rejected,
    Role,
    SettlementSigner,
    _check_signer,
)
from agent.channel.records import (
    KEEP_METERS,
    CosignedRecord,
    FundedRecord,
    MeterInfo,
    MeterRecord,
    MeterReserveRecord,
    OpenParams,
    OpenRecord,
    Party,
    Record,
)
from agent.channel.state import ChannelState
from agent.errors import ChannelError, LocalProtocolError

# METER counters reserved per synced record (a restart skips the unused rest).
METER_RESERVE = 64


class StationChannel(Channel):
    """The charging station: opens the channel, meters, countersigns."""

    role = Role.STATION

    def __init__(self, identity: IdentitySigner, settlement: SettlementSigner, vehicle: Party, *,
                 chain_id: int, contract: bytes, salt: bytes, tariff: Tariff, tariff_sig: bytes,
                 deposit_ev: int, deposit_cs: int, dispute_window_s: int,
                 credit_window_wh: int, pay_step_wh: int,
                 require_funding_check: bool = True) -> None:
        super().__init__(identity, settlement, vehicle, chain_id, contract, salt)
        self.funding_verified = not require_funding_check
        ev, cs = self._parties()
        self.params = OpenParams(chain_id, contract, salt, ev, cs, deposit_ev, deposit_cs,
                                 dispute_window_s, tariff, tariff_sig, credit_window_wh,
                                 pay_step_wh)
        self.tariff_id = tariff.tariff_id()
        self.meters: dict[int, MeterInfo] = {}
        self.last_meter: MeterInfo | None = None
        self.base: tuple[int, int] | None = None
        self.import_wh = self.export_wh = self.charge_milli = self.credit_milli = 0
        self.ts_s = 0
        self.delivering = False
        self.funding_ref = b""
        self.reserved = 0        # METER counters up to this may have been signed (persisted)
        self.counter_floor = 0   # after a restart: the next counter is above this
        # True: a vehicle's close request is reported (CloseRequested) and the driver calls
        # close() itself, with the Eichrecht meter's record of the session (DESIGN s5b).
        self.defer_close = False

    @property
    def paid_wh(self) -> int:
        return self.cosigned.state.wh if self.cosigned else 0

    @property
    def unpaid_wh(self) -> int:
        return self.import_wh - self.paid_wh

    @property
    def headroom_wh(self) -> int:
        """Energy the charger may still deliver before the credit window is exhausted."""
        if self.phase is not Phase.ACTIVE:
            return 0
        assert self.params is not None
        window = self.params.credit_window_wh
        if not self.funding_verified:  # nothing paid counts before the ledger says funded
            return max(0, window - self.import_wh)
        return max(0, window - self.unpaid_wh)

    # ---- verbs

    def open(self, now: float) -> list[Action]:
        if self.phase is not Phase.IDLE:
            raise LocalProtocolError("open() twice", reason="already-open")
        assert self.params is not None
        self.phase = Phase.OPENING
        self._arm(now)
        return [Persist(OpenRecord(self.params)), self._send(MsgType.OPEN, self.params.to_body())]

    def meter(self, import_wh: int, export_wh: int, ts_s: int, now: float) -> list[Action]:
        """A cumulative meter reading (raw register values, Wh). Accounts the energy since
        the previous reading at the tariff in force at ``ts_s`` and sends a METER every
        ``pay_step_wh``."""
        if self.phase in (Phase.CLOSING, Phase.CLOSED):
            self.counters["meter-ignored"] += 1
            return []
        if self.base is None:
            self.base = (import_wh, export_wh)
        imp, exp = import_wh - self.base[0], export_wh - self.base[1]
        if imp < self.import_wh or exp < self.export_wh or ts_s < self.ts_s:
            self.counters["meter-decreased"] += 1
            return [Rejected("meter-decreased", None, "local meter went backwards")]
        assert self.params is not None
        tariff = self.params.tariff
        self.charge_milli += (imp - self.import_wh) * tariff.price_at(ts_s)
        self.credit_milli += (exp - self.export_wh) * tariff.export_price_per_kwh
        self.import_wh, self.export_wh, self.ts_s = imp, exp, ts_s
        out: list[Action] = []
        if self.phase is Phase.ACTIVE:
            last = self.last_meter
            step = self.params.pay_step_wh
            if (last is None and (imp or exp)) or (last is not None and (
                    imp - last.import_wh >= step or exp - last.export_wh >= step)):
                out += self._send_meter(now, final=False)
        return out + self._window_events()

    def close(self, now: float, ocmf: str = "") -> list[Action]:
        """Stop delivery and send the final METER (with ``ocmf``, the record the station's
        Eichrecht meter signed for the session); the vehicle answers with the final state."""
        if self.phase is not Phase.ACTIVE:
            raise LocalProtocolError(f"close() in phase {self.phase.value}", reason="not-active")
        out = self._send_meter(now, final=True, ocmf=ocmf)
        self.phase = Phase.CLOSING
        return out + self._window_events()

    def funding_checked(self, now: float) -> list[Action]:
        """The ledger shows the channel open with the vehicle's deposit: deliver on credit."""
        self.funding_verified = True
        return self._window_events()

    # ---- handlers

    def _on_funded(self, body: dict[int, object], now: float) -> list[Action]:
        self.funding_ref = m.field(body, 0, bytes)
        self.phase = Phase.ACTIVE
        self._deadline = None
        out: list[Action] = [Persist(FundedRecord(self.funding_ref)), Funded(self.funding_ref)]
        return out + self._window_events()

    def _on_pay(self, body: dict[int, object], now: float) -> list[Action]:
        state, sig_ev, digest = self._proposal(body, final=False)
        if state is None:
            return self._duplicate_answer(MsgType.ACK)
        sig_cs = self.settlement.sign_digest(digest)
        out = self._adopt(CosignedRecord(state, sig_ev, sig_cs))
        out.append(self._send(MsgType.ACK, {0: state.nonce, 1: sig_cs}))
        if not self._meter_unpaid():
            self._deadline = None
        return out + self._window_events()

    def _on_close(self, body: dict[int, object], now: float) -> list[Action]:
        if body.get(0) is None:
            if self.phase is Phase.ACTIVE:
                if self.defer_close:   # the driver closes, with the meter's signed record
                    return [CloseRequested()]
                return [CloseRequested(), *self.close(now)]
            if self.phase is Phase.CLOSED:
                return self._duplicate_answer(MsgType.CLOSED)
            self.duplicates += 1
            return self._retransmit(now)
        state, sig_ev, digest = self._proposal(body, final=True)
        if state is None:
            return self._duplicate_answer(MsgType.CLOSED)
        sig_cs = self.settlement.sign_digest(digest)
        out = self._adopt(CosignedRecord(state, sig_ev, sig_cs))
        out.append(self._send(MsgType.CLOSED, {0: state.nonce, 1: sig_cs}))
        return out

    def _proposal(self, body: dict[int, object], *, final: bool
                  ) -> tuple[ChannelState | None, bytes, bytes]:
        """Validate a PAY / final CLOSE. (None, ...) for an exact duplicate of the latest."""
        state = ChannelState.from_cbor_item(body.get(0))
        sig_ev: bytes = m.field(body, 1, bytes)
        counter: int = m.field(body, 2, int)
        self._check_state_domain(state)
        if state.nonce <= self.nonce:
            if self.cosigned is not None and state == self.cosigned.state:
                return None, sig_ev, b""
            raise ChannelError("state older than the latest co-signed one",
                               reason="replayed-state", nonce=state.nonce)
        if self.cosigned is not None and self.cosigned.state.final:
            # Nothing follows a final state: a later one, even with the same amounts, would
            # be what a restarted station settles from, and a non-final one fails coopClose.
            raise ChannelError("the final state is co-signed: nothing follows it",
                               reason="after-final", nonce=state.nonce)
        if state.final != final:
            raise ChannelError("final flag does not match the message",
                               reason="not-final" if final else "unexpected-final",
                               nonce=state.nonce)
        meter = self.meters.get(counter)
        if meter is None or (final and not meter.final):
            raise ChannelError(f"no signed METER {counter} to pay", reason="unknown-meter",
                               nonce=state.nonce)
        if (state.t_ev, state.t_cs, state.wh) != (meter.t_ev, meter.t_cs, meter.import_wh):
            raise ChannelError("amounts differ from the METER", reason="amount-mismatch",
                               nonce=state.nonce)
        self._check_progress(state)
        digest = state.digest()
        _check_signer(digest, sig_ev, self.peer.address)
        return state, sig_ev, digest

    def _duplicate_answer(self, msg_type: MsgType) -> list[Action]:
        self.duplicates += 1
        assert self.cosigned is not None
        return [self._send(msg_type, {0: self.cosigned.state.nonce, 1: self.cosigned.sig_cs})]

    # ---- internals

    def _send_meter(self, now: float, *, final: bool, ocmf: str = "") -> list[Action]:
        """Sign the next METER. Its counter is never reused: counters are reserved
        METER_RESERVE at a time by a synced record, so the METER record itself need not be
        fsync'd before it leaves (one fsync per update less on the station). A METER lost
        in a crash only makes a PAY that refers to it fail with ``unknown-meter``; the
        energy is metered again from the durable record and the meter's own register.
        The final METER is synced: the close depends on it."""
        counter = max(self.last_meter.counter if self.last_meter else 0, self.counter_floor) + 1
        info = MeterInfo(counter, self.import_wh, self.export_wh, self.ts_s, self.charge_milli,
                         self.credit_milli, self.tariff_id, final, ocmf)
        self._remember(info)
        assert self.base is not None or not (self.import_wh or self.export_wh)
        base = self.base or (0, 0)
        self._arm(now)
        out: list[Action] = []
        if counter > self.reserved:
            self.reserved = counter + METER_RESERVE - 1
            out.append(Persist(MeterReserveRecord(self.reserved, base[0], base[1])))
        return out + [Persist(MeterRecord(info, base[0], base[1]), sync=final),
                      self._send(MsgType.METER, info.to_body())]

    def _remember(self, info: MeterInfo) -> None:
        self.meters[info.counter] = info
        self.last_meter = info
        if len(self.meters) > KEEP_METERS:
            del self.meters[min(self.meters)]

    def _window_events(self) -> list[Action]:
        allowed = self.headroom_wh > 0
        if allowed == self.delivering:
            return []
        self.delivering = allowed
        return [DeliveryResumed(self.unpaid_wh) if allowed else DeliveryPaused(self.unpaid_wh)]

    def _retransmit(self, now: float) -> list[Action]:
        assert self.params is not None
        if self.phase is Phase.OPENING:
            return [self._send(MsgType.OPEN, self.params.to_body())]
        if self._meter_unpaid():
            assert self.last_meter is not None
            return [self._send(MsgType.METER, self.last_meter.to_body())]
        return []

    def _meter_unpaid(self) -> bool:
        """Is the last METER still waiting for its PAY (or the final one for its CLOSE)?"""
        last = self.last_meter
        return self.phase in (Phase.ACTIVE, Phase.CLOSING) and last is not None and (
            last.final or last.import_wh > self.paid_wh)

    # ---- restart

    @classmethod
    def restore(cls, records: Iterable[Record], **kwargs: object) -> StationChannel:
        """Rebuild from the store; ``kwargs`` are the constructor's (same config)."""
        ch = cls(**kwargs)  # type: ignore[arg-type]
        for record in records:
            if isinstance(record, OpenRecord):
                ch.params = record.params
                ch.phase = Phase.OPENING
            elif isinstance(record, FundedRecord):
                ch.phase, ch.funding_ref = Phase.ACTIVE, record.reference
            elif isinstance(record, MeterRecord):
                info = record.meter
                ch._remember(info)
                ch.base = (record.base_import, record.base_export)
                ch.import_wh, ch.export_wh, ch.ts_s = info.import_wh, info.export_wh, info.ts_s
                ch.charge_milli, ch.credit_milli = info.charge_milli, info.credit_milli
                if info.final:
                    ch.phase = Phase.CLOSING
            elif isinstance(record, MeterReserveRecord):
                ch.reserved = max(ch.reserved, record.counter_hi)
                ch.base = (record.base_import, record.base_export)
            elif isinstance(record, CosignedRecord):
                if record.state.nonce > ch.nonce:
                    ch.cosigned = record
                    if record.state.final:
                        ch.phase = Phase.CLOSED
        ch.counter_floor = ch.reserved
        ch.delivering = ch.headroom_wh > 0
        return ch
