"""Poll schedule: discovery, batching, back-off, sleep/probe/wake, events. Time is passed in."""

from __future__ import annotations

from agent.readings import Event, Reading
from firmware_adapters.obd.scheduler import NS, Poller

BITMAP_00 = bytes.fromhex("4100") + (1 << 32 - 0x0C | 1 << 32 - 0x0D | 1 << 32 - 0x05
                                    | 1).to_bytes(4, "big")
BITMAP_20 = bytes.fromhex("4120") + (1 << 32 - (0x2F - 0x20) | 1).to_bytes(4, "big")
BITMAP_40 = bytes.fromhex("4140") + (1 << 32 - (0x5B - 0x40)).to_bytes(4, "big")
ANSWERS = {0x00: BITMAP_00, 0x20: BITMAP_20, 0x40: BITMAP_40}


def discovered(**kw: object) -> Poller:
    periods = {0x0C: NS, 0x0D: NS, 0x05: 10 * NS, 0x2F: 10 * NS, 0x5B: 5 * NS, 0xA6: NS}
    p = Poller(periods, source="t", read_vin=False, dtc_period_ns=None, **kw)  # type: ignore[arg-type]
    now = 0
    while (plan := p.next_request(now)) is not None and plan.kind == "bitmap":
        p.on_answers(plan, {0: ANSWERS[plan.pids[0]]}, now, now)
    assert p.state == "run" and plan is not None
    return p


def test_discovery_walks_the_bitmaps_then_polls_only_supported_pids() -> None:
    p = discovered()
    assert set(p.supported) >= {0x0C, 0x0D, 0x05, 0x2F, 0x5B}
    assert p.counters["pid-unsupported"] == 1  # 0xA6 not announced
    plan = p.next_request(0)
    assert plan is not None and plan.kind == "pids"
    assert len(plan.pids) == 5 and 0xA6 not in plan.pids
    assert plan.expected == frozenset({0})


def test_batches_hold_at_most_max_pids_and_respect_periods() -> None:
    p = discovered(max_pids=2)
    first = p.next_request(0)
    assert first is not None and len(first.pids) == 2
    values = {0x0C: b"\x1a\xf8", 0x0D: b"\x37", 0x05: b"\x7b", 0x2F: b"\xff", 0x5B: b"\x80"}
    payload = b"\x41" + b"".join(bytes((pid,)) + values[pid] for pid in first.pids)
    readings = p.on_answers(first, {0: payload}, 0, 123)
    assert [r.name for r in readings if isinstance(r, Reading)]
    assert all(r.ts_ns == 123 and r.source == "t" for r in readings)
    second = p.next_request(0)
    assert second is not None and not set(second.pids) & set(first.pids)
    assert p.next_time(0) == 0  # still due ones


def test_a_pid_nobody_answers_is_backed_off_exponentially() -> None:
    p = discovered()
    plan = p.next_request(0)
    assert plan is not None
    answered = [pid for pid in plan.pids if pid != 0x5B]
    values = {0x0C: b"\x1a\xf8", 0x0D: b"\x37", 0x05: b"\x7b", 0x2F: b"\xff"}
    p.on_answers(plan, {0: b"\x41" + b"".join(bytes((x,)) + values[x] for x in answered)}, 0, 0)
    assert p._pid_state[0x5B].due_ns == 5 * NS * 2
    assert p._pid_state[0x0D].due_ns == NS
    assert p.counters["pid-missed"] == 1


