"""`edge-agent watch`: the view decodes and verifies (core: envelopes in, lines out), and
the command shows a real agent's stream from a real mosquitto."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.envelope import Sealer
from agent.fleet_keys import FleetRegistry
from agent.keys import KeyStore
from agent.readings import Event, Reading
from agent.watch import WatchView, render
from tests.agent.test_operations import agent_config, wait_for

EDGE_AGENT = str(Path(sys.executable).parent / "edge-agent")
TOPIC = "evedge/v1/ev-1/telemetry"


def device(tmp_path: Path, name: str = "ev-1"):
    keys, record = KeyStore(tmp_path / name).init(name)
    registry = FleetRegistry()
    registry.add_record(record)
    return keys, registry


def speed(value: float) -> Reading:
    return Reading("Vehicle.Speed", value, "km/h", 1_763_700_000 * 10**9)


def test_the_view_follows_each_devices_chain(tmp_path):
    keys, registry = device(tmp_path)
    sealer = Sealer(keys.identity, "ev-1", os.urandom(16))
    view = WatchView(registry)
    first = sealer.seal_readings([speed(52.5)])
    line = view.feed(TOPIC, first.data, 1)
    assert line.data["chain"] == "first" and line.data["verified"] is True
    assert "Vehicle.Speed=52.5 km/h" in line.text
    second = sealer.seal_readings([speed(53)])
    assert view.feed(TOPIC, second.data, 2).data["chain"] == "ok"
    assert view.feed(TOPIC, second.data, 3).data["chain"] == "replayed"   # QoS 1 again
    sealer.seal_readings([speed(1)])                                      # never published
    gap = view.feed(TOPIC, sealer.seal_readings([speed(2)]).data, 4)
    assert gap.data["chain"] == "gap" and gap.data["missing"] == 1 and "GAP" in gap.text
    # A second agent on the same key forks the chain: signed, but it does not link.
    fork = Sealer(keys.identity, "ev-1", os.urandom(16), next_seq=sealer.next_seq)
    broken = view.feed(TOPIC, fork.seal_readings([speed(3)]).data, 5)
    assert broken.data["chain"] == "broken" and broken.data["verified"] is False
    event = view.feed("evedge/v1/ev-1/event",
                      sealer.seal_events([Event("odometer-decreased", "went back", 1)]).data, 6)
    assert event.kind == "event" and "EVENT odometer-decreased: went back" in event.text


def test_the_view_names_what_does_not_verify(tmp_path):
    keys, registry = device(tmp_path)
    stranger, _ = device(tmp_path, "ev-2")
    data = bytearray(Sealer(keys.identity, "ev-1", os.urandom(16)).seal_readings([speed(1)]).data)
    data[-5] ^= 0x01
    view = WatchView(registry)
    assert view.feed(TOPIC, bytes(data), 1).text.startswith("BAD SIGNATURE")
    other = Sealer(stranger.identity, "ev-2", os.urandom(16)).seal_readings([speed(1)]).data
    line = view.feed(TOPIC, other, 2)
    assert line.kind == "invalid" and line.data["reason"] == "unknown-key"
    assert view.feed("evedge/v1/ev-1/status", b'{"state": "online"}', 3).text == \
        "status online"
    assert json.loads(render(line, as_json=True))["verified"] is False


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.sampled_from(["telemetry", "event", "status", "other"]))
def test_hostile_payloads_become_lines_not_exceptions(payload, kind):
    view = WatchView(FleetRegistry())
    line = view.feed(f"evedge/v1/x/{kind}", payload, 1)
    assert line is None or line.kind in ("invalid", "status")


def test_watch_shows_a_running_agents_readings_verified(tmp_path, mosquitto):
    _, record = KeyStore(tmp_path / "state").init("cs-watch-1")
    registry = FleetRegistry()
    registry.add_record(record)
    registry.save(tmp_path / "fleet.toml")
    config = agent_config(tmp_path, mosquitto.url)
    agent = subprocess.Popen([EDGE_AGENT, "run", "--config", str(config)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: (tmp_path / "state" / "status.json").exists(), what="the agent")
        result = subprocess.run(
            [EDGE_AGENT, "watch", "--mqtt", mosquitto.url, "--device", "cs-watch-1",
             "--registry", str(tmp_path / "fleet.toml"), "--json", "--count", "3",
             "--duration", "60"], capture_output=True, text=True, timeout=120)
    finally:
        agent.terminate()
        agent.wait(30)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    envelopes = [line for line in lines if line["kind"] == "telemetry"]
    assert len(envelopes) == 3 and all(e["verified"] for e in envelopes), lines
    names = {r["name"] for e in envelopes for r in e["readings"]}
    assert "1-0:1.8.0" in names          # the meter's import energy, by its OBIS name
    assert [e["seq"] for e in envelopes] == sorted(e["seq"] for e in envelopes)


def test_watch_without_a_broker_is_an_error(tmp_path):
    FleetRegistry().save(tmp_path / "fleet.toml")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    started = time.monotonic()
    result = subprocess.run([EDGE_AGENT, "watch", "--mqtt", f"mqtt://127.0.0.1:{port}",
                             "--registry", str(tmp_path / "fleet.toml")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "no broker at mqtt://127.0.0.1" in result.stderr and "Traceback" not in result.stderr
    assert time.monotonic() - started < 60


def test_watch_says_once_when_nothing_comes_from_the_device(mosquitto, monkeypatch, capsys):
    """A typo in --device used to be silent forever."""
    import asyncio
    import io

    from agent import watch as watch_module

    monkeypatch.setattr(watch_module, "QUIET_HINT_S", 0.3)
    out = io.StringIO()
    shown = asyncio.run(watch_module.watch(mosquitto.url, FleetRegistry(), device="cs-nope",
                                           duration_s=1.5, out=out))
    err = capsys.readouterr().err
    assert shown == 0 and out.getvalue() == ""
    assert err.count("nothing from device cs-nope for 0.3 s: is the id right") == 1
