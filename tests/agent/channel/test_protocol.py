"""The sans-I/O channel core: bytes in, actions out, time passed explicitly."""

from __future__ import annotations

import pytest

from agent import dcbor
from agent.channel import messages as m
from agent.channel.messages import Domain, MsgType, Tariff, sign_tariff
from agent.channel.protocol import (
    REASONS,
    TRANSITIONS,
    Closed,
    DeliveryPaused,
    DeliveryResumed,
    Paid,
    PaymentWithheld,
    Persist,
    Phase,
    Rejected,
    Role,
    Send,
)
from agent.channel.records import (
    MeterInfo,
    MeterRecord,
    MeterReserveRecord,
    NonceReserveRecord,
    SignedRecord,
)
from agent.channel.state import SECP256K1_N, ChannelState, check_state_signature
from agent.channel.station import METER_RESERVE
from agent.channel.vehicle import NONCE_RESERVE
from agent.errors import LocalProtocolError
from agent.keys import IdentityKey, SettlementKey
from tests.agent.channel.harness import CHAIN_ID, CONTRACT, Link, Setup


def events(link: Link, side: str, kind: type) -> list:
    return [e for who, e in link.events if who == side and isinstance(e, kind)]


def test_charge_pays_tariff_times_energy_exactly() -> None:
    link = Link(Setup(tariff=Tariff(price_per_kwh=333, export_price_per_kwh=0)))
    link.open_and_fund()
    link.charge(1000, wh=7)  # 7 kWh in 7 Wh steps: a METER every 2 readings (pay step 10)
    link.run("ev", link.ev.close(link.now))
    closed = events(link, "cs", Closed)
    assert len(closed) == 1 and events(link, "ev", Closed)[0] == closed[0]
    state = closed[0].state
    assert state.final and state.wh == 7000
    assert state.t_ev == 7000 * 333 // 1000 == 2331
    # Both settlement signatures are over the EIP-712 digest and recover to the right keys.
    check_state_signature(state, closed[0].sig_ev, link.setup.ev_key.address)
    check_state_signature(state, closed[0].sig_cs, link.setup.cs_key.address)
    assert link.cs.phase is link.ev.phase is Phase.CLOSED
    assert not link.cs.counters and not link.ev.counters


def test_rounding_floors_and_carries_the_remainder() -> None:
    # 1 Wh at 999 per kWh is 0.999 units: nothing is due until the sum reaches a unit.
    link = Link(Setup(tariff=Tariff(999), pay_step_wh=1))
    link.open_and_fund()
    link.charge(1, wh=1)
    assert link.cs.last_meter.charge_milli == 999 and link.cs.last_meter.t_ev == 0
    link.charge(1, wh=1)
    assert link.cs.cosigned.state.t_ev == 1998 // 1000 == 1
    link.charge(998, wh=1)
    assert link.cs.cosigned.state.t_ev == 1000 * 999 // 1000 == 999


def test_v2g_station_pays_vehicle_for_export() -> None:
    link = Link(Setup(tariff=Tariff(300, export_price_per_kwh=150)))
    link.open_and_fund()
    link.charge(10)
    base_imp, base_exp = link.cs.base
    for i in range(1, 21):  # 200 Wh fed back
        link.run("cs", link.cs.meter(base_imp + 100, base_exp + 10 * i, 1_700_000_100,
                                     link.now))
    link.run("cs", link.cs.close(link.now))
    state = events(link, "ev", Closed)[0].state
    assert (state.t_ev, state.t_cs, state.wh) == (30, 30, 100)
    assert link.setup.deposit_ev - state.t_ev + state.t_cs == link.setup.deposit_ev