def test_silence_puts_the_poller_to_sleep_and_an_answer_wakes_it() -> None:
    p = discovered(sleep_after=3, probe_interval_ns=2 * NS, sleep_hold_ns=0, wake_after=1)
    events: list[Event] = []
    now = 0
    for _ in range(3):
        now = p.next_time(now)
        plan = p.next_request(now)
        assert plan is not None
        events += [e for e in p.on_answers(plan, {}, now, now) if isinstance(e, Event)]
    assert p.state == "asleep"
    assert [e.code for e in events] == ["vehicle-asleep"]
    assert p.next_request(now) is None  # nothing until the probe is due
    probe_at = p.next_time(now)
    assert probe_at == now + 2 * NS
    probe = p.next_request(probe_at)
    assert probe is not None and probe.kind == "probe" and probe.payload == b"\x01\x00"
    assert p.on_answers(probe, {}, probe_at, 0) == []  # still asleep: no event flood
    probe = p.next_request(probe_at + 2 * NS)
    assert probe is not None
    out = p.on_answers(probe, {0: BITMAP_00}, probe_at + 2 * NS, 7)
    assert [e.code for e in out if isinstance(e, Event)] == ["vehicle-awake"]
    assert p.state == "discover"
    nxt = p.next_request(probe_at + 2 * NS)
    assert nxt is not None and nxt.kind == "bitmap"


def test_negative_responses_and_bad_answers_become_one_event_each_and_counters() -> None:
    p = discovered()
    plan = p.next_request(0)
    assert plan is not None
    out = p.on_answers(plan, {0: bytes.fromhex("7F0122"), 1: b"\x41\x0d"}, 0, 0)
    assert sorted(e.details[1][1] for e in out if isinstance(e, Event)) == [
        "decode-truncated", "nrc-conditions-not-correct"]
    out = p.on_answers(plan, {0: bytes.fromhex("7F0122")}, 0, 0)
    assert not [e for e in out if isinstance(e, Event)]
    assert p.counters["nrc-conditions-not-correct"] == 2


def bitmap_answer(base: int, pids: set[int]) -> bytes:
    bits = sum(1 << 32 - (pid - base) for pid in pids if base < pid <= base + 32)
    bits |= 1 if any(pid > base + 32 for pid in pids) else 0
    return bytes((0x41, base)) + bits.to_bytes(4, "big")


def discover(p: Poller, pids: set[int]) -> None:
    while (plan := p.next_request(0)) is not None and plan.kind == "bitmap":
        p.on_answers(plan, {0: bitmap_answer(plan.pids[0], pids)}, 0, 0)


def test_vin_and_dtcs_are_read() -> None:
    p = Poller({0x0D: NS}, read_vin=True, dtc_period_ns=60 * NS)
    discover(p, {0x0D})
    for pid in (0x04, 0x0A):  # the VIN plan was taken by discover(); then CALIDs, ECU name
        plan = p.next_request(0)
        assert plan is not None and plan.kind == "info" and plan.payload == bytes((9, pid))
    plan = p.next_request(0)
    assert plan is not None and plan.kind == "dtcs"
    (dtcs,) = p.on_answers(plan, {0: bytes.fromhex("43010143"), 1: bytes.fromhex("4300")},
                           0, 0)
    assert isinstance(dtcs, Reading) and dtcs.value == "P0143"
    plan = p.next_request(0)
    assert plan is not None and plan.kind == "freeze"  # a new stored DTC: its freeze frame
    assert plan.payload == bytes((0x02, 0x02, 0x00, 0x0D, 0x00))
    (ff,) = p.on_answers(plan, {0: bytes.fromhex("42020001430D0037")}, 0, 0)
    assert isinstance(ff, Event) and ff.code == "obd-freeze-frame"
    assert dict(ff.details) == {"ecu": 0, "frame": 0, "dtc": "P0143", "SPEED": 0x37}
    plan = p.next_request(0)
    assert plan is not None and plan.payload == b"\x07"  # pending DTCs right after stored
    (pending,) = p.on_answers(plan, {0: bytes.fromhex("47010A80")}, 0, 0)
    assert isinstance(pending, Reading) and pending.name == "Vehicle.OBD.DTCPendingList"
    assert pending.value == "P0A80"
    plan = p.next_request(0)
    assert plan is not None and plan.payload == b"\x0a"  # and permanent DTCs
    (permanent,) = p.on_answers(plan, {0: bytes.fromhex("4A00")}, 0, 0)
    assert isinstance(permanent, Reading) and permanent.name == "Vehicle.OBD.DTCPermanentList"
    assert permanent.value == ""
    p = Poller({0x0D: NS}, read_vin=True, dtc_period_ns=None)
    for base in (0x00,):
        plan = p.next_request(0)
        assert plan is not None
        p.on_answers(plan, {0: bitmap_answer(base, {0x0D})}, 0, 0)
    plan = p.next_request(0)
    assert plan is not None and plan.kind == "vin"
    (vin,) = p.on_answers(plan, {0: b"\x49\x02\x01WP0ZZZ99ZTS390000"}, 0, 0)
    assert isinstance(vin, Reading) and vin.value == "WP0ZZZ99ZTS390000"


