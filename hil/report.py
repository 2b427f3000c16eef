"""The session report: what happened in one charging session, as JSON and as one HTML page.

Scope: the :class:`SessionRecord` the demo and the HIL runner fill (time series, receipt,
verification summary, injected faults, events, expectation results), its JSON form, and an
HTML page with hand-made inline SVG plots (power, energy, amount paid over time), the
receipt, the verification summary and, for HIL, one pass/fail row per expectation.

Time axes are in session time: wall time since the start times the rig's ``time_scale``
(simulated seconds per wall second: the demo's simulated minutes, the clock its kW and kWh
are on), in minutes once the session is longer than three. A stretch without readings
(an agent down, a meter timing out) is a break in the line and a grey "no readings" band,
never a straight line drawn across it. The vehicle's own signals (``signals``: its state of
charge, its own energy count) are plotted beside the station meter's, and ``tails`` says
for each agent whether the last envelope it committed reached the capture.

Rules: the page is one self-contained file (no script, no external stylesheet, font or
image: it must open on a laptop in a garage with no network); every string from the record
is HTML-escaped; money and energy are integers in the record and formatted here with integer
arithmetic (``decimals`` of the token), never via floats. Stdlib only.
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from agent.jsoncodec import decode_json, to_json_value

if TYPE_CHECKING:
    from agent.envelope import OpenedEnvelope

RECORD_VERSION = 1
MAX_RECORD_BYTES = 64 << 20
MAX_PLOT_POINTS = 1500          # per series; more is invisible and bloats the page
GAP_FACTOR = 5.0                # no point for 5x a series' median spacing: a gap
SOC = "Vehicle.Powertrain.TractionBattery.StateOfCharge.Current"


@dataclass(frozen=True, slots=True)
class Sample:
    """One point of the session's time series (cumulative values since the session start)."""

    t_ns: int
    power_w: int
    energy_wh: int                  # metered (station's signed meter)
    paid: int                       # vehicle -> station, token's smallest unit (t_ev)
    paid_wh: int = 0                # energy covered by co-signed states (the state's wh)


@dataclass(frozen=True, slots=True)
class RecordedReading:
    """A signed reading as the verifier saw it (for "no reading invented during an outage")."""

    ts_ns: int
    device: str
    source: str
    name: str
    value: float


def recorded_readings(opened: OpenedEnvelope) -> tuple[RecordedReading, ...]:
    """The numeric readings of one verified envelope (``Verifier.add``'s return value), as
    the record keeps them; text and byte values (a VIN, a DTC list) are not plotted or judged.
    """
    return tuple(RecordedReading(r.ts_ns, opened.device, r.source, r.name, float(r.value))
                 for r in opened.readings
                 if isinstance(r.value, int | float) and not isinstance(r.value, bool))


@dataclass(frozen=True, slots=True)
class Receipt:
    channel_id: str                 # hex
    vehicle: str
    station: str
    energy_wh: int                  # metered energy delivered in the session
    paid_wh: int                    # wh of the last co-signed state
    price_per_kwh: int              # token's smallest unit per kWh (the signed tariff)
    payments: int                   # co-signed PAY states
    paid: int                       # t_ev of the last co-signed state
    refunded: int = 0               # t_cs (V2G)
    deposit: int = 0
    token: str = "TOKEN"
    decimals: int = 0
    latest_nonce: int = 0           # highest co-signed nonce either party holds
    settled_nonce: int | None = None
    close: str = "open"             # open | cooperative | unilateral | challenged
    settled: bool = False
    settlement_tx: str | None = None
    settlement_block: int | None = None
    chain: str = ""                 # "in-process (eth-tester)" or the node URL's host
    export_wh: int = 0              # metered energy fed back to the grid (V2G)
    export_price_per_kwh: int = 0   # what the station pays per kWh fed back (signed tariff)

    @property
    def amount_due(self) -> int:
        """What the metered energy costs at the tariff, rounded down (as the station bills)."""
        return self.energy_wh * self.price_per_kwh // 1000