def test_time_of_use_prices_each_reading_at_its_time() -> None:
    tariff = Tariff(100, tou=((0, 100), (600, 400)))  # 10:00 UTC onwards: 400 per kWh
    link = Link(Setup(tariff=tariff))
    link.open_and_fund()
    day = (1_700_000_000 // 86_400 + 1) * 86_400  # the next midnight UTC
    link.charge(10, ts_s=day + 9 * 3600)     # 100 Wh at 100
    link.charge(10, ts_s=day + 11 * 3600)    # 100 Wh at 400
    assert link.cs.cosigned.state.t_ev == (100 * 100 + 100 * 400) // 1000
    assert tariff.price_range(day + 9 * 3600, day + 11 * 3600) == (100, 400)
    assert tariff.price_at(day + 23 * 3600) == 400 and tariff.price_at(day) == 100


def test_credit_window_pauses_and_resumes_delivery() -> None:
    link = Link(Setup(credit_window_wh=50))
    link.open_and_fund()
    assert events(link, "cs", DeliveryResumed)
    # The vehicle goes silent: drop everything it sends from now on.
    link.ev.receive = lambda data, now, wall=None: []  # type: ignore[method-assign]
    link.charge(5)
    assert link.cs.headroom_wh == 0 and link.cs.unpaid_wh == 50
    assert len(events(link, "cs", DeliveryPaused)) == 1
    assert link.cs.delivering is False


def test_vehicle_withholds_payment_beyond_its_estimate() -> None:
    link = Link(Setup(tolerance_wh=20))
    link.open_and_fund()
    link.run("ev", link.ev.estimate(0, link.now))
    link.charge(2)      # 20 Wh metered, estimate 0 + 20 tolerance: paid
    assert link.cs.cosigned.state.wh == 20
    link.charge(2)      # 40 Wh metered: beyond, withheld and the station is told
    assert link.cs.cosigned.state.wh == 20
    assert events(link, "ev", PaymentWithheld)[0].reason == "energy-mismatch"
    assert link.cs.counters["peer:energy-mismatch"] == 2  # METERs at 30 and 40 Wh
    link.run("ev", link.ev.estimate(35, link.now))  # the car's view catches up
    assert link.cs.cosigned.state.wh == 40


def test_duplicates_are_answered_idempotently() -> None:
    link = Link(Setup())
    link.open_and_fund()
    link.charge(3)
    pay = link.of_type("ev", MsgType.PAY)[-1]
    acks_before = len(link.of_type("cs", MsgType.ACK))
    link.deliver("cs", pay)              # same PAY again (QoS 1 redelivery)
    assert len(link.of_type("cs", MsgType.ACK)) == acks_before + 1
    assert link.cs.nonce == 3 and link.cs.duplicates == 1
    meter = link.of_type("cs", MsgType.METER)[-1]
    link.deliver("ev", meter)
    assert link.ev.nonce == 3 and link.ev.duplicates >= 1
    assert not link.cs.counters and not link.ev.counters


def test_lost_ack_is_recovered_by_the_retransmit_timer() -> None:
    link = Link(Setup())
    link.open_and_fund()
    real = link.ev.receive
    link.ev.receive = lambda data, now, wall=None: (  # type: ignore[method-assign]
        [] if data[1] == MsgType.ACK else real(data, now))
    link.charge(1)
    assert link.cs.nonce == 1 and link.ev.nonce == 0
    link.ev.receive = real  # type: ignore[method-assign]
    assert link.ev.get_timer() == pytest.approx(0.2)
    assert link.ev.handle_timer(0.1) == []           # not yet
    link.now = 0.25
    link.run("ev", link.ev.handle_timer(link.now))   # resend PAY, station re-ACKs
    assert link.ev.nonce == 1 and link.ev.get_timer() is None


def test_every_table_entry_names_a_handler_and_missing_ones_reject() -> None:
    link = Link(Setup())
    for (role, _phase, _msg), handler in TRANSITIONS.items():
        party = link.cs if role is Role.STATION else link.ev
        assert callable(getattr(party, handler))
    link.open_and_fund()
    # A station never receives METER: not in the table -> "unexpected-message", no reply.
    meter = m.encode(link.cs.domain, MsgType.METER,
                     MeterInfo(1, 0, 0, 0, 0, 0, bytes(16)).to_body(), link.setup.ev_id)
    actions = link.cs.receive(meter, 0.0)
    assert [type(a) for a in actions] == [Rejected]
    assert actions[0].reason == "unexpected-message" and actions[0].reason in REASONS


def test_local_misuse_raises_local_protocol_error() -> None:
    link = Link(Setup())
    with pytest.raises(LocalProtocolError):
        link.cs.close(0.0)
    with pytest.raises(LocalProtocolError):
        link.ev.funded(b"", 0.0)
    link.run("cs", link.cs.open(0.0))
    with pytest.raises(LocalProtocolError):
        link.cs.open(0.0)


def test_persist_precedes_every_signature_that_leaves() -> None:
    link = Link(Setup())
    link.open_and_fund()
    actions = link.cs.meter(1_000_010, 500_000, 1_700_000_000, 0.0)
    kinds = [(type(a), getattr(a, "sync", None)) for a in actions if isinstance(a, Persist | Send)]
    # The first METER reserves counters (synced), then its own record may ride along.
    assert kinds == [(Persist, True), (Persist, False), (Send, None)]
    assert isinstance(actions[0].record, MeterReserveRecord)
    assert actions[0].record.counter_hi == METER_RESERVE
    pay_actions = link.ev.receive([a for a in actions if isinstance(a, Send)][0].data, 0.0)
    kinds = [(type(a), getattr(a, "sync", None)) for a in pay_actions
             if isinstance(a, Persist | Send)]
    # Likewise the vehicle's first PAY reserves nonces (synced) before its signature leaves.
    assert kinds == [(Persist, True), (Persist, False), (Send, None)]
    reserve = next(a.record for a in pay_actions if isinstance(a, Persist))
    assert isinstance(reserve, NonceReserveRecord) and reserve.nonce_hi == NONCE_RESERVE
    ack_actions = link.cs.receive([a for a in pay_actions if isinstance(a, Send)][0].data, 0.0)
    kinds = [(type(a), getattr(a, "sync", None)) for a in ack_actions
             if isinstance(a, Persist | Send)]
    assert kinds == [(Persist, True), (Send, None)]  # the station's countersignature: synced
    assert any(isinstance(a, Paid) for a in ack_actions)
    # The next PAY is within the reservation: no fsync before it leaves.
    link.run("ev", link.ev.receive([a for a in ack_actions if isinstance(a, Send)][0].data, 0.0))
    actions = link.cs.meter(1_000_020, 500_000, 1_700_000_001, 0.0)
    pay_actions = link.ev.receive([a for a in actions if isinstance(a, Send)][0].data, 0.0)
    assert [(type(a), getattr(a, "sync", None)) for a in pay_actions
            if isinstance(a, Persist | Send)] == [(Persist, False), (Send, None)]


def test_a_restarted_vehicle_skips_every_reserved_nonce() -> None:
    """A crash loses the unsynced proposals; the restarted vehicle must not sign another
    state with any nonce it may have used, so it starts above the whole reservation."""
    link = Link(Setup())
    link.open_and_fund()
    link.charge(3)
    durable = [r for r in link.ev_store if not isinstance(r, SignedRecord)]
    vehicle = link.setup.vehicle(durable)
    assert vehicle.highest_signed == NONCE_RESERVE
    actions = link.cs.meter(1_000_100, 500_000, 1_700_000_100, 0.0)
    pay = vehicle.receive([a for a in actions if isinstance(a, Send)][0].data, 0.0)
    signed = [a.record for a in pay if isinstance(a, Persist) and isinstance(a.record, SignedRecord)]
    assert signed[0].state.nonce == NONCE_RESERVE + 1


# ------------------------------------------------------------------------ adversarial


class Adversary:
    """A link with some history, and tools to forge what a hostile vehicle would send."""

    def __init__(self) -> None:
        self.link = Link(Setup())
        self.link.open_and_fund()
        self.link.charge(3)
        self.ev = self.link.setup.ev_id
        self.pay = m.decode(self.link.of_type("ev", MsgType.PAY)[-1])

    def state(self, **changes: object) -> ChannelState:
        base = ChannelState.from_cbor_item(self.pay.body[0])
        fields = {f: getattr(base, f) for f in ("chain_id", "contract", "channel_id",
                                                 "nonce", "t_ev", "t_cs", "wh", "final")}
        fields["nonce"] = self.link.cs.nonce + 1
        fields.update(changes)
        return ChannelState(**fields)  # type: ignore[arg-type]

    def pay_for(self, state: ChannelState, *, sig: bytes | None = None,
                identity: IdentityKey | None = None, as_type: MsgType = MsgType.PAY,
                domain: Domain | None = None) -> bytes:
        sig = sig if sig is not None else self.link.setup.ev_key.sign_digest(state.digest())
        body = {0: state.to_cbor_item(), 1: sig, 2: self.link.cs.last_meter.counter}
        return m.encode(domain or self.link.cs.domain, as_type, body, identity or self.ev)

    def station_rejects(self, data: bytes, reason: str) -> None:
        cs = self.link.cs
        before = (cs.nonce, cs.counters[reason])
        actions = cs.receive(data, 0.0)
        rejected = [a for a in actions if isinstance(a, Rejected)]
        assert [r.reason for r in rejected] == [reason], rejected
        assert cs.nonce == before[0], "a rejected message changed the co-signed state"
        assert cs.counters[reason] == before[1] + 1
        assert not any(isinstance(a, Persist) for a in actions)
        assert reason in REASONS


def test_rejects_replayed_old_state() -> None:
    adv = Adversary()
    first_pay = adv.link.of_type("ev", MsgType.PAY)[0]
    adv.station_rejects(first_pay, "replayed-state")


def test_rejects_state_for_other_channel_contract_chain() -> None:
    adv = Adversary()
    adv.station_rejects(adv.pay_for(adv.state(channel_id=bytes(32))), "wrong-channel")
    adv.station_rejects(adv.pay_for(adv.state(contract=bytes(20))), "wrong-contract")
    adv.station_rejects(adv.pay_for(adv.state(chain_id=1)), "wrong-chain")
    # The whole message addressed to another channel (transport level).
    other = Domain(CHAIN_ID, CONTRACT, b"\x01" * 32)
    adv.station_rejects(adv.pay_for(adv.state(), domain=other), "wrong-channel")


def test_rejects_signature_over_another_message_type() -> None:
    adv = Adversary()
    forged = m.decode(adv.pay_for(adv.state(), as_type=MsgType.ACK))
    as_pay = dcbor.dumps([int(MsgType.PAY), forged.channel_id, forged.kid, forged.body,
                          forged.sig])
    adv.station_rejects(as_pay, "signature-for-other-type")


def test_rejects_non_deterministic_cbor() -> None:
    adv = Adversary()
    good = adv.pay_for(adv.state())
    assert good[0] == 0x85 and good[1] == MsgType.PAY
    long_head = b"\x85\x18" + bytes([MsgType.PAY]) + good[2:]  # type as a 2-byte head
    adv.station_rejects(long_head, "non-deterministic-cbor")
    adv.station_rejects(good + b"\x00", "malformed-cbor")


def test_rejects_malleated_high_s_signature() -> None:
    adv = Adversary()
    state = adv.state()
    sig = adv.link.setup.ev_key.sign_digest(state.digest())
    s = int.from_bytes(sig[32:64], "big")
    high = sig[:32] + (SECP256K1_N - s).to_bytes(32, "big") + bytes([55 - sig[64]])
    adv.station_rejects(adv.pay_for(state, sig=high), "malleated-signature")
    # The unmalleated original of the same state is then accepted.
    assert adv.link.deliver("cs", adv.pay_for(state, sig=sig))
    assert adv.link.cs.nonce == state.nonce


def test_rejects_unknown_keys() -> None:
    adv = Adversary()
    adv.station_rejects(adv.pay_for(adv.state(), identity=IdentityKey.generate()),
                        "unknown-key")
    stranger = SettlementKey.generate().sign_digest(adv.state().digest())
    adv.station_rejects(adv.pay_for(adv.state(), sig=stranger), "wrong-signer")


def test_rejects_amounts_that_do_not_match_the_meter() -> None:
    adv = Adversary()
    state = adv.state()
    adv.station_rejects(adv.pay_for(adv.state(t_ev=state.t_ev + 1)), "amount-mismatch")
    adv.station_rejects(adv.pay_for(adv.state(final=True)), "unexpected-final")


def test_vehicle_rejects_tariff_changed_mid_session() -> None:
    adv = Adversary()
    link = adv.link
    cs = link.setup.cs_id
    # A METER under another tariff id, properly signed by the station.
    info = link.cs.last_meter
    forged = MeterInfo(info.counter + 1, info.import_wh + 10, 0, info.ts_s,
                       info.charge_milli + 10 * 999, 0, Tariff(999).tariff_id())
    actions = link.ev.receive(m.encode(link.ev.domain, MsgType.METER, forged.to_body(), cs),
                              0.0)
    assert [a.reason for a in actions if isinstance(a, Rejected)] == ["tariff-changed"]
    assert any(isinstance(a, Send) for a in actions)  # REJECT goes back to the station
    # An OPEN re-sent with a new tariff.
    params = link.cs.params
    new = Tariff(999)
    body = params.to_body() | {10: new.to_cbor_item(), 11: sign_tariff(new, cs)}
    actions = link.ev.receive(m.encode(link.ev.domain, MsgType.OPEN, body, cs), 0.0)
    assert [a.reason for a in actions if isinstance(a, Rejected)] == ["tariff-changed"]
    assert link.ev.counters["tariff-changed"] == 2


def test_vehicle_rejects_meter_overcharge_and_equivocation() -> None:
    adv = Adversary()
    link, cs = adv.link, adv.link.setup.cs_id
    info = link.cs.last_meter
    over = MeterInfo(info.counter + 1, info.import_wh + 10, 0, info.ts_s,
                     info.charge_milli + 10 * 301, 0, info.tariff_id)
    actions = link.ev.receive(m.encode(link.ev.domain, MsgType.METER, over.to_body(), cs), 0.0)
    assert [a.reason for a in actions if isinstance(a, Rejected)] == ["meter-charge-mismatch"]
    twin = MeterInfo(info.counter, info.import_wh, 0, info.ts_s + 1, info.charge_milli, 0,
                     info.tariff_id)
    actions = link.ev.receive(m.encode(link.ev.domain, MsgType.METER, twin.to_body(), cs), 0.0)
    assert [a.reason for a in actions if isinstance(a, Rejected)] == ["meter-equivocation"]


def test_random_bytes_only_raise_our_errors_and_are_counted() -> None:
    import random

    rng = random.Random(6)
    link = Link(Setup())
    link.open_and_fund()
    valid = link.of_type("ev", MsgType.FUNDED)[0]
    for _ in range(2000):
        data = bytearray(valid)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        actions = link.cs.receive(bytes(data), 0.0)
        assert all(isinstance(a, Rejected) for a in actions) or bytes(data) == valid
    assert sum(link.cs.counters.values()) > 1900
    assert set(link.cs.counters) <= set(REASONS)


def test_docs_list_every_transition_and_reason() -> None:
    from pathlib import Path

    from agent.channel.protocol import TRANSITION_SPEC

    text = (Path(__file__).resolve().parents[3] / "docs" / "channel.md").read_text()
    for role, msg, phases, handler in TRANSITION_SPEC:
        row = f"| {role.value} | {msg.name} | {', '.join(p.value for p in phases)} | `{handler}` |"
        assert row in text, row
    for reason, meaning in REASONS.items():
        assert f"| `{reason}` | {meaning} |" in text, reason


def test_meter_counters_are_never_reused_after_losing_unsynced_meters() -> None:
    link = Link(Setup())
    link.open_and_fund()
    link.charge(5)
    signed = {m.decode(d).body[0] for d in link.of_type("cs", MsgType.METER)}
    # Crash: only what a sync made durable survives (nothing after the last synced write).
    durable = [r for r in link.cs_store if not isinstance(r, MeterRecord)]
    station = link.setup.station(durable)
    assert station.counter_floor == METER_RESERVE
    link.cs = station
    link.run("cs", station.meter(station.base[0] + 60, station.base[1], 1_700_000_000, 1.0))
    new = m.decode(link.of_type("cs", MsgType.METER)[-1]).body[0]
    assert new == METER_RESERVE + 1 and new not in signed
    # The vehicle accepts the re-metered statement and pays it.
    assert link.cs.cosigned is not None and link.cs.cosigned.state.wh == 60


def test_nothing_is_cosigned_after_the_final_state() -> None:
    """A car that proposes one more (non-final) state with the final amounts after CLOSED:
    the station would settle from it after a restart, and coopClose refuses a non-final
    state, so its settlement would retry for ever instead of closing."""
    link = Link(Setup())
    link.open_and_fund()
    link.charge(3)
    link.run("ev", link.ev.close(link.now))
    cs = link.cs
    final = cs.cosigned.state if cs.cosigned else None
    assert final is not None and final.final
    after = ChannelState(final.chain_id, final.contract, final.channel_id, final.nonce + 1,
                         final.t_ev, final.t_cs, final.wh, False)
    body = {0: after.to_cbor_item(), 1: link.setup.ev_key.sign_digest(after.digest()),
            2: cs.last_meter.counter if cs.last_meter else 0}
    actions = cs.receive(m.encode(cs.domain, MsgType.PAY, body, link.setup.ev_id), 1.0)
    assert [a.reason for a in actions if isinstance(a, Rejected)] == ["after-final"]
    assert cs.cosigned is not None and cs.cosigned.state == final
