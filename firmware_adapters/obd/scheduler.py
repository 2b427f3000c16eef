"""The OBD-II poll schedule (sans-I/O): what to ask next, and what the answers mean.

One :class:`Poller` drives both transports (CAN and ELM327). The driver asks
:meth:`Poller.next_request` with a monotonic ``now`` (ns); sends the :class:`Plan`'s payload;
collects the decoded answers of every ECU; and hands them to :meth:`Poller.on_answers`, which
returns the readings and events to emit. :meth:`Poller.next_time` says when to ask again: the
driver's one timer.

States::

    discover --(bitmaps done)--> run --(sleep_after silent requests)--> asleep
       ^                                                                   |
       +-------------------(any answer to a probe)-------------------------+

* discover: bitmap PIDs 0x00, 0x20, ... (functional) to learn which ECU supports what; then
  the VIN once (service 09), if enabled.
* run: each PID has a period; due PIDs are batched up to ``max_pids`` per request (6 on CAN,
  SAE J1979 s6.1.2). A PID no ECU answers is backed off: its period doubles per miss up to
  ``max_backoff`` times; an answer resets it. Stored and pending DTCs (services 03 and 07) are
  read every ``dtc_period``; service 04 (clear) is never sent by the poller.
* asleep: after ``sleep_after`` consecutive requests without any answer (ignition off, the
  ECUs sleep) only a probe (PID 0x00) goes out every ``probe_interval``; the first answer wakes
  the poller, which rediscovers (ECUs may differ after a restart) and resumes on its own.
  Entering and leaving sleep are events (``vehicle-asleep`` / ``vehicle-awake``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

from agent.errors import DecodeError
from agent.readings import Event, Reading, TimeStatus
from firmware_adapters.obd import pids as P
from firmware_adapters.obd.odometer import OdometerMonitor

NS = 1_000_000_000


@dataclass(frozen=True, slots=True)
class Plan:
    kind: str  # "bitmap" | "pids" | "vin" | "dtcs" | "probe"
    payload: bytes
    pids: tuple[int, ...] = ()
    expected: frozenset[int] = frozenset()  # ECUs known to answer: lets a request end early


@dataclass(slots=True)
class _PidState:
    period_ns: int
    due_ns: int = 0
    misses: int = 0


@dataclass(slots=True)
class Poller:
    periods_ns: Mapping[int, int]
    source: str = ""
    max_pids: int = P.MAX_PIDS_PER_REQUEST
    sleep_after: int = 3
    probe_interval_ns: int = 2 * NS
    max_backoff: int = 16
    read_vin: bool = True
    dtc_period_ns: int | None = 60 * NS
    counters: Counter[str] = field(default_factory=Counter)
    odometer: OdometerMonitor | None = None
    state: str = "discover"
    supported: dict[int, set[int]] = field(default_factory=dict)  # pid -> ECUs
    _asked_bitmaps: set[int] = field(default_factory=set)
    _pid_state: dict[int, _PidState] = field(default_factory=dict)
    _silent: int = 0
    _probe_due: int = 0
    _vin_done: bool = False
    _dtc_due: int = 0
    _pending_dtcs_next: bool = False
    _seen_events: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        for pid in self.periods_ns:
            P.pid_spec(pid)  # LocalProtocolError for a PID outside the table
        if self.odometer is None:
            self.odometer = OdometerMonitor(self.source)

    # -------------------------------------------------------------- what to send
    def next_request(self, now: int) -> Plan | None:
        if self.state == "asleep":
            if now < self._probe_due:
                return None
            self._probe_due = now + self.probe_interval_ns
            return Plan("probe", P.pid_request([0x00]), (0x00,))
        if self.state == "discover":
            pid = P.next_bitmap_pid(set(self.supported), self._asked_bitmaps)
            if pid is not None:
                return Plan("bitmap", P.pid_request([pid]), (pid,))
            self._start_run(now)
        if self.read_vin and not self._vin_done:
            self._vin_done = True
            return Plan("vin", P.vin_request())
        if self._pending_dtcs_next:
            self._pending_dtcs_next = False
            return Plan("dtcs", P.dtc_request(pending=True))
        if self.dtc_period_ns is not None and now >= self._dtc_due:
            self._dtc_due = now + self.dtc_period_ns
            self._pending_dtcs_next = True  # service 07 right after 03
            return Plan("dtcs", P.dtc_request())
        due = sorted((s.due_ns, pid) for pid, s in self._pid_state.items() if s.due_ns <= now)
        batch = tuple(pid for _, pid in due[:self.max_pids])
        if not batch:
            return None
        ecus = frozenset().union(*(self.supported.get(pid, set()) for pid in batch))
        return Plan("pids", P.pid_request(batch), batch, ecus)

    def next_time(self, now: int) -> int:
        """When :meth:`next_request` will next return a plan (``now`` if it would now)."""
        if self.state == "asleep":
            return max(now, self._probe_due)
        if self.state == "discover" or (self.read_vin and not self._vin_done) \
                or self._pending_dtcs_next:
            return now
        times = [s.due_ns for s in self._pid_state.values()]
        if self.dtc_period_ns is not None:
            times.append(self._dtc_due)
        return max(now, min(times)) if times else now + self.probe_interval_ns

    def _start_run(self, now: int) -> None:
        self.state = "run"
        self._pid_state = {}
        for pid, period in self.periods_ns.items():
            if pid in self.supported:
                self._pid_state[pid] = _PidState(period, now)
            else:
                self.counters["pid-unsupported"] += 1
        self._dtc_due = now

    # -------------------------------------------------------------- what came back
    def on_answers(self, plan: Plan, answers: Mapping[int, bytes], now: int, ts_ns: int,
                   time_status: TimeStatus = TimeStatus.SYNCED) -> list[Reading | Event]:
        """``answers``: ECU number -> complete payload. Returns what to emit, in order."""
        out: list[Reading | Event] = []
        decoded: dict[int, P.Answer] = {}
        for ecu, payload in sorted(answers.items()):
            try:
                decoded[ecu] = P.decode_answer(payload, plan.pids or None)
            except DecodeError as exc:
                self._bad(f"decode-{exc.reason}", str(exc), ts_ns, out, ecu)
        if not answers:
            self._silence(plan, now, ts_ns, out)
            return out
        if self.state == "asleep":
            self._wake(now, ts_ns, out)
            return out
        self._silent = 0
        for ecu, ans in decoded.items():
            if isinstance(ans, P.NegativeResponse):
                self._bad(f"nrc-{ans.reason}", f"ECU {ecu} refused service "
                          f"{ans.service:02X}: {ans.reason}", ts_ns, out, ecu)
        if plan.kind == "bitmap":
            self._on_bitmap(plan, decoded)
        elif plan.kind == "pids":
            self._on_values(plan, decoded, now, ts_ns, time_status, out)
        elif plan.kind == "vin":
            for ans in decoded.values():
                if isinstance(ans, P.Vin):
                    out.append(Reading("Vehicle.VehicleIdentification.VIN", ans.vin, "",
                                       ts_ns, time_status, self.source))
                    break
        elif plan.kind == "dtcs":
            dtcs = [a for a in decoded.values() if isinstance(a, P.Dtcs)]
            if dtcs:
                codes = sorted({c for a in dtcs for c in a.codes})
                name = "Vehicle.OBD.DTCList" if dtcs[0].service == P.SERVICE_STORED_DTCS \
                    else "Vehicle.OBD.DTCPendingList"
                out.append(Reading(name, ",".join(codes)[:256], "", ts_ns, time_status,
                                   self.source))
        return out

    def _on_bitmap(self, plan: Plan, decoded: Mapping[int, P.Answer]) -> None:
        self._asked_bitmaps.add(plan.pids[0])
        for ecu, ans in decoded.items():
            if isinstance(ans, P.SupportedPids):
                for pid in ans.pids:
                    self.supported.setdefault(pid, set()).add(ecu)

    def _on_values(self, plan: Plan, decoded: Mapping[int, P.Answer], now: int, ts_ns: int,
                   status: TimeStatus, out: list[Reading | Event]) -> None:
        got: dict[int, int | float] = {}
        for ans in decoded.values():  # lowest ECU number first: the first value wins
            if isinstance(ans, P.PidValues):
                for pid, value in ans.values:
                    if pid in got:
                        self.counters["duplicate-value"] += 1
                    else:
                        got[pid] = value
        for pid in plan.pids:
            st = self._pid_state[pid]
            if pid in got:
                st.misses = 0
                st.due_ns = now + st.period_ns
            else:
                st.misses += 1
                self.counters["pid-missed"] += 1
                st.due_ns = now + st.period_ns * min(2 ** st.misses, self.max_backoff)
        for pid, value in got.items():
            spec = P.PIDS[pid]
            out.append(Reading(spec.name, value, spec.unit, ts_ns, status, self.source))
        assert self.odometer is not None
        if 0x0D in got:
            self.odometer.speed(float(got[0x0D]))
        if 0xA6 in got:
            event = self.odometer.odometer(float(got[0xA6]), now, ts_ns)
            if event is not None:
                out.append(event)

    # -------------------------------------------------------------- sleep / wake
    def _silence(self, plan: Plan, now: int, ts_ns: int, out: list[Reading | Event]) -> None:
        self.counters["no-answer"] += 1
        if plan.kind == "pids":
            for pid in plan.pids:
                st = self._pid_state[pid]
                st.misses += 1
                st.due_ns = now + st.period_ns * min(2 ** st.misses, self.max_backoff)
        if plan.kind == "bitmap":
            self._asked_bitmaps.discard(plan.pids[0])
        if self.state == "asleep" or plan.kind in ("vin", "dtcs"):
            return  # ECUs may ignore services 09/03/07: that is not the car falling asleep
        self._silent += 1
        if self._silent >= self.sleep_after:
            self.state = "asleep"
            self._probe_due = now + self.probe_interval_ns
            assert self.odometer is not None
            self.odometer.asleep(now)
            out.append(Event("vehicle-asleep", f"no ECU answered {self._silent} requests: "
                             "ignition off or bus down; probing", ts_ns, self.source))

    def _wake(self, now: int, ts_ns: int, out: list[Reading | Event]) -> None:
        self.state = "discover"
        self._silent = 0
        self.supported = {}
        self._asked_bitmaps = set()
        self._vin_done = False
        assert self.odometer is not None
        self.odometer.awake(now)
        self.counters["wake"] += 1
        out.append(Event("vehicle-awake", "an ECU answered the probe: resuming", ts_ns,
                         self.source))

    def on_transport_errors(self, errors: list[DecodeError], ts_ns: int,
                            ecu: int = -1) -> list[Reading | Event]:
        """Frames that broke ISO-TP or the adapter's line format: counters, one event a kind."""
        out: list[Reading | Event] = []
        for exc in errors:
            self._bad(f"rx-{exc.reason}", str(exc), ts_ns, out, ecu)
        return out

    def _bad(self, code: str, message: str, ts_ns: int, out: list[Reading | Event],
             ecu: int) -> None:
        """Count every bad answer; emit an event for the first of each kind (no flooding)."""
        self.counters[code] += 1
        if code not in self._seen_events:
            self._seen_events.add(code)
            out.append(Event("obd-bad-answer", message[:512], ts_ns, self.source,
                             (("ecu", ecu), ("reason", code[:64]))))
