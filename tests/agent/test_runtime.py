"""The agent as a service: `edge-agent run` against a real mosquitto and a simulated meter,
under a fake NOTIFY_SOCKET; SIGTERM shuts it down cleanly and nothing committed is lost."""

import asyncio
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from agent.fleet_keys import FleetRegistry
from agent.keys import KeyStore
from agent.live_verify import verify_mqtt
from agent.status import read_status

EDGE_AGENT = str(Path(sys.executable).parent / "edge-agent")


def station_config(tmp_path: Path, broker_url: str, source: str) -> Path:
    state = tmp_path / "state"
    path = tmp_path / "station.toml"
    path.write_text(f"""
[device]
role = "station"
state_dir = "{state}"

[batch]
max_readings = 20
max_age_ms = 300

{source}

[mqtt]
url = "{broker_url}"
backoff_initial_s = 0.1
backoff_max_s = 1.0

[status]
path = "{tmp_path / 'status.json'}"
interval_s = 0.2
""")
    return path


METER = """[[sources]]
id = "meter0"
kind = "hil-meter"
map = "sdm630"
power_w = 11000
interval_s = 0.05
time_scale = 60
"""


def provision(tmp_path: Path) -> FleetRegistry:
    _, record = KeyStore(tmp_path / "state").init("cs-test-1")
    registry = FleetRegistry()
    registry.add_record(record)
    return registry


class NotifySocket:
    """The service manager's end of NOTIFY_SOCKET. Like systemd it reads all the time (a
    thread), so the agent's datagrams never pile up in the kernel's queue of 10 and get
    dropped while the test is busy elsewhere."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.messages: list[str] = []
        self._arrived = threading.Condition()
        self._closed = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while not self._closed:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._arrived:
                self.messages.append(data.decode())
                self._arrived.notify_all()

    def drain(self) -> list[str]:
        with self._arrived:
            return list(self.messages)

    def wait_for(self, text: str, timeout_s: float) -> None:
        with self._arrived:
            if not self._arrived.wait_for(lambda: any(text in m for m in self.messages),
                                          timeout_s):
                raise AssertionError(f"no {text!r} on the notify socket; got {self.messages}")


def wait_status(path: Path, done, timeout_s: float = 15.0):
    """The agent's status file once ``done(status)`` holds (it is rewritten every tick),
    or the last one read when the time is up."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = read_status(path)
        if done(status) or time.monotonic() > deadline:
            return status
        time.sleep(0.1)


def start_agent(config: Path, notify: NotifySocket) -> subprocess.Popen:
    env = dict(os.environ, NOTIFY_SOCKET=str(notify.path), WATCHDOG_USEC="400000")
    env.pop("WATCHDOG_PID", None)
    return subprocess.Popen([EDGE_AGENT, "run", "--config", str(config)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def stop_agent(proc: subprocess.Popen) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"agent did not stop on SIGTERM:\n{out}") from None
    return out


def test_run_notify_stream_and_clean_sigterm(tmp_path, mosquitto):
    registry = provision(tmp_path)
    config = station_config(tmp_path, mosquitto.url, METER)
    notify = NotifySocket(tmp_path / "notify.sock")
    proc = start_agent(config, notify)
    try:
        notify.wait_for("READY=1", 20)
        notify.wait_for("WATCHDOG=1", 5)
        report = asyncio.run(verify_mqtt(mosquitto.url, registry, envelopes=8, idle_s=10,
                                         timeout_s=30, persistent=False))
        assert report.ok, report.format()
        device = report.devices["cs-test-1"]
        assert device.envelopes >= 8 and device.readings > 0
        status = read_status(tmp_path / "status.json")
        assert status.state == "running" and status.sources[0].readings > 0
        assert status.uplink is not None and status.uplink.state == "connected"
        summary = subprocess.run([EDGE_AGENT, "status", "--file", str(tmp_path / "status.json")],
                                 capture_output=True, text=True, timeout=30)
        assert summary.returncode == 0 and "meter0" in summary.stdout
    finally:
        out = stop_agent(proc)
    assert proc.returncode == 0, out
    assert "Traceback" not in out
    notify.wait_for("STOPPING=1", 2)
    assert read_status(tmp_path / "status.json").state == "stopped"
    spool = tmp_path / "state" / "spool.sqlite"
    with sqlite3.connect(spool) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    summary = subprocess.run([EDGE_AGENT, "status", "--file", str(tmp_path / "status.json")],
                             capture_output=True, text=True, timeout=30)
    assert summary.returncode == 3


def test_failing_source_is_retried_and_agent_keeps_running(tmp_path, mosquitto):
    provision(tmp_path)
    from hil.broker import free_port

    dead = f"""[[sources]]
id = "meter9"
kind = "modbus-tcp"
host = "127.0.0.1"
port = {free_port()}
map = "sdm630"
interval_s = 0.1
timeout_s = 0.2
"""
    config = station_config(tmp_path, mosquitto.url, dead)
    notify = NotifySocket(tmp_path / "notify.sock")
    proc = start_agent(config, notify)
    try:
        notify.wait_for("READY=1", 20)
        notify.wait_for("WATCHDOG=1", 5)  # the status file is written before each ping
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            status = read_status(tmp_path / "status.json")
            if sum(status.sources[0].counters.values()) > 0:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "a dead meter must not stop the agent"
        assert sum(status.sources[0].counters.values()) > 0, status
    finally:
        out = stop_agent(proc)
    assert proc.returncode == 0, out


@pytest.mark.parametrize("bad,message", [
    ('[[sources]]\nid = "x"\nkind = "warp-drive"\n', "sources.x.kind: expected one of"),
    ('[[sources]]\nid = "m"\nkind = "hil-meter"\npower_w = "lots"\n', "power_w"),
    # issue 12 item 6: one RS-485 port, two line settings: a config error, not a retry loop
    ('[[sources]]\nid = "a"\nkind = "modbus-rtu"\nport = "/dev/ttyUSB9"\nmap = "sdm630"\n'
     '[[sources]]\nid = "b"\nkind = "modbus-rtu"\nport = "/dev/ttyUSB9"\nmap = "em340"\n'
     'baudrate = 19200\n', "the settings of source 'a' on serial:/dev/ttyUSB9"),
])
def test_config_errors_before_start(tmp_path, bad, message):
    provision(tmp_path)
    config = station_config(tmp_path, "mqtt://127.0.0.1:1", bad)
    proc = subprocess.run([EDGE_AGENT, "run", "--config", str(config)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


def test_metrics_port_taken_does_not_stop_the_agent(tmp_path, mosquitto):
    """Metrics are optional: a taken port becomes an error in the status, streaming goes on."""
    registry = provision(tmp_path)
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    config = station_config(tmp_path, mosquitto.url,
                            METER + f"\n[metrics]\nenabled = true\nport = {port}\n")
    notify = NotifySocket(tmp_path / "notify.sock")
    proc = start_agent(config, notify)
    try:
        notify.wait_for("READY=1", 20)
        notify.wait_for("WATCHDOG=1", 5)  # the status file is written before each ping
        report = asyncio.run(verify_mqtt(mosquitto.url, registry, envelopes=3, idle_s=10,
                                         timeout_s=30))
        assert report.ok and report.devices["cs-test-1"].envelopes >= 3
        status = wait_status(tmp_path / "status.json",
                             lambda st: any(e.reason == "metrics-bind" for e in st.errors))
        assert any(e.reason == "metrics-bind" for e in status.errors), status.errors
    finally:
        holder.close()
        out = stop_agent(proc)
    assert proc.returncode == 0, out
