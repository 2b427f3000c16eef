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
  the VIN, calibration IDs and ECU name once (service 09 PIDs 02/04/0A), if enabled. A
  source with no PIDs configured (an EV read through its UDS profile only) skips discovery.
* run: each PID has a period; due PIDs are batched up to ``max_pids`` per request (6 on CAN,
  SAE J1979 s6.1.2). The schedule is fixed-rate: a PID answered is next due one period
  after its previous due time, not after the answer (else every cycle would grow by the
  request's latency: 4 PIDs at 1 Hz over an ELM327 taking 0.2 s per request gave 3.3
  readings/s, not 4); a PID more than a period late is asked again at once, never in a
  catch-up burst. A PID no ECU answers is backed off: its period doubles per miss up to
  ``max_backoff`` times; an answer resets it. Stored, pending and permanent DTCs (services
  03, 07, 0A) are read every ``dtc_period``; a stored DTC not seen before brings a freeze
  frame (service 02, frame 0) as an ``obd-freeze-frame`` event. Service 04 (clear) is never
  sent by the poller. The DIDs of a UDS profile (:mod:`~firmware_adapters.obd.uds`) are
  polled each on its own period, one physical request each, backed off like PIDs.
* asleep: only a probe (PID 0x00, or the profile's first DID when no PID is configured)
  goes out every ``probe_interval``.

Asleep means the car said nothing at all: the transport reports each exchange as answered,
*heard* (frames came, but broken: lost last frame, wrong sequence), *silent* (nothing from
any ECU: ``NO DATA``, no frame on the bus) or an adapter *fault* (``STOPPED``, ``BUFFER
FULL``, ``?``, garbage, a mismatched reply). Only silence counts towards sleep; a fault is
counted and changes nothing. Hysteresis, so a flaky link cannot flood the spool with
``vehicle-asleep`` / ``vehicle-awake`` pairs:

* asleep needs ``sleep_after`` silent requests in a row *and* ``sleep_hold`` of silence
  since anything was last heard; if the car was awake for less than ``flap_window`` before
  that, the next hold doubles (up to 16x), a longer awake stretch resets it;
* awake needs ``wake_after`` answered probes in a row (the next probe follows at once).

Entering and leaving sleep are events; on waking the poller rediscovers (ECUs may differ).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

from agent.errors import DecodeError
from agent.readings import Event, Reading, TimeStatus
from firmware_adapters.obd import pids as P
from firmware_adapters.obd.odometer import OdometerMonitor
from firmware_adapters.obd.requester import Route
from firmware_adapters.obd.uds import Did, Profile

NS = 1_000_000_000
MAX_HOLD_FACTOR = 16
DTC_SERVICES = {P.SERVICE_STORED_DTCS: "Vehicle.OBD.DTCList",
                P.SERVICE_PENDING_DTCS: "Vehicle.OBD.DTCPendingList",
                P.SERVICE_PERMANENT_DTCS: "Vehicle.OBD.DTCPermanentList"}
INFO_NAMES = {P.CALID_PID: "Vehicle.OBD.CalibrationIDs", P.ECU_NAME_PID: "Vehicle.OBD.ECUName"}


@dataclass(frozen=True, slots=True)
class Plan:
    kind: str  # "bitmap" | "pids" | "vin" | "info" | "dtcs" | "freeze" | "did" | "probe"
    payload: bytes
    pids: tuple[int, ...] = ()
    expected: frozenset[int] = frozenset()  # ECUs known to answer: lets a request end early
    route: Route | None = None  # physical ids of a profile ECU (kind "did")
    did: Did | None = None


@dataclass(slots=True)
class _PidState:
    period_ns: int
    due_ns: int = 0
    misses: int = 0


def _served(st: _PidState, now: int) -> None:
    """Asked and done with: next due one period after the due time just served (fixed
    rate), or now if that is past already (late by more than a period: no burst)."""
    st.due_ns = max(st.due_ns + st.period_ns, now)


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
    profile: Profile | None = None
    did_period_ns: int | None = None  # overrides every DID's own period when set
    sleep_hold_ns: int = 5 * NS
    wake_after: int = 2
    flap_window_ns: int = 60 * NS
    counters: Counter[str] = field(default_factory=Counter)
    odometer: OdometerMonitor | None = None
    state: str = "discover"
    supported: dict[int, set[int]] = field(default_factory=dict)  # pid -> ECUs
    _asked_bitmaps: set[int] = field(default_factory=set)
    _pid_state: dict[int, _PidState] = field(default_factory=dict)
    _did_state: dict[int, _PidState] = field(default_factory=dict)  # index in profile.dids
    _silent: int = 0
    _last_heard: int | None = None
    _awake_since: int = 0
    _hold_factor: int = 1
    _wake_answers: int = 0
    _probe_due: int = 0
    _info_todo: list[int] = field(default_factory=list)
    _dtc_due: int = 0
    _dtc_todo: list[int] = field(default_factory=list)
    _freeze_todo: list[str] = field(default_factory=list)
    _known_dtcs: set[str] = field(default_factory=set)
    _seen_events: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        for pid in self.periods_ns:
            P.pid_spec(pid)  # LocalProtocolError for a PID outside the table
        if self.odometer is None:
            self.odometer = OdometerMonitor(self.source)
        self._reset_info()

    def _reset_info(self) -> None:
        self._info_todo = [P.VIN_PID, P.CALID_PID, P.ECU_NAME_PID] if self.read_vin else []

    # -------------------------------------------------------------- what to send
    def next_request(self, now: int) -> Plan | None:
        if self.state == "asleep":
            if now < self._probe_due:
                return None
            self._probe_due = now + self.probe_interval_ns
            return self._probe()
        if self.state == "discover":
            pid = P.next_bitmap_pid(set(self.supported), self._asked_bitmaps) \
                if self.periods_ns else None
            if pid is not None:
                return Plan("bitmap", P.pid_request([pid]), (pid,))
            self._start_run(now)
        if self._info_todo:
            pid = self._info_todo.pop(0)
            return Plan("vin" if pid == P.VIN_PID else "info", P.info_request(pid), (pid,))
        if self._freeze_todo:
            return self._freeze_plan()
        if not self._dtc_todo and self.dtc_period_ns is not None and now >= self._dtc_due:
            self._dtc_due = now + self.dtc_period_ns
            self._dtc_todo = list(DTC_SERVICES)  # 03, then 07 and 0A right after
        if self._dtc_todo:
            service = self._dtc_todo.pop(0)
            return Plan("dtcs", bytes((service,)))
        due = sorted((s.due_ns, pid) for pid, s in self._pid_state.items() if s.due_ns <= now)
        did_due = sorted((s.due_ns, i) for i, s in self._did_state.items() if s.due_ns <= now)
        if did_due and (not due or did_due[0][0] < due[0][0]):
            assert self.profile is not None
            did = self.profile.dids[did_due[0][1]]
            return Plan("did", did.request, route=did.route, did=did)
        batch = tuple(pid for _, pid in due[:self.max_pids])
        if not batch:
            return None
        ecus = frozenset().union(*(self.supported.get(pid, set()) for pid in batch))
        return Plan("pids", P.pid_request(batch), batch, ecus)

    def _probe(self) -> Plan:
        if not self.periods_ns and self.profile is not None:
            did = self.profile.dids[0]  # an EV read through its profile only
            return Plan("probe", did.request, route=did.route, did=did)
        return Plan("probe", P.pid_request([0x00]), (0x00,))

    def _freeze_plan(self) -> Plan:
        self._freeze_todo.pop(0)
        extra = [pid for pid in sorted(self._pid_state)
                 if P.PIDS[pid].composite is None][:P.MAX_FREEZE_PAIRS - 1]
        pids = (P.FREEZE_DTC_PID, *extra)
        return Plan("freeze", P.freeze_frame_request(pids), pids)

    def next_time(self, now: int) -> int:
        """When :meth:`next_request` will next return a plan (``now`` if it would now)."""
        if self.state == "asleep":
            return max(now, self._probe_due)
        if self.state == "discover" or self._info_todo or self._dtc_todo or self._freeze_todo:
            return now
        times = [s.due_ns for s in (*self._pid_state.values(), *self._did_state.values())]
        if self.dtc_period_ns is not None:
            times.append(self._dtc_due)
        return max(now, min(times)) if times else now + self.probe_interval_ns

    def _start_run(self, now: int) -> None:
        self.state = "run"
        self._awake_since = now
        self._pid_state = {}
        for pid, period in self.periods_ns.items():
            if pid in self.supported:
                self._pid_state[pid] = _PidState(period, now)
            else:
                self.counters["pid-unsupported"] += 1
        dids = self.profile.dids if self.profile is not None else ()
        self._did_state = {i: _PidState(self.did_period_ns or d.period_ns, now)
                           for i, d in enumerate(dids)}
        self._dtc_due = now

    # -------------------------------------------------------------- what came back
    def on_answers(self, plan: Plan, answers: Mapping[int, bytes], now: int, ts_ns: int,
                   time_status: TimeStatus = TimeStatus.SYNCED, *, silent: bool | None = None,
                   heard: bool = False) -> list[Reading | Event]:
        """``answers``: ECU number -> complete payload. ``silent``: the transport saw nothing
        at all from the car (default: no answers); ``heard``: frames came but made no answer.
        Neither silent nor answered nor heard is an adapter fault. Returns what to emit."""
        out: list[Reading | Event] = []
        if silent is None:
            silent = not answers and not heard
        if answers or heard:
            self._last_heard = now
        if not answers:
            if silent:
                self._silence(plan, now, ts_ns, out)
            else:
                self.counters["no-answer-heard" if heard else "no-answer-fault"] += 1
                self._not_answered(plan, now, backoff=False)
                if self.state == "asleep" and not heard:
                    self._wake_answers = 0
            return out
        if self.state == "asleep":
            self._wake_answers += 1
            if self._wake_answers >= self.wake_after:
                self._wake(now, ts_ns, out)
            else:
                self._probe_due = now  # confirm at once: hysteresis, not delay
            return out
        self._silent = 0
        if plan.kind == "did":
            assert plan.did is not None
            self._on_did(plan.did, answers, now, ts_ns, time_status, out)
            return out
        decoded: dict[int, P.Answer] = {}
        for ecu, payload in sorted(answers.items()):
            try:
                decoded[ecu] = P.decode_answer(payload, plan.pids or None)
            except DecodeError as exc:
                self._bad(f"decode-{exc.reason}", str(exc), ts_ns, out, ecu)
        for ecu, ans in decoded.items():
            if isinstance(ans, P.NegativeResponse):
                self._bad(f"nrc-{ans.reason}", f"ECU {ecu} refused service "
                          f"{ans.service:02X}: {ans.reason}", ts_ns, out, ecu)
        if plan.kind == "bitmap":
            self._on_bitmap(plan, decoded)
        elif plan.kind == "pids":
            garbled = len(decoded) < len(answers)  # an ECU answered, but not in J1979 form
            self._on_values(plan, decoded, now, ts_ns, time_status, out, garbled)
        elif plan.kind in ("vin", "info"):
            self._on_info(decoded, ts_ns, time_status, out)
        elif plan.kind == "dtcs":
            self._on_dtcs(decoded, ts_ns, time_status, out)
        elif plan.kind == "freeze":
            self._on_freeze(decoded, ts_ns, out)
        return out

    def _on_info(self, decoded: Mapping[int, P.Answer], ts_ns: int, status: TimeStatus,
                 out: list[Reading | Event]) -> None:
        for ans in decoded.values():
            if isinstance(ans, P.Vin):
                out.append(Reading("Vehicle.VehicleIdentification.VIN", ans.vin, "",
                                   ts_ns, status, self.source))
                return
        infos = [a for a in decoded.values() if isinstance(a, P.VehicleInfo)]
        if infos:
            text = ",".join(item for a in infos for item in a.items)
            out.append(Reading(INFO_NAMES[infos[0].pid], text[:256], "", ts_ns, status,
                               self.source))

    def _on_dtcs(self, decoded: Mapping[int, P.Answer], ts_ns: int, status: TimeStatus,
                 out: list[Reading | Event]) -> None:
        dtcs = [a for a in decoded.values() if isinstance(a, P.Dtcs)]
        if not dtcs:
            return
        codes = sorted({c for a in dtcs for c in a.codes})
        out.append(Reading(DTC_SERVICES[dtcs[0].service], ",".join(codes)[:256], "", ts_ns,
                           status, self.source))
        if dtcs[0].service == P.SERVICE_STORED_DTCS:
            new = [c for c in codes if c not in self._known_dtcs]
            self._known_dtcs = set(codes)
            if new and self._pid_state:
                self._freeze_todo = new[:1]  # frame 0 belongs to one DTC (J1979 s6.2)

    def _on_freeze(self, decoded: Mapping[int, P.Answer], ts_ns: int,
                   out: list[Reading | Event]) -> None:
        for ecu, ans in decoded.items():
            if not isinstance(ans, P.FreezeFrame):
                continue
            details: list[tuple[str, int | str]] = [("ecu", ecu), ("frame", ans.frame),
                                                    ("dtc", ans.dtc or "")]
            for pid, value in ans.values:
                details.append((P.PIDS[pid].key, value if isinstance(value, int)
                                else repr(value)))
            out.append(Event("obd-freeze-frame", f"freeze frame {ans.frame} stored with "
                             f"{ans.dtc or 'no DTC'}", ts_ns, self.source, tuple(details)))
            return

    def _on_did(self, did: Did, answers: Mapping[int, bytes], now: int, ts_ns: int,
                status: TimeStatus, out: list[Reading | Event]) -> None:
        assert self.profile is not None
        index = self.profile.dids.index(did)
        st = self._did_state.get(index)
        payload = answers.get(0)
        got: tuple[P.Signal, ...] | P.NegativeResponse | None = None
        if payload is not None:
            try:
                got = did.decode(payload)
            except DecodeError as exc:
                self._bad(f"decode-{exc.reason}", f"DID {did.did:04X}: {exc}", ts_ns, out, 0)
        if isinstance(got, P.NegativeResponse):
            self._bad(f"nrc-{got.reason}", f"{did.ecu} refused DID {did.did:04X}: "
                      f"{got.reason}", ts_ns, out, 0)
            got = None
        if st is not None:
            if got:
                st.misses = 0
                _served(st, now)
            else:
                self._miss(st, now)
        for name, unit, value in got or ():
            out.append(Reading(name, value, unit, ts_ns, status, self.source))
            self._integrity(name, value, now, ts_ns, out)

    def _on_bitmap(self, plan: Plan, decoded: Mapping[int, P.Answer]) -> None:
        self._asked_bitmaps.add(plan.pids[0])
        for ecu, ans in decoded.items():
            if isinstance(ans, P.SupportedPids):
                for pid in ans.pids:
                    self.supported.setdefault(pid, set()).add(ecu)

    def _on_values(self, plan: Plan, decoded: Mapping[int, P.Answer], now: int, ts_ns: int,
                   status: TimeStatus, out: list[Reading | Event], garbled: bool) -> None:
        """Readings of a PID answer. A PID without a value is backed off only when no
        ECU answered the request at all: an answer that did not decode (counted and
        reported by on_answers) says an ECU is there, so the PID is asked again at its
        period (a backed-off 1 Hz PID went quiet for 2 s after every garbled answer)."""
        got: dict[int, tuple[P.Signal, ...]] = {}
        for ans in decoded.values():  # lowest ECU number first: the first value wins
            if isinstance(ans, P.PidValues):
                pairs = [(pid, ((P.PIDS[pid].name, P.PIDS[pid].unit, v),))
                         for pid, v in ans.values]
                for pid, signals in (*pairs, *ans.signals):
                    if pid in got:
                        self.counters["duplicate-value"] += 1
                    else:
                        got[pid] = signals
        for pid in plan.pids:
            st = self._pid_state[pid]
            if pid in got:
                st.misses = 0
                _served(st, now)
            elif garbled:
                _served(st, now)
            else:
                self.counters["pid-missed"] += 1
                self._miss(st, now)
        for signals in got.values():
            for name, unit, value in signals:
                out.append(Reading(name, value, unit, ts_ns, status, self.source))
        for signals in got.values():
            for name, _, value in signals:
                self._integrity(name, value, now, ts_ns, out)

    def _integrity(self, name: str, value: int | float | str, now: int, ts_ns: int,
                   out: list[Reading | Event]) -> None:
        """Speed and odometer from any PID or DID feed the odometer monitor."""
        assert self.odometer is not None
        if isinstance(value, str):
            return
        if name == "Vehicle.Speed":
            self.odometer.speed(float(value))
        elif name == "Vehicle.TraveledDistance":
            event = self.odometer.odometer(float(value), now, ts_ns)
            if event is not None:
                out.append(event)

    def _miss(self, st: _PidState, now: int) -> None:
        st.misses += 1
        st.due_ns = now + st.period_ns * min(2 ** st.misses, self.max_backoff)

    def _not_answered(self, plan: Plan, now: int, *, backoff: bool) -> None:
        """A request nobody answered: back its PIDs / DID off (``backoff``), or, for an
        adapter fault, simply ask again at the next period."""
        states: list[_PidState] = []
        if plan.kind == "pids":
            states = [self._pid_state[pid] for pid in plan.pids]
        elif plan.kind == "did" and plan.did is not None and self.profile is not None:
            st = self._did_state.get(self.profile.dids.index(plan.did))
            states = [st] if st is not None else []
        for st in states:
            if backoff:
                self._miss(st, now)
            else:
                _served(st, now)
        if plan.kind == "bitmap":
            self._asked_bitmaps.discard(plan.pids[0])

    # -------------------------------------------------------------- sleep / wake
    def _silence(self, plan: Plan, now: int, ts_ns: int, out: list[Reading | Event]) -> None:
        self.counters["no-answer"] += 1
        self._not_answered(plan, now, backoff=True)
        if self.state == "asleep":
            self._wake_answers = 0
            return
        if plan.kind in ("vin", "info", "dtcs", "freeze"):
            return  # ECUs may ignore services 09/03/07/0A/02: that is not the car falling asleep
        self._silent += 1
        quiet_since = self._last_heard if self._last_heard is not None else self._awake_since
        hold = self.sleep_hold_ns * self._hold_factor
        if self._silent < self.sleep_after or now - quiet_since < hold:
            return
        awake_for = now - self._awake_since
        self._hold_factor = min(self._hold_factor * 2, MAX_HOLD_FACTOR) \
            if awake_for < self.flap_window_ns else 1
        if self._hold_factor > 1:
            self.counters["sleep-flapping"] += 1
        self.state = "asleep"
        self._wake_answers = 0
        self._probe_due = now + self.probe_interval_ns
        assert self.odometer is not None
        self.odometer.asleep(now)
        out.append(Event("vehicle-asleep", f"no ECU answered {self._silent} requests for "
                         f"{(now - quiet_since) / NS:.1f} s: ignition off or bus down; probing",
                         ts_ns, self.source))

    def _wake(self, now: int, ts_ns: int, out: list[Reading | Event]) -> None:
        self.state = "discover"
        self._silent = 0
        self._wake_answers = 0
        self._awake_since = now
        self._last_heard = now
        self.supported = {}
        self._asked_bitmaps = set()
        self._reset_info()
        assert self.odometer is not None
        self.odometer.awake(now)
        self.counters["wake"] += 1
        out.append(Event("vehicle-awake", f"an ECU answered {self.wake_after} probes: resuming",
                         ts_ns, self.source))

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
