"""Logging: journald's native protocol with priorities and fields, <N> prefixes, JSON, -v
vs -vv against a real paho client and mosquitto, and the repeat limit."""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import time
from pathlib import Path

import paho.mqtt.client as paho
import pytest

from agent.errors import UplinkError
from agent.logsetup import RepeatFilter, StatusFeed, setup_logging
from agent.status import ErrorLog

log = logging.getLogger("edge_agent.test")


@pytest.fixture(autouse=True)
def restore_logging():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


def journal_stream(tmp_path: Path):
    stream = (tmp_path / "stderr").open("w+")
    info = os.fstat(stream.fileno())
    return stream, {"JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"}


def parse_journal(data: bytes) -> dict[str, str]:
    fields, i = {}, 0
    while i < len(data):
        end = data.index(b"\n", i)
        line = data[i:end]
        if b"=" in line:
            key, _, value = line.partition(b"=")
            fields[key.decode()] = value.decode()
            i = end + 1
        else:                                   # KEY\n <u64 le length> value \n
            size = int.from_bytes(data[end + 1:end + 9], "little")
            fields[line.decode()] = data[end + 9:end + 9 + size].decode()
            i = end + 9 + size + 1
    return fields


def test_under_journald_lines_go_to_the_journal_with_priority_and_fields(tmp_path):
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(tmp_path / "journal"))
    server.settimeout(5)
    stream, env = journal_stream(tmp_path)
    setup_logging(0, "auto", stream, env, journal_socket=str(tmp_path / "journal"))
    log.warning("uplink: %s", UplinkError("broker unreachable", reason="unreachable"))
    log.error("two\nlines")
    first, second = parse_journal(server.recv(65536)), parse_journal(server.recv(65536))
    assert first["PRIORITY"] == "4" and first["MESSAGE"] == "uplink: broker unreachable"
    assert first["EDGE_AGENT_REASON"] == "unreachable" and first["EDGE_AGENT_WHERE"] == "test"
    assert first["SYSLOG_IDENTIFIER"] == "edge-agent" and first["CODE_FILE"].endswith(".py")
    assert second["PRIORITY"] == "3" and second["MESSAGE"] == "two\nlines"
    assert stream.tell() == 0                   # nothing went to stderr as well


def test_without_the_journal_socket_stderr_lines_carry_sd_daemon_prefixes(tmp_path):
    stream, env = journal_stream(tmp_path)
    setup_logging(0, "auto", stream, env, journal_socket=str(tmp_path / "missing"))
    log.warning("careful")
    log.info("fine")
    stream.seek(0)
    assert stream.read().splitlines() == ["<4>WARNING edge_agent.test: careful",
                                          "<6>INFO edge_agent.test: fine"]


def test_json_lines(tmp_path):
    out = io.StringIO()
    setup_logging(0, "json", out, {})
    log.warning("spool: %s", UplinkError("x", reason="disk-full"))
    item = json.loads(out.getvalue())
    assert item["level"] == "warning" and item["reason"] == "disk-full"
    assert item["logger"] == "edge_agent.test" and item["message"] == "spool: x"


def paho_session(url_port: int, logger: logging.Logger) -> None:
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="log-test")
    client.enable_logger(logger)               # as the uplink does (paho's own logger)
    client.connect("127.0.0.1", url_port)
    deadline = time.monotonic() + 10
    while not client.is_connected() and time.monotonic() < deadline:
        client.loop(0.1)
    assert client.is_connected()
    client.disconnect()


@pytest.mark.parametrize("verbosity,packets", [(1, False), (2, True)])
def test_v_shows_our_debug_and_vv_the_packet_dump(mosquitto, verbosity, packets):
    out = io.StringIO()
    setup_logging(verbosity, "text", out, {})
    uplink = logging.getLogger("edge_agent.uplink")
    uplink.debug("our own debug line")
    paho_session(int(mosquitto.url.rsplit(":", 1)[1]), logging.getLogger("paho.mqtt.client"))
    text = out.getvalue()
    assert "our own debug line" in text
    assert ("Sending CONNECT" in text) is packets, text


def test_default_shows_no_debug(mosquitto):
    out = io.StringIO()
    setup_logging(0, "text", out, {})
    uplink = logging.getLogger("edge_agent.uplink")
    uplink.debug("our own debug line")
    paho_session(int(mosquitto.url.rsplit(":", 1)[1]), logging.getLogger("paho.mqtt.client"))
    assert out.getvalue() == ""


def test_repeats_are_limited_per_distinct_error_and_counted():
    now = [0.0]
    repeat = RepeatFilter(interval_s=10, clock=lambda: now[0])
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(repeat)
    errors = ErrorLog()
    feed = StatusFeed(errors.add_entry)
    logger = logging.getLogger("edge_agent.telemetry.repeat")
    logger.propagate = False
    logger.addHandler(feed)                    # the status sees every one ...
    logger.addHandler(handler)                 # ... the log one per 10 s
    try:
        for i in range(240):                   # 24 a second for 10 s
            now[0] = i / 24
            logger.error("spool commit failed (%s): %d envelope(s) not stored", "disk-full", i)
            logger.warning("another error")
        now[0] = 10.5
        logger.error("spool commit failed (%s): %d envelope(s) not stored", "disk-full", 1)
    finally:
        logger.removeHandler(handler)
        logger.removeHandler(feed)
        logger.propagate = True
    lines = out.getvalue().splitlines()
    assert lines == ["spool commit failed (disk-full): 0 envelope(s) not stored",
                     "another error",
                     "spool commit failed (disk-full): 1 envelope(s) not stored "
                     "[repeated 239 times in the last 10 s]"]
    counts = {e.message.split(":")[0]: e.count for e in errors.snapshot()}
    assert counts == {"spool commit failed (disk-full)": 241, "another error": 240}


def test_the_status_error_log_never_carries_the_logs_repeat_note():
    """Handlers run in order: a feed after the rate-limited handler sees the record with
    the log's "[repeated N times ...]" note in it, and must leave it out."""
    now = [0.0]
    handler = logging.StreamHandler(io.StringIO())
    handler.addFilter(RepeatFilter(interval_s=10, clock=lambda: now[0]))
    errors = ErrorLog()
    logger = logging.getLogger("edge_agent.telemetry.repeat2")
    logger.propagate = False
    logger.addHandler(handler)                 # the log first ...
    logger.addHandler(StatusFeed(errors.add_entry))   # ... then the status
    try:
        for i in range(3):
            now[0] = i * 6.0                   # 0, 6 (suppressed), 12 (with the note)
            logger.error("broker unreachable")
    finally:
        logger.handlers.clear()
        logger.propagate = True
    assert [(e.message, e.count) for e in errors.snapshot()] == [("broker unreachable", 3)]