@dataclass(frozen=True, slots=True)
class VerificationSummary:
    ok: bool
    envelopes: int
    readings: int = 0
    events: int = 0
    gaps: int = 0
    duplicates: int = 0
    reorders: int = 0
    broken_links: int = 0
    dropped_declared: int = 0
    failures: dict[str, int] = dataclasses.field(default_factory=dict)
    text: str = ""                  # VerifyReport.format()

    @classmethod
    def from_verify_report(cls, report: _VerifyReportLike) -> VerificationSummary:
        """From ``agent.verify.VerifyReport`` (summed over devices)."""
        devices = list(report.devices.values())

        def total(name: str) -> int:
            return sum(int(getattr(d, name, 0)) for d in devices)

        return cls(ok=bool(report.ok), envelopes=total("envelopes"), readings=total("readings"),
                   events=total("events"), gaps=total("gaps"), duplicates=total("duplicates"),
                   reorders=total("reorders"), broken_links=total("broken_links"),
                   dropped_declared=total("dropped_declared"),
                   failures={str(k): int(v) for k, v in report.failures.items()},
                   text=report.format())


class _VerifyReportLike(Protocol):
    devices: dict[str, object]
    failures: dict[str, int]

    @property
    def ok(self) -> bool: ...

    def format(self) -> str: ...


@dataclass(frozen=True, slots=True)
class FaultWindow:
    kind: str                       # broker-outage | meter-timeout | agent-crash | ...
    start_ns: int
    end_ns: int
    target: str = ""


@dataclass(frozen=True, slots=True)
class PlotSignal:
    """Verified readings to plot: those of ``device``/``source`` named ``name``. ``chart``
    "energy" adds them to the energy chart (as Wh since the first one when ``relative``);
    any other value is a chart of its own, titled ``label``."""

    chart: str
    label: str
    unit: str
    device: str
    source: str
    name: str
    relative: bool = False


@dataclass(frozen=True, slots=True)
class ChainTail:
    """An agent's chain head at the end (the last envelope it committed: seq and hash) and
    whether the capture holds that very envelope; ``last_seq`` -1: it sealed nothing."""

    role: str
    device: str
    last_seq: int
    last_hash: str                  # hex
    captured: bool


@dataclass(frozen=True, slots=True)
class SessionEvent:
    t_ns: int
    where: str                      # device or task name
    code: str                       # kebab-case: agent-restarted, uplink-reconnected, ...
    message: str = ""


@dataclass(frozen=True, slots=True)
class ExpectationResult:
    name: str                       # as written in the scenario
    check: str                      # the check's kind
    passed: bool
    detail: str                     # measured value(s), so a failure says why


@dataclass(frozen=True, slots=True)
class SessionRecord:
    title: str
    started_ns: int
    ended_ns: int
    samples: tuple[Sample, ...] = ()
    readings: tuple[RecordedReading, ...] = ()
    receipt: Receipt | None = None
    verification: VerificationSummary | None = None
    faults: tuple[FaultWindow, ...] = ()
    events: tuple[SessionEvent, ...] = ()
    expectations: tuple[ExpectationResult, ...] = ()
    scenario: str = ""
    time_scale: float = 1.0         # simulated seconds per wall second (session time)
    signals: tuple[PlotSignal, ...] = ()
    tails: tuple[ChainTail, ...] = ()
    format: int = RECORD_VERSION

    @property
    def passed(self) -> bool | None:
        """All expectations passed; None when there were none (the demo)."""
        if not self.expectations:
            return None
        return all(result.passed for result in self.expectations)

    def with_expectations(self, results: Sequence[ExpectationResult]) -> SessionRecord:
        return dataclasses.replace(self, expectations=tuple(results))


# --- JSON -----------------------------------------------------------------------------------

def record_to_json(record: SessionRecord) -> str:
    return json.dumps(to_json_value(record), indent=1, allow_nan=False)


def load_record(path: Path) -> SessionRecord:
    """Read a report's JSON back (DecodeError if damaged)."""
    with path.open("rb") as handle:
        return decode_json(SessionRecord, handle.read(MAX_RECORD_BYTES + 1), MAX_RECORD_BYTES)


def write_report(record: SessionRecord, directory: Path, stem: str = "session") -> tuple[Path, Path]:
    """Write ``<stem>.json`` and ``<stem>.html`` (each atomically); returns both paths."""
    directory.mkdir(parents=True, exist_ok=True)
    json_path, html_path = directory / f"{stem}.json", directory / f"{stem}.html"
    for path, text in ((json_path, record_to_json(record)), (html_path, render_html(record))):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    return json_path, html_path


# --- formatting -----------------------------------------------------------------------------

