"""Operations, as a technician meets them: one agent per state directory, the status after
SIGTERM, every logged warning in the status, a log that does not flood (real processes)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.keys import KeyStore
from agent.status import read_status

EDGE_AGENT = str(Path(sys.executable).parent / "edge-agent")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def agent_config(tmp_path: Path, url: str) -> Path:
    """A station with a simulated meter; no [status] path: the snapshot goes to the state
    directory, where `edge-agent status` finds it through $EDGE_AGENT_STATE_DIR."""
    path = tmp_path / "station.toml"
    path.write_text(f"""
[device]
role = "station"
state_dir = "{tmp_path / 'state'}"

[[sources]]
id = "meter0"
kind = "hil-meter"
map = "sdm630"
interval_s = 0.1

[mqtt]
url = "{url}"
backoff_initial_s = 0.05
backoff_max_s = 0.2

[status]
interval_s = 0.2
""")
    return path


def env_without_debug(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("EDGE_AGENT_DEBUG",
                                                             "EDGE_AGENT_STATE_DIR")}
    env.update(extra)
    return env


def wait_for(predicate, timeout_s: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def status_or_none(path: Path):
    try:
        return read_status(path)
    except (FileNotFoundError, ValueError):
        return None


@pytest.fixture
def station(tmp_path: Path):
    """A running station agent whose broker is unreachable (a port nobody listens on)."""
    KeyStore(tmp_path / "state").init("cs-ops-1")
    config = agent_config(tmp_path, f"mqtt://127.0.0.1:{free_port()}")
    log_path = tmp_path / "agent.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen([EDGE_AGENT, "run", "--config", str(config)], stdout=log,
                                stderr=subprocess.STDOUT, env=env_without_debug())
    status_file = tmp_path / "state" / "status.json"
    try:
        wait_for(lambda: (s := status_or_none(status_file)) and s.state == "running"
                 and s.sources[0].readings > 0, what="the agent to run")
        yield proc, config, status_file, log_path
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_second_agent_on_the_state_directory_exits_at_once(station, tmp_path):
    proc, config, _, _ = station
    started = time.monotonic()
    second = subprocess.run([EDGE_AGENT, "run", "--config", str(config)], capture_output=True,
                            text=True, timeout=60, env=env_without_debug())
    assert second.returncode == 1
    assert f"another agent (pid {proc.pid}) uses {tmp_path / 'state'}" in second.stderr
    assert "Traceback" not in second.stderr and "stopped" not in second.stderr
    assert "starting" not in second.stderr   # refused before it says it starts
    assert time.monotonic() - started < 30
    # Every command that writes state takes the same lock.
    rotate = subprocess.run([EDGE_AGENT, "keys", "rotate", "--state-dir", str(tmp_path / "state"),
                             "--no-qr"], capture_output=True, text=True, timeout=60,
                            env=env_without_debug())
    assert rotate.returncode == 1 and f"another agent (pid {proc.pid})" in rotate.stderr
    assert "then run this command again" in rotate.stderr and "of its own" not in rotate.stderr
    assert KeyStore(tmp_path / "state").load().device_id == "cs-ops-1"


def test_logged_warnings_reach_the_status_and_repeats_do_not_flood_the_log(station):
    proc, _, status_file, log_path = station
    # The uplink retries every 0.05-0.2 s: many failures in a few seconds ...
    status = wait_for(lambda: (s := status_or_none(status_file)) and [
        e for e in s.errors if e.where == "uplink" and e.count >= 10] and s,
        what="ten uplink failures in the status")
    error = next(e for e in status.errors if e.where == "uplink")
    assert error.reason == "unreachable" and error.first_seen_ns < error.ts_ns
    # ... but one log line per distinct error per 10 s.
    lines = [line for line in log_path.read_text().splitlines() if "broker unreachable" in line]
    assert 1 <= len(lines) <= 2, lines
    assert "uplink unreachable" in subprocess.run(
        [EDGE_AGENT, "status", "--file", str(status_file)], capture_output=True, text=True,
        timeout=60).stdout


def test_after_sigterm_status_says_stopped_and_honours_the_state_dir_variable(station, tmp_path):
    proc, _, _, log_path = station
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    result = subprocess.run([EDGE_AGENT, "status"], capture_output=True, text=True, timeout=60,
                            env=env_without_debug(EDGE_AGENT_STATE_DIR=str(tmp_path / "state")))
    assert result.returncode == 3, result.stdout + result.stderr
    assert result.stdout.startswith("edge-agent is NOT RUNNING: stopped")
    assert "station 'cs-ops-1': stopped" in result.stdout
    log = log_path.read_text()
    assert "edge-agent station cs-ops-1 stopped on request" in log
    assert "Traceback" not in log
    # the last snapshot says what is true after the exit: nothing runs, nothing connects
    last = read_status(tmp_path / "state" / "status.json")
    assert [s.state for s in last.sources] == ["stopped"]
    assert last.uplink is not None and last.uplink.state == "stopped"


def test_status_json_for_scripts(station):
    _, _, status_file, _ = station
    result = subprocess.run([EDGE_AGENT, "status", "--file", str(status_file), "--json"],
                            capture_output=True, text=True, timeout=60)
    data = json.loads(result.stdout)
    assert result.returncode == 0 and data["running"] is True
    assert data["status"]["device_id"] == "cs-ops-1" and data["status"]["sources"][0]["readings"]


@pytest.mark.parametrize("flag", ["-v", "-vv"])
def test_v_shows_what_the_agent_does_and_vv_adds_the_mqtt_packets(tmp_path, mosquitto, flag):
    KeyStore(tmp_path / "state").init("cs-ops-v")
    config = agent_config(tmp_path, mosquitto.url)
    proc = subprocess.Popen([EDGE_AGENT, "run", "--config", str(config), flag,
                             "--log-format", "text"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env_without_debug())
    try:
        wait_for(lambda: (s := status_or_none(tmp_path / "state" / "status.json"))
                 and s.spool is not None and s.spool.next_seq >= 3, what="three envelopes")
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "Traceback" not in out
    assert "source[meter0] (hil-meter): started" in out
    assert "spool: committed seq 0-" in out and "published seq 0 " in out
    packets = [line for line in out.splitlines() if "Sending PUBLISH" in line]
    if flag == "-v":
        assert not packets, packets[:3]
    else:   # the dump is there, and labelled as the library's, not as ours
        assert packets and all("paho.mqtt.client" in line for line in packets), packets[:3]
