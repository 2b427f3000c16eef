"""Session report: JSON round trip, a self-contained HTML page with hand-made SVG plots."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from agent.envelope import Sealer, open_envelope
from agent.errors import DecodeError
from agent.fleet_keys import FleetRegistry
from agent.keys import KeyStore
from agent.readings import Reading
from agent.verify import verify_capture
from hil.report import (
    SOC,
    ChainTail,
    ExpectationResult,
    FaultWindow,
    PlotSignal,
    Receipt,
    RecordedReading,
    Sample,
    SessionEvent,
    SessionRecord,
    VerificationSummary,
    format_amount,
    format_energy,
    gaps,
    load_record,
    recorded_readings,
    render_html,
    svg_chart,
    write_report,
)

S = 10**9
T0 = 1_763_700_000 * S


def record(expectations: tuple[ExpectationResult, ...] = ()) -> SessionRecord:
    samples = tuple(Sample(T0 + i * S, 11_000 if 5 <= i < 95 else 0, i * 3, i * 900, i * 3)
                    for i in range(100))
    return SessionRecord(
        title="Charging session <demo>", started_ns=T0, ended_ns=T0 + 100 * S,
        samples=samples,
        readings=(RecordedReading(T0 + S, "cs-1", "meter0", "1-0:1.8.0", 3),),
        receipt=Receipt(channel_id="ab" * 32, vehicle="ev-1", station="cs-1", energy_wh=297,
                        paid_wh=297, price_per_kwh=300_000, payments=99, paid=89_100,
                        deposit=5_000_000, token="EURC", decimals=6, latest_nonce=99,
                        settled_nonce=99, close="cooperative", settled=True,
                        settlement_tx="0x" + "12" * 32, settlement_block=7,
                        chain="in-process (eth-tester)"),
        verification=VerificationSummary(ok=True, envelopes=40, readings=400, gaps=0,
                                         failures={}, text="every envelope verifies"),
        faults=(FaultWindow("broker-outage", T0 + 30 * S, T0 + 50 * S, "broker"),),
        events=(SessionEvent(T0 + 50 * S, "ev-1", "uplink-reconnected", "after 20 s"),),
        expectations=expectations, scenario="broker-outage",
    )


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.attrs: list[tuple[str, str | None]] = []
        self.polylines: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attrs += attrs
        if tag == "polyline":
            self.polylines.append(dict(attrs)["points"] or "")

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse(page: str) -> _Page:
    parser = _Page()
    parser.feed(page)
    parser.close()
    return parser


def test_json_round_trip(tmp_path: Path) -> None:
    rec = record((ExpectationResult("all envelopes verify", "envelopes-verify", True, "40"),))
    json_path, html_path = write_report(rec, tmp_path / "out")
    assert load_record(json_path) == rec
    assert json.loads(json_path.read_text())["receipt"]["paid"] == 89_100
    assert html_path.read_text().startswith("<!DOCTYPE html>")
    assert sorted(os.listdir(tmp_path / "out")) == ["session.html", "session.json"]


def test_damaged_json_is_a_decode_error(tmp_path: Path) -> None:
    path = tmp_path / "session.json"
    data = json.loads(json.dumps({"title": "x", "started_ns": 1, "ended_ns": "2"}))
    path.write_text(json.dumps(data))
    with pytest.raises(DecodeError, match="ended_ns"):
        load_record(path)
    path.write_text("{")
    with pytest.raises(DecodeError):
        load_record(path)


def test_page_is_self_contained_and_escaped() -> None:
    page = render_html(record())
    parsed = parse(page)
    assert "script" not in parsed.tags and "link" not in parsed.tags and "img" not in parsed.tags
    for name, value in parsed.attrs:
        assert name not in ("src", "href"), (name, value)
    assert "url(" not in page and "@import" not in page and "http://" not in page.replace(
        'xmlns="http://www.w3.org/2000/svg"', "")
    assert "<demo>" not in page and "&lt;demo&gt;" in page          # the title is escaped
    assert len(parsed.polylines) == 3                                 # power, energy, paid
    text = " ".join(parsed.text)
    for expected in ("0.297 kWh", "0.300000 EURC per kWh", "0.089100 EURC in 99 payments",
                     "settled (cooperative) at nonce 99", "0x" + "12" * 32,
                     "every envelope verifies", "broker-outage", "uplink-reconnected"):
        assert expected in text, expected
    assert "Expectations" not in text                                 # none for the demo


def test_expectation_rows_pass_and_fail() -> None:
    rec = record((ExpectationResult("all envelopes verify", "envelopes-verify", True, "40 ok"),
                  ExpectationResult("energy_wh == paid_wh", "energy-paid", False,
                                    "energy 297 Wh, paid 250 Wh")))
    assert rec.passed is False
    page = render_html(rec)
    assert "Expectations: <span class=\"fail\">FAIL</span> (1/2)" in page
    assert page.count('<td class="pass">PASS</td>') == 1
    assert page.count('<td class="fail">FAIL</td>') == 1
    assert "energy 297 Wh, paid 250 Wh" in page


def test_chart_scales_points_into_the_plot_area() -> None:
    svg = svg_chart([(0, 0), (50, 11_000), (100, 0)], title="Power", unit="W",
                    bands=[(30, 50, "broker-outage")])
    points = [tuple(map(float, p.split(","))) for p in
              re.search(r'points="([^"]+)"', svg).group(1).split()]
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    assert xs[0] == 64 and xs[-1] == 720 - 16                          # left and right edge
    assert ys[0] == ys[2] == 220 - 36 and ys[1] < ys[0]                # 0 at the bottom
    assert min(ys) >= 28                                               # inside the plot
    assert 'class="fault"' in svg and ">10k<" in svg and ">12.5k<" in svg  # 0..12.5k by 2.5k


def test_chart_thins_long_series_and_handles_empty_and_flat() -> None:
    long = svg_chart([(i / 10, i % 7) for i in range(20_000)], title="x", unit="W")
    assert len(re.search(r'points="([^"]+)"', long).group(1).split()) <= 1501
    assert "<polyline" not in svg_chart([], title="x", unit="W")
    assert "<polyline" in svg_chart([(0, 5), (10, 5)], title="x", unit="W")


def test_amount_formatting_is_exact() -> None:
    assert format_amount(89_100, 6, "EURC") == "0.089100 EURC"
    assert format_amount(10**24 + 1, 18) == "1000000.000000000000000001"
    assert format_amount(-5, 2) == "-0.05"
    assert format_amount(42, 0, "wei") == "42 wei"
    assert format_energy(12_345) == "12.345 kWh" and format_energy(-5) == "-0.005 kWh"


def test_verification_summary_from_the_real_verifier(tmp_path: Path) -> None:
    keys, provisioning = KeyStore(tmp_path / "state").init("ev-report")
    registry = FleetRegistry()
    registry.add_record(provisioning)
    sealer = Sealer(keys.identity, keys.device_id, os.urandom(16))
    envelopes = [sealer.seal_readings([Reading("Vehicle.Speed", float(i), "km/h", T0 + i)])
                 for i in range(5)]
    good = verify_capture(b"".join(e.data for e in envelopes), registry)
    summary = VerificationSummary.from_verify_report(good)
    assert summary.ok and summary.envelopes == 5 and summary.readings == 5
    assert summary.gaps == 0 and "every envelope verifies" in summary.text
    gappy = verify_capture(b"".join(e.data for i, e in enumerate(envelopes) if i != 2), registry)
    summary = VerificationSummary.from_verify_report(gappy)
    assert not summary.ok and summary.gaps == 1 and summary.envelopes == 4


def test_recorded_readings_from_an_opened_envelope(tmp_path: Path) -> None:
    keys, _ = KeyStore(tmp_path / "state").init("cs-report")
    sealer = Sealer(keys.identity, keys.device_id, os.urandom(16))
    sealed = sealer.seal_readings([
        Reading("1-0:1.8.0", 12_345, "Wh", T0, source="meter0"),
        Reading("1-0:16.7.0", 7_400.5, "W", T0 + 1, source="meter0"),
        Reading("Vehicle.VehicleIdentification.VIN", "WVWZZZ1JZXW000001", "", T0 + 2,
                source="obd0"),
    ])
    opened = open_envelope(sealed.data, lambda kid: keys.identity.public)
    assert recorded_readings(opened) == (
        RecordedReading(T0, keys.device_id, "meter0", "1-0:1.8.0", 12_345.0),
        RecordedReading(T0 + 1, keys.device_id, "meter0", "1-0:16.7.0", 7_400.5),
    )


def test_page_is_readable_on_a_phone() -> None:
    """400 px wide: the page scales to the device (viewport), charts shrink to the width
    instead of overflowing, wide tables scroll on their own."""
    from hil.report import _CSS

    page = render_html(record())
    assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in page
    assert "svg{max-width:100%;height:auto}" in _CSS and "overflow-x:auto" in _CSS
    assert "@media (max-width:480px)" in _CSS


def charged(*, hole: tuple[int, int] | None = None, time_scale: float = 120.0) -> SessionRecord:
    """100 wall seconds of charging at x120 (200 simulated minutes), the meter read every
    second except in ``hole``; the car reports its own count and its state of charge."""
    skip = range(*hole) if hole else range(0)
    samples = tuple(Sample(T0 + i * S, 11_000, i * 3, i * 900, i * 3)
                    for i in range(100) if i not in skip)
    own = tuple(RecordedReading(T0 + i * S, "ev-1", "obc0", "1-0:1.8.0", 50_000 + i * 3 - i // 10)
                for i in range(0, 100, 2))
    soc = tuple(RecordedReading(T0 + i * S, "ev-1", "ecu0", SOC, 20 + i * 0.5)
                for i in range(0, 100, 4))
    return dataclasses.replace(
        record(), samples=samples, readings=own + soc, time_scale=time_scale, faults=(),
        signals=(PlotSignal("energy", "car's own count", "Wh", "ev-1", "obc0", "1-0:1.8.0",
                            relative=True),
                 PlotSignal("soc", "State of charge", "%", "ev-1", "ecu0", SOC)),
        tails=(ChainTail("vehicle", "ev-1", 41, "ab" * 32, False),
               ChainTail("station", "cs-1", 57, "cd" * 32, True)))


def test_time_axes_are_session_time_in_simulated_minutes() -> None:
    # 100 wall seconds at x120 are 200 simulated minutes: the demo's console says 11 kW,
    # and 3 Wh a wall second is 11 kW only on that clock.
    page = render_html(charged())
    assert page.count("session time (min, simulated x120)") >= 4  # every chart, the events
    assert "200.0 simulated minutes at x120" in page
    assert ">100.0 min<" in page  # the event 50 wall seconds in
    power = re.search(r'aria-label="Power".*?</svg>', page, re.S).group(0)
    assert ">150<" in power and ">50<" in power  # ticks in minutes (0..198), not 0..100 s
    plain = render_html(charged(time_scale=1.0))
    assert "session time (s)" in plain and "simulated" not in plain


def test_a_stretch_without_readings_is_a_gap_not_a_line() -> None:
    page = render_html(charged(hole=(40, 60)))
    power = re.search(r'aria-label="Power".*?</svg>', page, re.S).group(0)
    assert len(parse(power).polylines) == 2            # broken at the hole
    assert power.count('class="gap"') == 1 and "no readings" in power
    assert gaps([(x, 0) for x in (0, 1, 2, 3, 10, 11, 12)]) == [(3, 10)]
    whole = re.search(r'aria-label="Power".*?</svg>', render_html(charged()), re.S).group(0)
    assert len(parse(whole).polylines) == 1 and 'class="gap"' not in whole


def test_the_vehicles_own_signals_are_plotted_beside_the_meter() -> None:
    page = render_html(charged())
    energy = re.search(r'aria-label="Energy".*?</svg>', page, re.S).group(0)
    lines = parse(energy).polylines
    assert len(lines) == 2 and "car&#x27;s own count" in energy and "station meter" in energy
    own = [tuple(map(float, p.split(","))) for p in lines[1].split()]
    assert own[0][1] == 220 - 36  # relative: the car's count starts at 0 Wh on the chart
    soc = re.search(r'aria-label="State of charge".*?</svg>', page, re.S).group(0)
    assert len(parse(soc).polylines) == 1 and "(%)" in soc


def test_each_agents_last_envelope_is_checked_against_the_capture(tmp_path: Path) -> None:
    rec = charged()
    page = render_html(rec)
    assert "Last envelopes" in page
    assert page.count('<td class="fail">NO</td>') == 1 and "seq 41" in page
    assert page.count('<td class="pass">yes</td>') == 1 and "seq 57" in page
    json_path, _ = write_report(rec, tmp_path)
    assert load_record(json_path) == rec  # signals, tails and time_scale round-trip
