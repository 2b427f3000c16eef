"""sd_notify against a real AF_UNIX datagram socket standing in for systemd."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.sdnotify import Notifier, notify_address, watchdog_interval_s, watchdog_usec


def _fields(datagram: bytes) -> dict[str, str]:
    return dict(line.split("=", 1) for line in datagram.decode().split("\n"))


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify.sock")
    sock.bind(path)
    sock.settimeout(5)
    yield sock, path
    sock.close()


@pytest.fixture
def abstract_manager() -> Iterator[tuple[socket.socket, str]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"edge-agent-test-{os.getpid()}-{id(sock)}"
    sock.bind(b"\0" + name.encode())
    sock.settimeout(5)
    yield sock, "@" + name
    sock.close()


def test_ready_watchdog_status_stopping_over_a_path_socket(manager) -> None:
    sock, path = manager
    with Notifier(environ={"NOTIFY_SOCKET": path}) as notifier:
        assert notifier.enabled
        assert notifier.ready("spool 0, uplink connecting")
        assert notifier.watchdog()
        assert notifier.status("line one\nWATCHDOG=1")     # must not smuggle a second field
        assert notifier.extend_timeout(2.5)
        assert notifier.stopping()
    ready = _fields(sock.recv(4096))
    assert ready == {"READY": "1", "MAINPID": str(os.getpid()),
                     "STATUS": "spool 0, uplink connecting"}
    assert _fields(sock.recv(4096)) == {"WATCHDOG": "1"}
    assert _fields(sock.recv(4096)) == {"STATUS": "line one WATCHDOG=1"}
    assert _fields(sock.recv(4096)) == {"EXTEND_TIMEOUT_USEC": "2500000"}
    assert _fields(sock.recv(4096)) == {"STOPPING": "1"}
    assert notifier.counters["notify-sent"] == 5


def test_abstract_namespace_socket(abstract_manager) -> None:
    sock, name = abstract_manager
    assert notify_address({"NOTIFY_SOCKET": name}) == b"\0" + name[1:].encode()
    with Notifier(environ={"NOTIFY_SOCKET": name}) as notifier:
        assert notifier.watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1"


def test_child_process_reports_ready_with_its_own_pid(manager) -> None:
    sock, path = manager
    code = "from agent.sdnotify import Notifier; n = Notifier(); n.ready(); n.watchdog()"
    env = dict(os.environ, NOTIFY_SOCKET=path)
    child = subprocess.run([sys.executable, "-c", code], env=env, timeout=60, check=True)
    assert child.returncode == 0
    first = _fields(sock.recv(4096))
    assert first["READY"] == "1" and first["MAINPID"].isdigit()
    assert first["MAINPID"] != str(os.getpid())
    assert sock.recv(4096) == b"WATCHDOG=1"


@pytest.mark.parametrize("value", [None, "", "relative/path", "@", "vsock:2:1234"])
def test_unset_or_unusable_socket_is_a_no_op(value: str | None) -> None:
    environ = {} if value is None else {"NOTIFY_SOCKET": value}
    notifier = Notifier(environ=environ)
    assert not notifier.enabled
    assert notifier.ready() is False and notifier.watchdog() is False
    assert not notifier.counters


def test_vanished_manager_is_counted_not_raised(tmp_path: Path) -> None:
    notifier = Notifier(environ={"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    assert notifier.ready() is False
    assert notifier.counters["notify-failed"] == 1
    notifier.close()


def test_watchdog_interval_is_half_the_timeout_and_only_for_our_pid() -> None:
    assert watchdog_interval_s({"WATCHDOG_USEC": "20000000"}) == 10.0
    assert watchdog_usec({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "123"}, pid=123) == 30_000_000
    assert watchdog_usec({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "124"}, pid=123) is None
    assert watchdog_usec({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "x"}, pid=123) is None
    for bad in ({}, {"WATCHDOG_USEC": ""}, {"WATCHDOG_USEC": "0"}, {"WATCHDOG_USEC": "-5"},
                {"WATCHDOG_USEC": "1e6"}):
        assert watchdog_interval_s(bad) is None
