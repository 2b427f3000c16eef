"""The CLI as a new user meets it: help texts, the technician's flow, one-line errors."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from agent.cli import build_parser

EDGE_AGENT = str(Path(sys.executable).parent / "edge-agent")


def run(*args, cwd=None, check=True):
    env = dict(os.environ)
    env.pop("EDGE_AGENT_DEBUG", None)
    proc = subprocess.run([EDGE_AGENT, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}: {proc.stderr}\n"
                             f"{proc.stdout[-3000:]}")
    return proc


def _subcommand_paths(parser, prefix=()):
    for action in parser._actions:
        if action.__class__.__name__ == "_SubParsersAction":
            for name, sub in action.choices.items():
                yield (*prefix, name)
                yield from _subcommand_paths(sub, (*prefix, name))


@pytest.mark.parametrize("path", [()] + sorted(set(_subcommand_paths(build_parser()))))
def test_every_help_says_what_it_does(path):
    proc = run(*path, "--help")
    assert "usage: edge-agent" in proc.stdout
    # a description line besides usage and options
    assert len(proc.stdout.strip().splitlines()) >= 3


def test_technician_flow(tmp_path):
    state = tmp_path / "state"
    init = run("keys", "init", "--state-dir", str(state), "--device-id", "ev-0042")
    assert "fingerprint:" in init.stdout and "provision record" in init.stdout
    assert "\u2588" in init.stdout or "\u2580" in init.stdout  # the QR code in the terminal
    secret = (state / "keys" / "identity.ed25519").read_bytes().hex()
    assert secret not in init.stdout + init.stderr
    show = run("keys", "show", "--state-dir", str(state))
    assert "ev-0042" in show.stdout
    record = tmp_path / "record.json"
    run("keys", "export", "--state-dir", str(state), "--out", str(record))
    registry = tmp_path / "fleet.toml"
    added = run("registry", "add", str(record), "--registry", str(registry))
    assert "proof of possession checks" in added.stdout
    listed = run("registry", "show", "--registry", str(registry))
    assert "ev-0042" in listed.stdout and "valid" in listed.stdout
    # the QR text form is accepted too
    cbor = tmp_path / "record.cbor"
    run("keys", "export", "--state-dir", str(state), "--format", "cbor", "--out", str(cbor))
    run("registry", "add", str(cbor), "--registry", str(registry))


def test_demo_capture_verifies_and_a_tampered_one_fails(tmp_path):
    demo = run("demo", "--out", str(tmp_path / "out"), "--energy-wh", "300", cwd=tmp_path)
    assert "every envelope verifies" in demo.stdout
    capture = tmp_path / "out" / "capture.cbor"
    registry = tmp_path / "out" / "fleet.toml"
    ok = run("verify", str(capture), "--registry", str(registry))
    assert "every envelope verifies" in ok.stdout
    data = bytearray(capture.read_bytes())
    data[len(data) // 2] ^= 0x01
    capture.write_bytes(bytes(data))
    bad = run("verify", str(capture), "--registry", str(registry), check=False)
    assert bad.returncode == 1 and "FAILED" in bad.stdout


@pytest.mark.parametrize("setup,args,message", [
    (None, ("keys", "show", "--state-dir", "{tmp}/none"), "run `edge-agent keys init"),
    ("world-readable", ("keys", "show", "--state-dir", "{tmp}/s"), "chmod 600"),
    ("bad-config", ("config", "check", "{tmp}/bad.toml"), "bad.toml: batch.max_age_ms: expected"),
    (None, ("verify", "{tmp}/missing.cbor", "--registry", "{tmp}/missing.toml"), "no such fleet registry file"),
    (None, ("registry", "add", "{tmp}/nothing.json", "--registry", "{tmp}/r.toml"), "cannot read the record"),
    ("file", ("keys", "init", "--state-dir", "{tmp}/afile", "--no-qr"), "afile is a file, not a directory"),
    ("port", ("config", "check", "{tmp}/port.toml"), "mqtt.url: expected a port from 1 to 65535"),
    ("junk", ("registry", "add", "{tmp}/junk", "--registry", "{tmp}/r.toml"), "junk: not a provisioning or rotation record"),
    ("junk", ("verify", "{tmp}/junk", "--registry", "{tmp}/junk"), "junk: not a fleet registry file"),
    (None, ("registry", "revoke", "0011223344556677", "--registry", "{tmp}/empty.toml"), "not in the registry, nothing revoked"),
    ("role", ("config", "check", "{tmp}/role.toml"), "modbus-tcp is a source for the station role"),
    ("ipv6", ("config", "check", "{tmp}/ipv6.toml"), "an IPv6 address in [ ]"),
    ("junk", ("verify", "{tmp}/junk", "--registry", "{tmp}/empty.toml"), "junk: not a capture of envelopes"),
    ("file", ("demo", "--out", "{tmp}/afile/out"), "afile/out: a part of this path is a file, not a folder"),
])
def test_errors_are_one_line_without_traceback(tmp_path, setup, args, message):
    if setup == "world-readable":
        run("keys", "init", "--state-dir", str(tmp_path / "s"), "--no-qr")
        (tmp_path / "s" / "keys" / "identity.ed25519").chmod(0o644)
    if setup == "bad-config":
        (tmp_path / "bad.toml").write_text("[batch]\nmax_age_ms = 'soon'\n")
    if setup == "file":
        (tmp_path / "afile").write_text("")
    if setup == "port":
        (tmp_path / "port.toml").write_text("[mqtt]\nurl = 'mqtt://localhost:99999'\n")
    if setup == "junk":   # bytes whose CBOR head claims an absurd length
        (tmp_path / "junk").write_bytes(bytes.fromhex("5b0a2f2f2f2f2f2f2f") + os.urandom(64))
    if setup == "ipv6":
        (tmp_path / "ipv6.toml").write_text("[mqtt]\nurl = 'mqtt://[::1'\n")
    if setup == "role":
        (tmp_path / "role.toml").write_text("[device]\nrole = 'vehicle'\n[mqtt]\nurl = "
                                            "'mqtt://x'\n[[sources]]\nid = 'm'\nkind = "
                                            "'modbus-tcp'\nhost = 'x'\n")
    (tmp_path / "empty.toml").write_text("")
    proc = run(*(a.format(tmp=tmp_path) for a in args), check=False)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "need " not in proc.stderr and "None" not in proc.stderr


def test_a_read_only_state_directory_is_one_clear_line(tmp_path):
    """A real read-only file system (a tmpfs mounted ro in a user+mount namespace)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o ro none {ro} && "
                           f"exec {EDGE_AGENT} keys init --state-dir {ro}/state --no-qr"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert "read-only file system" in proc.stderr and "Traceback" not in proc.stderr