def test_odometer_going_back_is_an_event() -> None:
    p = Poller({0xA6: NS, 0x0D: NS}, read_vin=False, dtc_period_ns=None)
    discover(p, {0x0D, 0xA6})
    plan = p.next_request(0)
    assert plan is not None and set(plan.pids) == {0x0D, 0xA6}
    p.on_answers(plan, {0: bytes.fromhex("410D00A60001E240")}, 0, 0)
    plan = p.next_request(NS)
    assert plan is not None
    out = p.on_answers(plan, {0: bytes.fromhex("410D00A60001E000")}, NS, 5)
    (event,) = [e for e in out if isinstance(e, Event)]
    assert event.code == "odometer-decreased" and event.ts_ns == 5


def test_unanswered_vin_and_dtc_requests_do_not_put_the_car_to_sleep() -> None:
    p = Poller({0x0D: NS}, read_vin=True, dtc_period_ns=NS, sleep_after=2)
    discover(p, {0x0D})  # takes the VIN plan (unanswered)
    for _ in range(4):
        plan = p.next_request(0)
        assert plan is not None
        if plan.kind == "dtcs":
            assert p.on_answers(plan, {}, 0, 0) == []
    assert p.state == "run"


def silent_round(p: Poller, now: int) -> list[Event]:
    plan = p.next_request(now)
    assert plan is not None
    return [e for e in p.on_answers(plan, {}, now, now) if isinstance(e, Event)]


def test_sleep_needs_silence_for_the_hold_time_and_wake_needs_two_answers() -> None:
    p = discovered(sleep_after=2, probe_interval_ns=NS, sleep_hold_ns=5 * NS, wake_after=2)
    now, got = 0, []
    while now < 4 * NS:  # silent requests for 4 s: not yet 5 s of silence
        got += silent_round(p, now)
        now = p.next_time(now + 1)
    assert got == [] and p.state == "run" and p.counters["no-answer"] >= 2
    now = max(now, 5 * NS)
    assert [e.code for e in silent_round(p, p.next_time(now))] == ["vehicle-asleep"]
    now = p.next_time(now)
    probe = p.next_request(now + NS)
    assert probe is not None and probe.kind == "probe"
    assert p.on_answers(probe, {0: BITMAP_00}, now + NS, 0) == []  # one answer is not enough
    again = p.next_request(now + NS)  # the confirming probe goes out at once
    assert again is not None and again.kind == "probe"
    out = p.on_answers(again, {0: BITMAP_00}, now + NS, 0)
    assert [e.code for e in out if isinstance(e, Event)] == ["vehicle-awake"]


def test_adapter_faults_never_put_the_car_to_sleep() -> None:
    p = discovered(sleep_after=1, sleep_hold_ns=0)
    for now in range(NS, 50 * NS, NS):
        plan = p.next_request(now) or p.next_request(p.next_time(now))
        assert plan is not None
        assert p.on_answers(plan, {}, now, now, silent=False) == []
        assert p.on_answers(plan, {}, now, now, silent=False, heard=True) == []
    assert p.state == "run" and p.counters["no-answer-fault"] == 49
    assert p.counters["no-answer-heard"] == 49 and p.counters["no-answer"] == 0