def format_amount(amount: int, decimals: int, token: str = "") -> str:
    """Integer smallest units -> ``"12.340000 TOKEN"`` without floating point."""
    sign, amount = ("-" if amount < 0 else ""), abs(amount)
    if decimals <= 0:
        text = f"{sign}{amount}"
    else:
        whole, frac = divmod(amount, 10**decimals)
        text = f"{sign}{whole}.{frac:0{decimals}d}"
    return f"{text} {token}".strip()


def format_energy(wh: int) -> str:
    return f"{wh // 1000}.{wh % 1000:03d} kWh" if wh >= 0 else f"-{format_energy(-wh)}"


def _nice_step(span: float, target_ticks: int = 5) -> float:
    raw = span / target_ticks if span > 0 else 1.0
    magnitude = 10 ** math.floor(math.log10(raw))
    for factor in (1, 2, 2.5, 5, 10):
        if raw <= factor * magnitude:
            return factor * magnitude
    return 10 * magnitude


def _tick_label(value: float) -> str:
    if abs(value) >= 10_000:
        return f"{value / 1000:g}k"
    return f"{value:g}"


def _thin(points: Sequence[tuple[float, float]], limit: int) -> list[tuple[float, float]]:
    if len(points) <= limit:
        return list(points)
    step = math.ceil(len(points) / limit)
    kept = list(points[::step])
    if kept[-1] != points[-1]:
        kept.append(points[-1])
    return kept


