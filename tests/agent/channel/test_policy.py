"""The roles' own defences (issue 14): time-of-use over-billing, the vehicle's policy (minimum
dispute window, V2G export credit window and station deposit, funding checks on by default)
and the nonce bound. Bytes in, events out, time passed explicitly."""

from __future__ import annotations

from agent.channel import messages as m
from agent.channel.messages import MsgType, Tariff
from agent.channel.protocol import (
    DeliveryPaused,
    DeliveryResumed,
    ExportPaused,
    ExportResumed,
    Opened,
    Rejected,
)
from agent.channel.records import ClockRecord, MeterInfo
from agent.channel.station import StationChannel

from .harness import Link, Setup

DAY = (1_700_000_000 // 86_400 + 1) * 86_400            # a midnight UTC
NIGHT, PEAK = DAY + 2 * 3600, DAY + 18 * 3600
TOU = Tariff(100, tou=((0, 100), (17 * 60, 400), (21 * 60, 100)))   # 17:00-21:00 at 4x


def rejections(actions: list[object]) -> list[str]:
    return [a.reason for a in actions if isinstance(a, Rejected)]


def tou_link_at_night() -> Link:
    """A time-of-use session opened at night, both clocks reading night."""
    link = Link(Setup(tariff=TOU))
    link.wall = NIGHT
    link.run("cs", link.cs.meter(1_000_000, 500_000, NIGHT, link.now))
    link.run("cs", link.cs.open(link.now))
    link.run("ev", link.ev.funded(b"", link.now))
    return link


# --- time of use ----------------------------------------------------------------------------

def test_a_meter_stamped_at_peak_while_charging_at_night_is_refused() -> None:
    """The review's attack: the station stamps its METERs with a peak-hour time (4x the
    price) while it is night by the vehicle's clock; today's vehicle paid it."""
    link = tou_link_at_night()
    assert any(isinstance(r, ClockRecord) and r.wall_s == NIGHT for r in link.ev_store)
    link.run("cs", link.cs.meter(1_000_100, 500_000, PEAK, link.now))   # 100 Wh "at peak"
    assert link.ev.counters["meter-clock-mismatch"] == 1
    assert link.cs.cosigned is None and not link.of_type("ev", MsgType.PAY)
    assert link.cs.counters["peer:meter-clock-mismatch"] == 1          # told why


def test_the_first_meter_is_priced_from_the_vehicles_clock_at_open() -> None:
    """A METER with an honest time but the peak price for night energy: today's first
    METER was bounded only by the day's highest price."""
    link = tou_link_at_night()
    cs = link.setup.cs_id
    over = MeterInfo(1, 100, 0, NIGHT + 60, 100 * 400, 0, TOU.tariff_id())
    actions = link.ev.receive(m.encode(link.ev.domain, MsgType.METER, over.to_body(), cs),
                              link.now, NIGHT + 61)
    assert rejections(actions) == ["meter-charge-mismatch"]
    fair = MeterInfo(1, 100, 0, NIGHT + 60, 100 * 100, 0, TOU.tariff_id())
    actions = link.ev.receive(m.encode(link.ev.domain, MsgType.METER, fair.to_body(), cs),
                              link.now, NIGHT + 61)
    assert rejections(actions) == []


def test_an_honest_meter_within_the_clock_tolerance_is_paid() -> None:
    link = tou_link_at_night()
    link.charge(5, ts_s=NIGHT + 100)      # the station's clock 100 s ahead: within 120 s
    link.wall = NIGHT
    link.run("cs", link.cs.meter(link.cs.base[0] + link.cs.import_wh + 10, 500_000,
                                 NIGHT + 100, link.now))
    assert link.cs.cosigned is not None and link.cs.cosigned.state.wh == 60
    assert link.ev.counters["meter-clock-mismatch"] == 0


def test_a_time_of_use_meter_without_a_clock_is_refused() -> None:
    link = tou_link_at_night()
    link.wall = None
    link.run("cs", link.cs.meter(1_000_100, 500_000, NIGHT + 5, link.now))
    assert link.ev.counters["meter-clock-unknown"] == 1 and link.cs.cosigned is None


# --- vehicle policy on OPEN -----------------------------------------------------------------

def test_the_vehicle_refuses_a_one_second_dispute_window() -> None:
    setup = Setup()
    link = Link(setup)
    link.cs = StationChannel(**{**setup.station_kwargs(), "dispute_window_s": 1})  # type: ignore[arg-type]
    link.run("cs", link.cs.open(link.now))
    assert link.ev.counters["dispute-window-too-short"] == 1
    assert link.ev.params is None
    assert not any(isinstance(a, Opened) for _, a in link.events)


def test_the_vehicle_refuses_v2g_without_a_station_deposit() -> None:
    link = Link(Setup(deposit_cs=0))       # export price 120 per kWh, nothing to pay it from
    link.run("cs", link.cs.open(link.now))
    assert link.ev.counters["station-deposit-too-small"] == 1 and link.ev.params is None


# --- V2G: the export credit window, funding checked first -----------------------------------

def export_events(link: Link) -> list[object]:
    return [a for who, a in link.events if who == "ev"
            and isinstance(a, ExportPaused | ExportResumed)]


def test_export_waits_for_the_ledger_and_stops_when_the_station_stops_paying() -> None:
    link = Link(Setup())                   # export price 120 per kWh, station deposit 2e6
    link.open_and_fund()
    assert export_events(link) == []      # funded, but the ledger was not read yet
    link.run("ev", link.ev.funding_checked(link.now))
    assert export_events(link) == [ExportResumed(0)]
    link.cs.receive = lambda data, now, wall=None: []  # type: ignore[method-assign]
    for step in range(1, 7):               # the car feeds 100 Wh at a time, nobody pays
        link.run("ev", link.ev.estimate(0, link.now, exported_wh=100 * step))
    assert export_events(link) == [ExportResumed(0), ExportPaused(500)]
    assert not link.ev.export_allowed


def test_paid_export_reopens_the_window() -> None:
    link = Link(Setup())
    link.open_and_fund()
    link.run("ev", link.ev.funding_checked(link.now))
    base_exp = link.cs.base[1]
    link.run("ev", link.ev.estimate(0, link.now, exported_wh=500))
    assert export_events(link)[-1] == ExportPaused(500)
    link.wall = 1_700_000_000
    link.run("cs", link.cs.meter(link.cs.base[0], base_exp + 500, 1_700_000_000, link.now))
    assert link.ev.paid_export_wh == 500 and link.ev.cosigned.state.t_cs == 60
    assert export_events(link)[-1] == ExportResumed(0)


# --- the station's funding check, on by default --------------------------------------------

def test_the_station_delivers_one_credit_window_until_the_ledger_confirms() -> None:
    link = Link(Setup(require_funding_check=True))   # credit window 100 Wh
    link.open_and_fund()
    link.charge(12)                        # 120 Wh, each 10 Wh paid at once
    delivery = [a for who, a in link.events if who == "cs"
                and isinstance(a, DeliveryPaused | DeliveryResumed)]
    assert [type(a) for a in delivery] == [DeliveryResumed, DeliveryPaused]
    assert link.cs.headroom_wh == 0 and link.cs.cosigned.state.wh >= 100
    link.run("cs", link.cs.funding_checked(link.now))
    assert link.cs.headroom_wh == 100


# --- the vehicle's own count ----------------------------------------------------------------

def _forged_first_meter(link: Link) -> list[object]:
    """A station that never switched on sends one METER worth the car's whole deposit."""
    setup, cs = link.setup, link.cs
    wh = setup.deposit_ev * 1000 // setup.tariff.price_per_kwh
    info = MeterInfo(counter=1, import_wh=wh, export_wh=0, ts_s=1_700_000_000,
                     charge_milli=wh * setup.tariff.price_per_kwh, credit_milli=0,
                     tariff_id=cs.tariff_id)
    return link.ev.receive(m.encode(cs.domain, MsgType.METER, info.to_body(), setup.cs_id),
                           link.now, 1_700_000_000)


def sent_pays(actions: list[object]) -> list[object]:
    return [a for a in actions if getattr(a, "msg_type", None) == MsgType.PAY]


def test_with_its_own_count_configured_the_car_pays_nothing_before_it_counts() -> None:
    link = Link(Setup())
    link.open_and_fund()
    link.ev.counts_energy = True          # [channel.energy]: its count has no value yet
    actions = _forged_first_meter(link)
    assert sent_pays(actions) == []
    assert link.ev.counters["energy-mismatch"] == 1
    # the car's count catches up with what really flowed (nothing): still nothing paid
    assert sent_pays(link.ev.estimate(0, link.now)) == []


def test_without_a_count_of_its_own_the_car_pays_what_the_meter_says() -> None:
    """No [channel.energy]: the car trusts the station's signed METER (the documented
    mode, warned about at start); the check above is what a configured count adds."""
    link = Link(Setup())
    link.open_and_fund()
    assert len(sent_pays(_forged_first_meter(link))) == 1