def test_a_flapping_link_doubles_the_hold_so_events_cannot_flood() -> None:
    p = discovered(sleep_after=1, probe_interval_ns=NS, sleep_hold_ns=NS, wake_after=1,
                   flap_window_ns=60 * NS)
    now, codes, asleep_at = 0, [], []
    while now < 600 * NS:  # ten minutes of a link that answers one request in two
        now += NS // 2
        plan = p.next_request(now)
        if plan is None:
            continue
        answered = (now // (NS // 2)) % 2 == 0
        answer = {0: BITMAP_00 if plan.kind in ("probe", "bitmap") else b"\x41\x0d\x10"}
        out = p.on_answers(plan, answer if answered else {}, now, now)
        for e in out:
            if isinstance(e, Event):
                codes.append(e.code)
                if e.code == "vehicle-asleep":
                    asleep_at.append(now)
    # without hysteresis this would be hundreds of pairs; with it the holds grow to 16 s
    assert 0 < codes.count("vehicle-asleep") <= 60
    gaps = [b - a for a, b in zip(asleep_at, asleep_at[1:], strict=False)]
    assert not gaps or max(gaps) >= 16 * NS


FOUR = {0x04: NS, 0x05: NS, 0x0C: NS, 0x0D: NS}  # bench/steady.py: 4 PIDs at 1 Hz
VALUES = {0x04: b"\x80", 0x05: b"\x5f", 0x0C: b"\x1a\xf8", 0x0D: b"\x37"}


def four_pids() -> Poller:
    p = Poller(FOUR, source="t", read_vin=False, dtc_period_ns=None)
    discover(p, set(FOUR))
    return p


def poll_for(p: Poller, seconds: int, latency_ns: int) -> tuple[int, int]:
    """Drive the poller as the source does, each answer ``latency_ns`` after its request;
    returns (requests, readings) sent and made before ``seconds`` of poller time."""
    now = requests = readings = 0
    while now < seconds * NS:
        plan = p.next_request(now)
        if plan is None:
            now = p.next_time(now)
            continue
        requests += 1
        now += latency_ns
        payload = b"\x41" + b"".join(bytes((pid,)) + VALUES[pid] for pid in plan.pids)
        readings += sum(isinstance(r, Reading) for r in p.on_answers(plan, {0: payload},
                                                                     now, now))
    return requests, readings


def test_the_request_latency_does_not_stretch_the_period() -> None:
    # Fixed rate: 4 PIDs at 1 Hz over an adapter taking 200 ms per request are 4 readings
    # a second (a period counted from each answer made it 1.2 s: 200 in 60 s, not 240).
    assert poll_for(four_pids(), 60, NS // 5) == (60, 240)


def test_a_poller_late_by_more_than_a_period_asks_at_once_without_a_burst() -> None:
    # 2.5 s per request for a 1 s period: back to back (24 in 60 s), never a catch-up of
    # the missed slots, and every request still asks all four PIDs.
    p = four_pids()
    requests, readings = poll_for(p, 60, 5 * NS // 2)
    assert (requests, readings) == (24, 96)
    assert p.next_time(60 * NS) == 60 * NS


def test_a_garbled_answer_is_asked_again_at_its_period_not_backed_off() -> None:
    # ELM327-emulator merges a second ECU's frame into a multi-PID answer ("41 04 00 41 04
    # 00 05 .."): an ECU answered, not in J1979 form. Reported once, counted, and the PIDs
    # are due again one period later; backing them off cost 2 s of readings each time.
    p = four_pids()
    plan = p.next_request(0)
    assert plan is not None and set(plan.pids) == set(FOUR)
    out = p.on_answers(plan, {0: bytes.fromhex("410400410400055f0c1af80d37")}, 0, 0)
    assert [(e.code, e.details[1][1]) for e in out if isinstance(e, Event)] == [
        ("obd-bad-answer", "decode-unexpected-pid")]
    assert p.counters["pid-missed"] == 0
    assert p.next_time(0) == NS
    again = p.next_request(NS)
    assert again is not None and set(again.pids) == set(FOUR)
    # Nobody answering at all still backs them off.
    p.on_answers(again, {}, NS, NS)
    assert p.counters["no-answer"] == 1 and p.next_time(NS) == NS + 2 * NS