def gaps(points: Sequence[tuple[float, float]], factor: float = GAP_FACTOR
         ) -> list[tuple[float, float]]:
    """(from, to) x ranges where a series has no point for longer than ``factor`` times
    its median spacing: its source was silent there."""
    steps = sorted(b[0] - a[0] for a, b in zip(points, points[1:], strict=False))
    if len(steps) < 2:
        return []
    limit = factor * max(steps[len(steps) // 2], 1e-9)
    return [(a[0], b[0]) for a, b in zip(points, points[1:], strict=False)
            if b[0] - a[0] > limit]


def _segments(points: Sequence[tuple[float, float]]) -> list[list[tuple[float, float]]]:
    """The series cut at its gaps, each piece thinned to its share of MAX_PLOT_POINTS."""
    cuts = {start for start, _ in gaps(points)}
    pieces: list[list[tuple[float, float]]] = [[]]
    for point in points:
        pieces[-1].append(point)
        if point[0] in cuts:
            pieces.append([])
    total = max(len(points), 1)
    return [_thin(piece, max(2, MAX_PLOT_POINTS * len(piece) // total))
            for piece in pieces if piece]


def svg_chart(points: Sequence[tuple[float, float]], *, title: str, unit: str,
              bands: Sequence[tuple[float, float, str]] = (), width: int = 720,
              height: int = 220, more: Sequence[tuple[str, Sequence[tuple[float, float]]]] = (),
              label: str = "", x_label: str = "time (s)") -> str:
    """A line chart as inline SVG. ``points`` are (time since start, value); ``bands`` are
    shaded x ranges (fault windows) with a label; ``more`` are further named series drawn
    beside ``points`` (named ``label``) with a legend. Each series breaks at its gaps; the
    gaps of ``points`` are grey "no readings" bands."""
    left, right, top, bottom = 64, 16, 28, 36
    plot_w, plot_h = width - left - right, height - top - bottom
    every = [*points, *(p for _, series in more for p in series)]
    xs = [x for x, _ in every] or [0.0]
    ys = [y for _, y in every] or [0.0]
    x_max = max(max(xs), max((b[1] for b in bands), default=0.0), 1.0)
    y_min, y_max = min(0.0, min(ys)), max(ys)
    if y_max <= y_min:
        y_max = y_min + 1.0
    y_step = _nice_step(y_max - y_min)
    y_top = math.ceil(y_max / y_step) * y_step
    y_bottom = math.floor(y_min / y_step) * y_step

    def sx(x: float) -> float:
        return left + plot_w * x / x_max

    def sy(y: float) -> float:
        return top + plot_h * (1 - (y - y_bottom) / (y_top - y_bottom))

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
           f'width="{width}" height="{height}" role="img" aria-label="{html.escape(title)}">',
           f'<text x="{left}" y="18" class="title">{html.escape(title)} ({html.escape(unit)})'
           '</text>']
    for start, end, text in bands:
        x0, x1 = sx(max(0.0, start)), sx(min(x_max, end))
        out.append(f'<rect class="fault" x="{x0:.1f}" y="{top}" width="{max(x1 - x0, 1):.1f}" '
                   f'height="{plot_h}"><title>{html.escape(text)}</title></rect>')
        out.append(f'<text class="fault-label" x="{x0 + 2:.1f}" y="{top + 12}">'
                   f'{html.escape(text)}</text>')
    for start, end in gaps(points):
        x0, x1 = sx(start), sx(end)
        out.append(f'<rect class="gap" x="{x0:.1f}" y="{top}" width="{max(x1 - x0, 1):.1f}" '
                   f'height="{plot_h}"><title>no readings</title></rect>'
                   f'<text class="gap-label" x="{x0 + 2:.1f}" y="{top + plot_h - 4}">'
                   'no readings</text>')
    y = y_bottom
    while y <= y_top + y_step / 2:
        out.append(f'<line class="grid" x1="{left}" x2="{left + plot_w}" y1="{sy(y):.1f}" '
                   f'y2="{sy(y):.1f}"/><text class="tick" x="{left - 6}" y="{sy(y) + 4:.1f}" '
                   f'text-anchor="end">{_tick_label(y)}</text>')
        y += y_step
    x_step = _nice_step(x_max)
    x = 0.0
    while x <= x_max + x_step / 1000:
        out.append(f'<text class="tick" x="{sx(x):.1f}" y="{top + plot_h + 16}" '
                   f'text-anchor="middle">{_tick_label(x)}</text>')
        x += x_step
    out.append(f'<text class="tick" x="{left + plot_w}" y="{height - 4}" text-anchor="end">'
               f'{html.escape(x_label)}</text>')
    for index, (_, series) in enumerate([(label, points), *more]):
        for piece in _segments(series):
            coords = " ".join(f"{sx(px):.1f},{sy(py):.1f}" for px, py in piece)
            out.append(f'<polyline class="series s{index}" points="{coords}"/>')
    if more:
        legend = [label or title, *(name for name, _ in more)]
        x = float(left + plot_w)
        for index in reversed(range(len(legend))):
            text = html.escape(legend[index])
            x -= 14 + 6.2 * len(legend[index])
            out.append(f'<line class="series s{index}" x1="{x:.1f}" x2="{x + 10:.1f}" y1="14" '
                       f'y2="14"/><text class="tick" x="{x + 13:.1f}" y="18">{text}</text>')
    out.append("</svg>")
    return "\n".join(out)


_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:2em auto;max-width:760px;color:#222;
padding:0 10px}
svg{max-width:100%;height:auto}table{display:block;overflow-x:auto}
@media (max-width:480px){body{margin:1em auto;font-size:13px}td,th{padding:2px 3px}}
h1{font-size:1.4em}h2{font-size:1.1em;margin-top:1.6em}
table{border-collapse:collapse;width:100%}td,th{border-bottom:1px solid #ddd;padding:3px 6px;
text-align:left;vertical-align:top}td.num{text-align:right;font-variant-numeric:tabular-nums}
.pass{color:#176d2c;font-weight:bold}.fail{color:#b00020;font-weight:bold}
pre{background:#f6f6f6;padding:8px;overflow-x:auto}
svg .series{fill:none;stroke:#1f5fbf;stroke-width:1.6}svg .grid{stroke:#e3e3e3}
svg .s1{stroke:#d0542a;stroke-dasharray:5 3}svg .s2{stroke:#2a9d4b}
svg .tick{font-size:10px;fill:#555}svg .title{font-size:12px;font-weight:bold}
svg .fault{fill:#f5a623;opacity:.18}svg .fault-label{font-size:10px;fill:#a06000}
svg .gap{fill:#888;opacity:.14}svg .gap-label{font-size:10px;fill:#666}
"""


def _row(label: str, value: str, numeric: bool = False) -> str:
    cls = ' class="num"' if numeric else ""
    return f"<tr><th>{html.escape(label)}</th><td{cls}>{html.escape(value)}</td></tr>"


def _receipt_html(receipt: Receipt) -> str:
    amount = lambda v: format_amount(v, receipt.decimals, receipt.token)  # noqa: E731
    settlement = "not settled"
    if receipt.settled:
        settlement = f"settled ({receipt.close}) at nonce {receipt.settled_nonce}"
        if receipt.settlement_tx:
            settlement += f", tx {receipt.settlement_tx}"
        if receipt.settlement_block is not None:
            settlement += f", block {receipt.settlement_block}"
    rows = [
        _row("Channel", receipt.channel_id),
        _row("Vehicle / station", f"{receipt.vehicle} / {receipt.station}"),
        _row("Energy metered", format_energy(receipt.energy_wh), True),
        _row("Energy paid for", format_energy(receipt.paid_wh), True),
        _row("Tariff", f"{amount(receipt.price_per_kwh)} per kWh", True),
        _row("Amount due (metered x tariff)", amount(receipt.amount_due), True),
        _row("Paid vehicle -> station", f"{amount(receipt.paid)} in {receipt.payments} payments",
             True),
        _row("Energy fed back (V2G)", format_energy(receipt.export_wh), True),
        _row("Export tariff", f"{amount(receipt.export_price_per_kwh)} per kWh", True),
        _row("Paid station -> vehicle (V2G)", amount(receipt.refunded), True),
        _row("Deposit", amount(receipt.deposit), True),
        _row("Latest co-signed nonce", str(receipt.latest_nonce), True),
        _row("Settlement", settlement),
        _row("Chain", receipt.chain or "-"),
    ]
    return "<table>" + "".join(rows) + "</table>"


def _verification_html(summary: VerificationSummary) -> str:
    verdict = ('<p class="pass">every envelope verifies</p>' if summary.ok
               else '<p class="fail">verification FAILED</p>')
    rows = [_row(label, str(value), True) for label, value in (
        ("Envelopes", summary.envelopes), ("Readings", summary.readings),
        ("Events", summary.events), ("Gaps", summary.gaps),
        ("Duplicates removed", summary.duplicates), ("Reordered", summary.reorders),
        ("Broken hash links", summary.broken_links),
        ("Declared drops", summary.dropped_declared))]
    rows += [_row(f"Rejected: {reason}", str(count), True)
             for reason, count in sorted(summary.failures.items())]
    text = f"<pre>{html.escape(summary.text)}</pre>" if summary.text else ""
    return verdict + "<table>" + "".join(rows) + "</table>" + text


def _expectations_html(results: Sequence[ExpectationResult]) -> str:
    rows = ["<tr><th>Expectation</th><th>Result</th><th>Measured</th></tr>"]
    for result in results:
        verdict = '<td class="pass">PASS</td>' if result.passed else '<td class="fail">FAIL</td>'
        rows.append(f"<tr><td>{html.escape(result.name)}<br><small>{html.escape(result.check)}"
                    f"</small></td>{verdict}<td>{html.escape(result.detail)}</td></tr>")
    return "<table>" + "".join(rows) + "</table>"


@dataclass(frozen=True, slots=True)
class SessionClock:
    """Wall ns -> session time on the charts: ``(t - t0) x time_scale``, in minutes once
    the session is longer than three (the demo: simulated minutes)."""

    t0_ns: int
    time_scale: float
    per_unit_s: float               # 60 for minutes, 1 for seconds

    @classmethod
    def of(cls, record: SessionRecord) -> SessionClock:
        scale = record.time_scale if record.time_scale > 0 else 1.0
        span_s = (record.ended_ns - record.started_ns) / 1e9 * scale
        return cls(record.started_ns, scale, 60.0 if span_s > 180 else 1.0)

    def __call__(self, t_ns: int) -> float:
        return (t_ns - self.t0_ns) / 1e9 * self.time_scale / self.per_unit_s

    @property
    def unit(self) -> str:
        return "min" if self.per_unit_s == 60 else "s"

    @property
    def label(self) -> str:
        simulated = f", simulated x{self.time_scale:g}" if self.time_scale != 1 else ""
        return f"session time ({self.unit}{simulated})"


def _signal_points(record: SessionRecord, signal: PlotSignal, clock: SessionClock
                   ) -> list[tuple[float, float]]:
    mine = sorted((r.ts_ns, r.value) for r in record.readings
                  if (r.device, r.source, r.name) == (signal.device, signal.source, signal.name)
                  and r.ts_ns >= record.started_ns)
    base = mine[0][1] if mine and signal.relative else 0.0
    return [(clock(ts), value - base) for ts, value in mine]


def _charts(record: SessionRecord, clock: SessionClock) -> list[str]:
    xs = [clock(s.t_ns) for s in record.samples]
    bands = [(clock(f.start_ns), clock(f.end_ns), f.kind) for f in record.faults]
    decimals = record.receipt.decimals if record.receipt else 0
    token = record.receipt.token if record.receipt else "TOKEN"

    def chart(values: Sequence[float], title: str, unit: str,
              more: Sequence[tuple[str, Sequence[tuple[float, float]]]] = (),
              label: str = "") -> str:
        return svg_chart(list(zip(xs, values, strict=True)), title=title, unit=unit,
                         bands=bands, x_label=clock.label, more=more, label=label)

    energy = [(s.label, _signal_points(record, s, clock)) for s in record.signals
              if s.chart == "energy"]
    charts = [chart([s.power_w for s in record.samples], "Power", "W"),
              chart([s.energy_wh for s in record.samples], "Energy", "Wh",
                    more=[(label, points) for label, points in energy if points],
                    label="station meter" if energy else "")]
    for signal in record.signals:
        points = _signal_points(record, signal, clock)
        if signal.chart != "energy" and points:
            charts.append(svg_chart(points, title=signal.label, unit=signal.unit,
                                    bands=bands, x_label=clock.label))
    charts.append(chart([s.paid / 10**decimals for s in record.samples], "Amount paid",
                        token))
    return charts


def _tails_html(tails: Sequence[ChainTail]) -> str:
    rows = ["<tr><th>Agent</th><th>Device</th><th>Last envelope committed</th>"
            "<th>In the capture</th></tr>"]
    for tail in tails:
        seq = f"seq {tail.last_seq} ({tail.last_hash[:16]})" if tail.last_seq >= 0 \
            else "none sealed"
        verdict = '<td class="pass">yes</td>' if tail.captured else '<td class="fail">NO</td>'
        rows.append(f"<tr><td>{html.escape(tail.role)}</td><td>{html.escape(tail.device)}</td>"
                    f"<td>{html.escape(seq)}</td>{verdict}</tr>")
    return "<table>" + "".join(rows) + "</table>"


def render_html(record: SessionRecord) -> str:
    clock = SessionClock.of(record)
    charts = _charts(record, clock)
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(record.started_ns / 1e9))
    duration = (record.ended_ns - record.started_ns) / 1e9
    simulated = (f" ({duration * clock.time_scale / 60:.1f} simulated minutes at "
                 f"x{clock.time_scale:g})") if clock.time_scale != 1 else ""
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
             f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
             f"<title>{html.escape(record.title)}</title><style>{_CSS}</style></head><body>",
             f"<h1>{html.escape(record.title)}</h1>",
             f"<p>Started {started}, {duration:.0f} s{simulated}"
             + (f", scenario <code>{html.escape(record.scenario)}</code>" if record.scenario
                else "") + "</p>"]
    if record.passed is not None:
        verdict = ('<span class="pass">PASS</span>' if record.passed
                   else '<span class="fail">FAIL</span>')
        passed = sum(r.passed for r in record.expectations)
        parts.append(f"<h2>Expectations: {verdict} ({passed}/{len(record.expectations)})</h2>")
        parts.append(_expectations_html(record.expectations))
    if record.receipt is not None:
        parts += ["<h2>Receipt</h2>", _receipt_html(record.receipt)]
    if record.verification is not None:
        parts += ["<h2>Verification</h2>", _verification_html(record.verification)]
    if record.tails:
        parts += ["<h2>Last envelopes</h2>", _tails_html(record.tails)]
    parts.append("<h2>Over time</h2>")
    parts += [f"<figure>{chart}</figure>" for chart in charts]
    if record.events:
        parts.append(f"<h2>Events</h2><table><tr><th>{html.escape(clock.label)}</th></tr>")
        for event in record.events:
            parts.append(f"<tr><td class=\"num\">{clock(event.t_ns):.1f} {clock.unit}</td>"
                         f"<td>{html.escape(event.where)}</td><td>{html.escape(event.code)}</td>"
                         f"<td>{html.escape(event.message)}</td></tr>")
        parts.append("</table>")
    parts.append("<p><small>Data: the JSON file next to this page.</small></p></body></html>\n")
    return "\n".join(parts)