def test_demo_refuses_no_energy():
    for value in ("0", "-5"):
        proc = run("demo", "--energy-wh", value, check=False)
        assert proc.returncode == 2 and "expected 1 to 200000 Wh" in proc.stderr


def test_verify_mqtt_without_a_broker_is_an_error_not_zero_envelopes(tmp_path):
    (tmp_path / "fleet.toml").write_text("")
    with socket.socket() as sock:   # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = run("verify", "--mqtt", f"mqtt://127.0.0.1:{port}", "--duration", "1.5",
               "--registry", str(tmp_path / "fleet.toml"), check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"error: broker 127.0.0.1:{port}: " in proc.stderr
    assert "nothing was verified" in proc.stderr
    assert "no envelope was checked" not in proc.stdout + proc.stderr


VEHICLE = "[device]\nrole = 'vehicle'\n[mqtt]\nurl = 'mqtt://x'\n"
STATION = "[device]\nrole = 'station'\n[mqtt]\nurl = 'mqtt://x'\n"


@pytest.mark.parametrize("text,message", [
    (VEHICLE + "[[sources]]\nid = 'car'\nkind = 'hil-ecuu'\n",
     "c.toml: sources.car.kind: expected one of: "),
    (VEHICLE + "[[sources]]\nid = 'car'\nkind = 'hil-ecuu'\n", '"hil-ecuu" (did you mean hil-ecu?)'),
    (STATION + "[[sources]]\nid = 'm'\nkind = 'modbus-tcp'\nhost = 'x'\nmap = 'sdm63'\n",
     'c.toml: sources.m.map: expected one of '),
    (STATION + "[[sources]]\nid = 'm'\nkind = 'modbus-tcp'\nhost = 'x'\nmap = 'sdm63'\n",
     '"sdm63" (did you mean sdm630?)'),
    (VEHICLE + "[[sources]]\nid = 'car'\nkind = 'hil-ecu'\npids = { SPEEDD = 1.0 }\n",
     '"SPEEDD" (did you mean SPEED?)'),
    ("[device]\nrole = 'vehicle'\n[mqtt]\nurll = 'mqtt://x'\n",
     "mqtt.url: expected a value, found nothing (the key is required; is urll a typo of url?)"),
    (VEHICLE + "[spool]\nlow_water = nan\n", "spool.low_water: expected a number in "),
    (VEHICLE + "[batch]\nmax_age_ms = inf\n", "batch.max_age_ms: expected "),
    (VEHICLE + "[[sources]]\nid = ''\nkind = 'hil-ecu'\n", 'id: expected a non-empty string, found ""'),
])
def test_config_check_says_where_what_and_the_nearest_known_name(tmp_path, text, message):
    (tmp_path / "c.toml").write_text(text)
    proc = run("config", "check", str(tmp_path / "c.toml"), check=False)
    assert proc.returncode == 2, proc.stdout
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert str(tmp_path / "c.toml") in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
