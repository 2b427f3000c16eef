"""Status snapshot: JSON round trip, atomic replace under a concurrent reader, the summary."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.errors import AdapterTimeout, ConfigError, DecodeError, EdgeAgentError
from agent.jsoncodec import decode_json
from agent.options import Table
from agent.sdnotify import Notifier
from agent.status import (
    AgentStatus,
    ChannelStatus,
    ErrorLog,
    ErrorRecord,
    RateMeter,
    SourceStatus,
    SpoolStatus,
    StatusConfig,
    UplinkStatus,
    encode_status,
    read_status,
    status_path,
    write_status,
)
from agent.status_publisher import publish_status, status_line
from agent.status_view import (
    EXIT_NOT_RUNNING,
    EXIT_RUNNING,
    EXIT_UNKNOWN,
    format_status,
    resolve_status_path,
    status_summary,
)

NOW = 1_763_700_000 * 10**9
S = 10**9


def sample(updated_ns: int = NOW, state: str = "running", pid: int | None = None) -> AgentStatus:
    log = ErrorLog()
    error = log.add(NOW - 5 * S, "source[obd0]", AdapterTimeout("no answer from ECU 7E8"))
    return AgentStatus(
        device_id="ev-0042", role="vehicle", pid=os.getpid() if pid is None else pid,
        state=state, started_ns=NOW - 7300 * S, updated_ns=updated_ns, interval_s=2.0,
        version="0.1.0",
        sources=(SourceStatus("obd0", "obd-can", "running", 10234, 12.5,
                              {"timeout": 3, "bad-frame": 0}, error),
                 SourceStatus("dbc0", "dbc", "retrying", 0, 0.0)),
        spool=SpoolStatus(depth=12, bytes=34_000, capacity_bytes=64 << 20, next_seq=10_240,
                          oldest_ts_ns=NOW - 3 * S, dropped=0),
        uplink=UplinkStatus("connected", "broker.example:8883", NOW - 600 * S, 10_222, 1, 2),
        channels=(ChannelStatus("ab" * 32, "cs-7", "OPEN", 42, 12_345, 4_567, 0),),
        errors=log.snapshot(),
    )


def test_json_round_trip() -> None:
    status = sample()
    assert decode_json(AgentStatus, encode_status(status)) == status


def test_atomic_write_and_read(tmp_path: Path) -> None:
    path = tmp_path / "status.json"
    write_status(path, sample())
    assert read_status(path) == sample()
    write_status(path, sample(state="stopping"))
    assert read_status(path).state == "stopping"
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"]     # no temp file left


def test_reader_never_sees_a_partial_file(tmp_path: Path) -> None:
    path = tmp_path / "status.json"
    write_status(path, sample())
    stop = threading.Event()
    seen: list[str] = []

    def reader() -> None:
        while not stop.is_set():
            seen.append(read_status(path).state)       # raises on a torn file

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(300):
            write_status(path, sample(state="running" if i % 2 else "stopping"))
    finally:
        stop.set()
        thread.join(10)
    assert seen and set(seen) <= {"running", "stopping"}


def test_write_failure_is_our_error(tmp_path: Path) -> None:
    with pytest.raises(EdgeAgentError) as info:
        write_status(tmp_path / "missing-dir" / "status.json", sample())
    assert info.value.reason == "status-write"
    nan_rate = dataclasses.replace(sample(), sources=(SourceStatus("x", "dbc", "running",
                                                                   rate_hz=float("nan")),))
    with pytest.raises(EdgeAgentError) as info:
        write_status(tmp_path / "status.json", nan_rate)
    assert info.value.reason == "status-encode"


@pytest.mark.parametrize("mutate, where", [
    (lambda d: d.pop("pid"), "pid: missing"),
    (lambda d: d.update(pid="12"), "pid: expected an integer"),
    (lambda d: d.update(pid=True), "pid: expected an integer"),
    (lambda d: d["sources"][0].update(rate_hz="fast"), "sources[0].rate_hz"),
    (lambda d: d["sources"][0]["counters"].update(timeout=None), "sources[0].counters.timeout"),
    (lambda d: d["spool"].update(depth=[]), "spool.depth"),
    (lambda d: d.update(channels={}), "channels: expected an array"),
    (lambda d: d["errors"][0].pop("reason"), "errors[0].reason: missing"),
])
def test_damaged_file_names_the_field(mutate, where: str) -> None:
    data = json.loads(encode_status(sample()))
    mutate(data)
    with pytest.raises(DecodeError) as info:
        decode_json(AgentStatus, json.dumps(data).encode())
    assert where in str(info.value)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300) | st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4), max_leaves=20
).map(lambda v: json.dumps(v).encode()))
def test_hostile_bytes_raise_only_decode_error(data: bytes) -> None:
    try:
        decode_json(AgentStatus, data)
    except DecodeError:
        pass


def test_truncated_file(tmp_path: Path) -> None:
    path = tmp_path / "status.json"
    path.write_bytes(encode_status(sample())[:100])
    text, code = status_summary(path, NOW)
    assert code == EXIT_UNKNOWN and "unreadable" in text


def test_summary_of_a_running_agent(tmp_path: Path) -> None:
    path = tmp_path / "status.json"
    write_status(path, sample())
    text, code = status_summary(path, NOW + S)
    assert code == EXIT_RUNNING
    first = text.splitlines()[0]
    assert first.startswith("edge-agent 0.1.0 vehicle 'ev-0042': running, pid ")
    assert "up 2 h 01 min" in first
    assert "obd0" in text and "12.5/s" in text and "faults: timeout=3" in text
    assert "bad-frame" not in text                        # zero counters are noise
    assert "timeout: no answer from ECU 7E8" in text
    assert "spool:    12 envelopes waiting, 33.2 kB of 64.0 MB" in text
    assert "next seq 10240" in text
    assert "uplink:   connected (broker.example:8883) for 10 min 01 s" in text
    assert "abababab..ababab peer cs-7 OPEN nonce 42: 12345 Wh, paid 4567" in text


def test_summary_when_not_running(tmp_path: Path) -> None:
    path = tmp_path / "status.json"
    text, code = status_summary(path, NOW)
    assert code == EXIT_NOT_RUNNING and "no status file" in text

    write_status(path, sample(updated_ns=NOW - 60 * S))
    text, code = status_summary(path, NOW)
    assert code == EXIT_NOT_RUNNING
    assert "status is stale: last update 1 min 00 s ago" in text
    assert "last known state:" in text and "ev-0042" in text

    write_status(path, sample(state="stopped"))
    assert status_summary(path, NOW)[1] == EXIT_NOT_RUNNING


def test_summary_sees_a_dead_pid(tmp_path: Path) -> None:
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True, timeout=60)
    dead_pid = int(child.stdout)        # reaped: that pid no longer exists (barring reuse)
    path = tmp_path / "status.json"
    write_status(path, sample(pid=dead_pid))
    text, code = status_summary(path, NOW)
    assert code == EXIT_NOT_RUNNING and f"pid {dead_pid} is gone without a clean" in text
    assert status_summary(path, NOW, check_pid=False)[1] == EXIT_RUNNING


def test_error_log_is_bounded_and_keeps_our_reason() -> None:
    log = ErrorLog(maxlen=3)
    for i in range(5):
        log.add(i, "uplink", EdgeAgentError(f"e{i}", reason=f"r{i}"))
    log.add(9, "spool", OSError("disk full"))
    assert [e.message for e in log.snapshot()] == ["e3", "e4", "disk full"]
    assert log.snapshot()[-1] == ErrorRecord(9, "spool", "OSError", "disk full", 1, 9)


def test_error_log_counts_one_kind_with_first_and_last_time() -> None:
    log = ErrorLog(maxlen=3)
    log.add(1 * S, "telemetry", EdgeAgentError("disk full (1 envelope)", reason="disk-full"))
    log.add(2 * S, "uplink", EdgeAgentError("timed out", reason="timeout"))
    for t in range(3, 10):
        log.add(t * S, "telemetry", EdgeAgentError(f"disk full ({t})", reason="disk-full"))
    first, last = log.snapshot()
    assert first.reason == "timeout" and first.count == 1
    assert (last.reason, last.count, last.first_seen_ns, last.ts_ns, last.message) == \
        ("disk-full", 8, 1 * S, 9 * S, "disk full (9)")
    text = format_status(sample(), NOW)
    assert "last errors:" in text


def test_rate_meter() -> None:
    meter = RateMeter(window_s=10)
    assert meter.rate() == 0.0
    for second in range(31):
        meter.observe(total=20 * second, now_ns=second * S)
    assert meter.rate() == pytest.approx(20.0)
    meter.observe(total=600, now_ns=40 * S)           # stalled source: rate decays
    assert meter.rate() < 20.0


def test_status_config_and_path(tmp_path: Path) -> None:
    assert StatusConfig.from_table(Table({}, "a.toml", "status")) == StatusConfig()
    config = StatusConfig.from_table(Table({"path": "/x/s.json", "interval_s": 5}, "a.toml",
                                           "status"))
    assert config.path == Path("/x/s.json") and config.interval_s == 5.0
    with pytest.raises(ConfigError, match="status.interval_s"):
        StatusConfig.from_table(Table({"interval_s": 0}, "a.toml", "status"))
    with pytest.raises(ConfigError, match="status.bogus"):
        StatusConfig.from_table(Table({"bogus": 1}, "a.toml", "status"))
    state, run = tmp_path / "state", tmp_path / "run"
    assert status_path(state, Path("/c.json"), {}) == Path("/c.json")
    assert status_path(state, None, {"RUNTIME_DIRECTORY": "/run/x"}, run) == Path("/run/x/status.json")
    assert status_path(state, None, {}, run) == state / "status.json"
    run.mkdir()
    assert status_path(state, None, {}, run) == run / "status.json"


def test_status_line() -> None:
    assert status_line(sample()) == ("running: 1/2 sources, 12.5 readings/s, spool 12, "
                                     "uplink connected, channel OPEN nonce 42")


def test_publish_status_writes_pings_and_survives_write_errors(tmp_path: Path) -> None:
    """The status task against a real notify socket: file rewritten, WATCHDOG=1 every tick,
    STATUS= only when the line changes, and a failing write reported, not fatal."""
    manager = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    manager.bind(str(tmp_path / "notify.sock"))
    manager.settimeout(5)
    notifier = Notifier(environ={"NOTIFY_SOCKET": str(tmp_path / "notify.sock")})
    path = tmp_path / "run" / "status.json"
    ticks = {"n": 0}
    errors: list[BaseException] = []

    def snapshot() -> AgentStatus:
        ticks["n"] += 1
        if ticks["n"] == 3:
            path.parent.mkdir()                          # the first two writes fail
        return sample(state="starting" if ticks["n"] < 5 else "running")

    async def main() -> None:
        task = asyncio.create_task(publish_status(snapshot, path, interval_s=5.0,
                                                  notifier=notifier, watchdog_interval_s=0.01,
                                                  on_error=errors.append))
        while ticks["n"] < 8:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    try:
        asyncio.run(main())
        datagrams = []
        manager.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while True:
                datagrams.append(manager.recv(4096).decode())
    finally:
        manager.close()
        notifier.close()
    assert len(errors) == 2 and all(e.reason == "status-write" for e in errors)
    assert read_status(path).state == "running"
    assert datagrams.count("WATCHDOG=1") >= 7
    statuses = [d for d in datagrams if d.startswith("STATUS=")]
    assert [s.split(":")[0] for s in statuses] == ["STATUS=starting", "STATUS=running"]


def test_resolve_status_path_from_the_config(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(f'[device]\nrole = "station"\nstate_dir = "{tmp_path}/state"\n')
    run = tmp_path / "run"
    assert resolve_status_path(config, environ={"RUNTIME_DIRECTORY": "/elsewhere"},
                               run_dir=run) == tmp_path / "state" / "status.json"
    run.mkdir()
    assert resolve_status_path(config, environ={}, run_dir=run) == run / "status.json"
    config.write_text('[status]\npath = "/tmp/x/status.json"\n')
    assert resolve_status_path(config, environ={}) == Path("/tmp/x/status.json")
    assert resolve_status_path(config, Path("/y.json")) == Path("/y.json")
    config.write_text('[status]\ninterval = 3\n')
    with pytest.raises(ConfigError, match="status.interval"):
        resolve_status_path(config, environ={})
