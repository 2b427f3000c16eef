"""``elm327`` source against ELM327-emulator (scenario ``car``) on a pty, a reconnect after
the adapter vanishes, and a scripted hostile adapter for the lines no real peer sends on demand.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
from elm import obd_message

from agent.readings import Event, Reading
from firmware_adapters.obd.serial_driver import Elm327Source
from tests.firmware_adapters.obd.peers import (
    _stop,
    _wait_for,
    collect,
    emulator_values,
    events,
    named,
    start_emulator,
)

FAST = {"SPEED": 0.05, "RPM": 0.05, "COOLANT_TEMP": 0.05, "ENGINE_LOAD": 0.05,
        "INTAKE_TEMP": 0.05, "THROTTLE_POS": 0.05}


def emulator_vin() -> str:
    first = obd_message.ObdMessage["car"]["VIN"]["Response"][0]
    data = re.findall(r"<pos_answer>(.*?)</pos_answer>", first)[0].split()
    return bytes.fromhex("".join(data[1:])).decode()  # after the item count byte


def test_decoded_values_equal_what_the_emulator_defines(elm_port: str) -> None:
    src = Elm327Source.from_options("elm", {"port": elm_port, "pids": FAST}, "t.toml")
    items = asyncio.run(collect(src, lambda xs: len(named(xs, "Vehicle.Speed")) >= 6, 60))
    # The emulator answers each PID from its list in sequence (Choice.SEQUENTIAL); formulas
    # below are SAE J1979's, applied to the bytes read from the emulator's own table.
    expect = {
        "Vehicle.Speed": [v[0] for v in emulator_values("SPEED")],
        "Vehicle.OBD.EngineSpeed": [(256 * v[0] + v[1]) / 4 for v in emulator_values("RPM")],
        "Vehicle.OBD.CoolantTemperature": [v[0] - 40 for v in emulator_values("COOLANT_TEMP")],
        "Vehicle.OBD.EngineLoad": [v[0] * 100 / 255 for v in emulator_values("ENGINE_LOAD")],
        "Vehicle.OBD.IntakeTemp": [v[0] - 40 for v in emulator_values("INTAKE_TEMP")],
        "Vehicle.OBD.ThrottlePosition": [v[0] * 100 / 255 for v in emulator_values("THROTTLE_POS")],
    }
    # A response that carries a second ECU's frame (header 7EA) is merged by the emulator into
    # the multi-PID answer as if it were more PIDs: that answer does not parse and is refused
    # whole. Every request advances all six PID counters, so request k gets entry k of each list.
    from elm.obd_message import ObdMessage
    keys = ("SPEED", "RPM", "COOLANT_TEMP", "ENGINE_LOAD", "INTAKE_TEMP", "THROTTLE_POS")

    def merged(k: int) -> bool:
        rs = [ObdMessage["car"][key]["Response"] for key in keys]
        return any(r[k % len(r)].count("<header>") > 1 for r in rs)

    for name, values in expect.items():
        got = [r.value for r in named(items, name)]
        assert len(got) >= 5, name
        want = [values[k % len(values)] for k in range(40) if not merged(k)][:len(got)]
        assert got == pytest.approx(want, abs=1e-5), name
    n = len(named(items, "Vehicle.Speed"))
    assert src.counters["decode-unexpected-pid"] >= sum(merged(k) for k in range(n)) >= 1
    (vin,) = named(items, "Vehicle.VehicleIdentification.VIN")
    assert vin.value == emulator_vin() == "WP0ZZZ99ZTS390000"
    (dtcs,) = named(items, "Vehicle.OBD.DTCList")
    assert dtcs.value == ",".join("P" + c for c in obd_message.DTC_STORED)
    assert src.requests["pids"] >= 6 and "request-pids" not in src.counters
    assert all(r.source == "elm" for r in named(items, "Vehicle.Speed"))


def test_emulator_odometer_answer_with_a_wrong_service_byte_is_flagged(elm_port: str) -> None:
    # The 'car' scenario answers 01 A6 with "61 A6 ..." (service 0x21's answer byte): a reply
    # that does not answer its request. It must be reported, never decoded as mileage, and
    # the driver resynchronises with the adapter (the reply may belong to another command).
    from elm.obd_message import ObdMessage
    assert all("<data>61 A6" in r for r in ObdMessage["car"]["ODOMETER"]["Response"])
    src = Elm327Source.from_options("elm", {"port": elm_port, "pids": {"ODOMETER": 0.05,
                                                                        "SPEED": 0.05}}, "t")

    def mismatch_seen(xs: list[Reading | Event]) -> bool:
        # 01 A6 is asked alone once its back-off parts it from SPEED (a multi-PID request
        # gets no A6 answer from the emulator at all)
        return len(named(xs, "Vehicle.Speed")) >= 3 and src.counters["elm-resync"] >= 1

    items = asyncio.run(collect(src, mismatch_seen, 60))
    assert not named(items, "Vehicle.TraveledDistance")
    assert any(e.code == "obd-bad-answer" and ("reason", "rx-mismatch")
               in e.details for e in events(items))
    assert src.counters["rx-mismatch"] >= 1 and src.counters["elm-resync"] >= 1


def test_a_garbled_multi_pid_answer_costs_one_cycle_never_a_back_off(elm_port: str) -> None:
    # bench/steady.py's 4 PIDs at 1 Hz gave 3.3 readings/s: the emulator merges the second
    # ECU's frame of one ENGINE_LOAD answer in its list into the multi-PID answer (which
    # then does not parse), and the poller backed all four PIDs off for it. An answer that
    # does not parse is an ECU answering: reported, and the PIDs asked again at their period.
    four = {"SPEED": 0.05, "RPM": 0.05, "COOLANT_TEMP": 0.05, "ENGINE_LOAD": 0.05}
    src = Elm327Source.from_options("elm", {"port": elm_port, "pids": four, "dtc_period_s": 0,
                                            "read_vin": False}, "t")

    def after_a_garbled_answer(xs: list[Reading | Event]) -> bool:
        return src.counters["decode-unexpected-pid"] >= 1 and \
            len(named(xs, "Vehicle.Speed")) >= 6

    items = asyncio.run(collect(src, after_a_garbled_answer, 60))
    assert src.counters["pid-missed"] == 0 and src.counters["no-answer"] == 0
    assert all(st.misses == 0 for st in src.poller._pid_state.values())
    counts = {len(named(items, name)) for name in (
        "Vehicle.Speed", "Vehicle.OBD.EngineSpeed", "Vehicle.OBD.CoolantTemperature",
        "Vehicle.OBD.EngineLoad")}
    assert len(counts) == 1  # every answer that parsed carried all four
    assert [e.code for e in events(items)] == ["obd-bad-answer"]  # reported once


def test_reconnects_after_the_adapter_is_unplugged(tmp_path: Path) -> None:
    if shutil.which("socat") is None:
        pytest.fail("socat is required")
    emu_end, app_end = tmp_path / "emu", tmp_path / "app"
    procs: list[subprocess.Popen[bytes]] = []

    def plug() -> None:
        for p in (emu_end, app_end):
            p.unlink(missing_ok=True)
        procs.append(subprocess.Popen(["socat", f"pty,raw,echo=0,link={emu_end}",
                                       f"pty,raw,echo=0,link={app_end}"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        _wait_for(lambda: emu_end.exists() and app_end.exists(), 10, "socat")
        emu, out = start_emulator(tmp_path, "-p", str(emu_end))
        procs.append(emu)
        _wait_for(lambda: out.exists() and out.read_text().strip() != "", 20, "emulator")
        out.unlink()

    def unplug() -> None:
        for p in procs:
            _stop(p)
        procs.clear()

    async def scenario() -> tuple[int, int]:
        src = Elm327Source.from_options("elm", {"port": str(app_end), "pids": {"SPEED": 0.05},
                                                "read_vin": False}, "t")
        seen = []
        state = {"replugged": False}

        async def emit(item: object) -> None:
            seen.append(item)

        task = asyncio.create_task(src.run(emit))
        try:
            async def speeds_after(n: int) -> None:
                while len(named(seen, "Vehicle.Speed")) < n:
                    await asyncio.sleep(0.05)
            await asyncio.wait_for(speeds_after(2), 30)
            before = len(named(seen, "Vehicle.Speed"))
            await asyncio.to_thread(unplug)
            await asyncio.sleep(0.5)
            await asyncio.to_thread(plug)
            state["replugged"] = True
            await asyncio.wait_for(speeds_after(before + 2), 60)
            return before, src.counters["io-port-lost"] + src.counters["unavailable-port-open"]
        finally:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    plug()
    try:
        before, faults = asyncio.run(scenario())
    finally:
        unplug()
    assert before >= 2 and faults >= 1


class HostileAdapter(threading.Thread):
    """A scripted adapter on a pty: a proper init, then garbage and every error status before
    real answers. No real peer emits these on demand, hence a script (DESIGN s8)."""

    SCRIPT = [b"\xff\xfe\x01garbage\r\r>", b"BUFFER FULL\r\r>", b"STOPPED\r\r>",
              b"CAN ERROR\r\r>", b"?\r\r>", b"7E8 0\r7E803410D\r\r>", b"<RX ERROR\r\r>",
              b"7E8037F0112\r\r>", b"7E8100E4104FF055F0C\r\r>"]

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.master, self.slave = os.openpty()
        self.name = os.ttyname(self.slave)
        self.stop = threading.Event()
        self.requests = 0

    def answer(self, cmd: str) -> bytes:
        if cmd == "ATZ":
            return b"\r\rELM327 v1.5\r\r>"
        if cmd.startswith("AT") and cmd != "ATDPN":
            return b"OK\r\r>"
        if cmd == "ATDPN":
            return b"A6\r\r>"
        if cmd.startswith("01") and cmd[2:4] in ("00", "20", "40", "60", "80", "A0", "C0"):
            return b"7E806" + cmd[:4].replace("01", "41", 1).encode() + b"00180000\r\r>"
        if cmd == "010D":
            self.requests += 1
            if self.requests <= len(self.SCRIPT):
                return self.SCRIPT[self.requests - 1]
            return b"7E803410D2A\r\r>"
        return b"NO DATA\r\r>"

    def run(self) -> None:
        buf = b""
        while not self.stop.is_set():
            try:
                chunk = os.read(self.master, 256)
            except OSError:
                return
            buf += chunk
            while b"\r" in buf:
                line, _, buf = buf.partition(b"\r")
                os.write(self.master, self.answer(line.decode().strip()))


def test_hostile_adapter_lines_are_counted_and_polling_goes_on() -> None:
    adapter = HostileAdapter()
    adapter.start()
    try:
        src = Elm327Source.from_options("elm", {"port": adapter.name, "pids": {"SPEED": 0.02},
                                                "read_vin": False, "dtc_period_s": 0,
                                                "sleep_after": 50}, "t")
        items = asyncio.run(collect(src, lambda xs: len(named(xs, "Vehicle.Speed")) >= 2, 30))
    finally:
        adapter.stop.set()
        os.close(adapter.master)
        os.close(adapter.slave)
    assert [r.value for r in named(items, "Vehicle.Speed")][:2] == [0x2A, 0x2A]
    for counter in ("elm-garbage-line", "elm-buffer-full", "elm-stopped", "elm-can-error",
                    "elm-refused", "elm-rx-error", "nrc-sub-function-not-supported",
                    "elm-unexpected-text", "rx-isotp-incomplete"):
        assert src.counters[counter] >= 1, counter


class CloneAdapter(HostileAdapter):
    """A clone that refuses ATS0/ATL0 and answers with spaces and CR LF line ends."""

    def answer(self, cmd: str) -> bytes:
        if cmd in ("ATS0", "ATL0"):
            return b"?\r\n\r\n>"
        if cmd == "010D":
            return b"7E8 03 41 0D 2A \r\n\r\n>"
        return super().answer(cmd)


def test_clone_refusing_optional_commands_still_works() -> None:
    adapter = CloneAdapter()
    adapter.start()
    try:
        src = Elm327Source.from_options("elm", {"port": adapter.name, "pids": {"SPEED": 0.02},
                                                "read_vin": False, "dtc_period_s": 0}, "t")
        items = asyncio.run(collect(src, lambda xs: len(named(xs, "Vehicle.Speed")) >= 2, 30))
    finally:
        adapter.stop.set()
        os.close(adapter.master)
        os.close(adapter.slave)
    assert [r.value for r in named(items, "Vehicle.Speed")][:2] == [0x2A, 0x2A]
    assert src.counters["elm-refused"] == 2


def test_two_ecus_answering_one_pid_through_the_adapter(elm_port: str) -> None:
    # One PID per request: the emulator's entries that carry a second frame from 7EA (the
    # hybrid ECU) come back as two answers; the engine ECU's (7E8, lower number) value wins.
    src = Elm327Source.from_options("elm", {"port": elm_port, "max_pids": 1, "read_vin": False,
                                            "pids": {"ENGINE_LOAD": 0.02}}, "t")
    items = asyncio.run(collect(src, lambda xs: len(named(xs, "Vehicle.OBD.EngineLoad")) >= 6,
                                60))
    from elm.obd_message import ObdMessage
    responses = ObdMessage["car"]["ENGINE_LOAD"]["Response"]
    two = [k for k, r in enumerate(responses[:6]) if r.count("<header>") > 1]
    assert two, "the emulator's table changed: no two-ECU entry among the first six"
    values = [v[0] * 100 / 255 for v in emulator_values("ENGINE_LOAD")]
    got = [r.value for r in named(items, "Vehicle.OBD.EngineLoad")][:6]
    assert got == pytest.approx(values[:6], abs=1e-5)
    assert src.counters["duplicate-value"] >= len(two)


class StaleAdapter(HostileAdapter):
    """An adapter that still holds another program's reply when we open it: every answer
    comes one command late until the client resynchronises (ATI, drop until the banner)."""

    def __init__(self) -> None:
        super().__init__()
        self.queue: list[bytes] = [b"7E803410D63\r\r>"]  # left over from someone else
        self.resynced = False

    def answer(self, cmd: str) -> bytes:
        if cmd == "ATI":
            self.resynced = True
            self.queue.clear()  # the client drains; from now on replies are in step
            return b"ELM327 v1.5\r\r>"
        if cmd == "010D":
            return b"7E803410D2A\r\r>"
        reply = super().answer(cmd)
        if self.resynced:
            return reply
        self.queue.append(reply)
        return self.queue.pop(0)


def test_a_stale_reply_at_port_open_is_flushed_and_the_adapter_resynchronised() -> None:
    adapter = StaleAdapter()
    adapter.start()
    try:
        src = Elm327Source.from_options("elm", {"port": adapter.name, "pids": {"SPEED": 0.02},
                                                "read_vin": False, "dtc_period_s": 0}, "t")
        items = asyncio.run(collect(src, lambda xs: len(named(xs, "Vehicle.Speed")) >= 3, 30))
    finally:
        adapter.stop.set()
        os.close(adapter.master)
        os.close(adapter.slave)
    assert adapter.resynced and src.counters["elm-resync"] >= 1
    # never the stale 0x63 (99 km/h) from the other program's request
    assert [r.value for r in named(items, "Vehicle.Speed")][:3] == [0x2A] * 3


class GarbageAdapter(HostileAdapter):
    """Answers, then a long run of adapter faults: not one of them is the car asleep."""

    FAULTS = [b"STOPPED\r\r>", b"BUFFER FULL\r\r>", b"?\r\r>", b"\x01\xfe#!garbage\r\r>",
              b"7E8100E410D\r\r>"]  # the last: a multi-frame answer whose CFs never come

    def answer(self, cmd: str) -> bytes:
        if cmd == "010D":
            self.requests += 1
            if 3 <= self.requests < 3 + 6 * len(self.FAULTS):
                return self.FAULTS[self.requests % len(self.FAULTS)]
            return b"7E803410D2A\r\r>"
        return super().answer(cmd)


def test_adapter_garbage_and_lost_frames_are_faults_not_ignition_off() -> None:
    adapter = GarbageAdapter()
    adapter.start()
    try:
        src = Elm327Source.from_options("elm", {"port": adapter.name, "pids": {"SPEED": 0.01},
                                                "read_vin": False, "dtc_period_s": 0,
                                                "sleep_after": 2, "sleep_hold_s": 0},
                                        "t")
        items = asyncio.run(collect(src, lambda xs: len(named(xs, "Vehicle.Speed")) >= 4, 30))
    finally:
        adapter.stop.set()
        os.close(adapter.master)
        os.close(adapter.slave)
    assert adapter.requests >= 3 + 6 * len(GarbageAdapter.FAULTS)
    assert not [e for e in events(items) if e.code.startswith("vehicle-")]
    assert src.counters["no-answer-fault"] >= 20 and src.counters["no-answer-heard"] >= 5
    assert src.counters["no-answer"] == 0
