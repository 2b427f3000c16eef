"""Logging for ``edge-agent run``: levels, formats, journald, rate limit, the status feed.

Scope: :func:`setup_logging` installs one handler on the root logger; :class:`RepeatFilter`
rate-limits repeating warnings; :class:`StatusFeed` copies every warning or worse into the
status snapshot's error log. Stdlib only.

Rules:

* Verbosity. Default: INFO for our loggers (``edge_agent.*``, ``agent.*``,
  ``firmware_adapters.*``, ``hil.*``), WARNING for libraries. ``-v``: our DEBUG lines too,
  but not the MQTT library's packet dump (paho logs it as ``paho.mqtt.client``, and it
  is told apart by the file that logged it). ``-vv``: everything, packet dump included.
* Formats. ``text`` (default on a terminal: time, level, logger, message), ``json`` (one
  object a line: ``ts``, ``level``, ``logger``, ``message`` and the structured fields), and
  ``journal``: chosen automatically when stderr is connected to journald
  (``$JOURNAL_STREAM`` names stderr's device and inode, systemd.exec(5)). Then every line
  is sent over journald's native protocol (systemd's "Native Journal Protocol": one
  datagram of ``KEY=value`` lines to /run/systemd/journal/socket) with ``PRIORITY``,
  ``SYSLOG_IDENTIFIER``, ``CODE_FILE``/``CODE_LINE``/``CODE_FUNC`` and our fields
  (``EDGE_AGENT_LOGGER``, ``EDGE_AGENT_REASON``, ``EDGE_AGENT_WHERE``), so that
  ``journalctl -p warning`` and ``journalctl EDGE_AGENT_REASON=disk-full`` work. If that
  socket is not there, the stderr line carries an sd-daemon(3) ``<N>`` prefix, which
  journald reads as the priority.
* Rate limit. A warning or worse that repeats (same logger, level, format string and
  non-numeric arguments) is written once per ``interval_s`` (10 s); the next line that
  gets through says how many were suppressed. A full disk used to print the same
  "spool commit failed" line ~24 times a second.
* The status sees what the log sees (issue 15.4): :class:`StatusFeed` adds each warning or
  worse to an :class:`agent.status.ErrorLog` with a count and first/last time, before the
  rate limit, so the counts are true even when lines are suppressed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Callable, Mapping
from typing import TextIO

from agent.errors import EdgeAgentError

OUR_LOGGERS = ("edge_agent", "agent", "firmware_adapters", "hil")
LIBRARY_FILES = (f"{os.sep}paho{os.sep}", f"{os.sep}aiomqtt{os.sep}", f"{os.sep}amqtt{os.sep}")
JOURNAL_SOCKET = "/run/systemd/journal/socket"
IDENTIFIER = "edge-agent"
REPEAT_INTERVAL_S = 10.0
FORMATS = ("auto", "text", "json", "journal")

# syslog(3) priorities, as journald and sd-daemon(3) use them.
_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6,
             logging.DEBUG: 7}


def priority(levelno: int) -> int:
    for level in (logging.CRITICAL, logging.ERROR, logging.WARNING, logging.INFO):
        if levelno >= level:
            return _PRIORITY[level]
    return 7


def is_ours(record: logging.LogRecord) -> bool:
    """Our own code's line (not a library's, even when logged through our logger)."""
    if any(part in record.pathname for part in LIBRARY_FILES):
        return False
    return record.name.partition(".")[0] in OUR_LOGGERS


def fields(record: logging.LogRecord) -> dict[str, str]:
    """The structured fields of a record: ``reason`` and ``where`` from ``extra=`` or from
    an EdgeAgentError among the arguments."""
    out: dict[str, str] = {}
    reason = getattr(record, "reason", None)
    where = getattr(record, "where", None)
    if reason is None:
        args = record.args if isinstance(record.args, tuple) else ()
        errors = [a for a in args if isinstance(a, EdgeAgentError)]
        if errors:
            reason = errors[0].reason
        elif record.exc_info and isinstance(record.exc_info[1], EdgeAgentError):
            reason = record.exc_info[1].reason
    if reason is not None:
        out["reason"] = str(reason)
    out["where"] = str(where) if where is not None else _where(record.name)
    return out


def _where(name: str) -> str:
    for prefix in ("edge_agent.", "agent.", "firmware_adapters.", "hil."):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


class VerbosityFilter(logging.Filter):
    """0: INFO for ours, WARNING for libraries; 1: DEBUG for ours; 2: everything."""

    def __init__(self, verbosity: int) -> None:
        super().__init__()
        self.verbosity = verbosity

    def filter(self, record: logging.LogRecord) -> bool:
        if self.verbosity >= 2:
            return True
        floor = (logging.DEBUG if self.verbosity == 1 else logging.INFO) if is_ours(record) \
            else logging.WARNING
        return record.levelno >= floor


class RepeatFilter(logging.Filter):
    """One line per distinct warning per ``interval_s``; the next line says how many were
    suppressed (as " [repeated N times in the last 10 s]"). Time is an argument for tests."""

    def __init__(self, interval_s: float = REPEAT_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic, max_keys: int = 1000) -> None:
        super().__init__()
        self.interval_s, self.clock, self.max_keys = interval_s, clock, max_keys
        self._seen: dict[tuple[object, ...], tuple[float, int]] = {}
        self.suppressed = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = _repeat_key(record)
        now = self.clock()
        last = self._seen.get(key)
        if last is not None and now - last[0] < self.interval_s:
            self._seen[key] = (last[0], last[1] + 1)
            self.suppressed += 1
            return False
        if len(self._seen) >= self.max_keys:     # bounded: hostile input makes new messages
            self._seen.clear()
        self._seen[key] = (now, 0)
        if last is not None and last[1]:
            note = f" [repeated {last[1]} times in the last {self.interval_s:g} s]"
            record.msg = f"{record.msg}{note}"
            record.repeat_note = note  # the status's error log counts on its own (StatusFeed)
        return True


def _repeat_key(record: logging.LogRecord) -> tuple[object, ...]:
    args = record.args if isinstance(record.args, tuple) else ()
    # Numbers change from one line to the next ("3 envelopes not stored"); the error
    # they are about does not.
    words = tuple(str(a) for a in args if not isinstance(a, int | float))
    return (record.name, record.levelno, str(record.msg), words)


class TextFormatter(logging.Formatter):
    def __init__(self, with_time: bool, with_priority: bool) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s" if with_time
                         else "%(levelname)s %(name)s: %(message)s")
        self.with_priority = with_priority

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if self.with_priority:  # sd-daemon(3): journald reads "<N>" as the line's priority
            return "\n".join(f"<{priority(record.levelno)}>{line}" for line in text.split("\n"))
        return text


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        item: dict[str, object] = {
            "ts": round(record.created, 6), "level": record.levelname.lower(),
            "logger": record.name, "message": record.getMessage(), **fields(record)}
        if record.exc_info:
            item["traceback"] = self.formatException(record.exc_info)
        return json.dumps(item, ensure_ascii=False)


class JournalHandler(logging.Handler):
    """journald's native protocol over its datagram socket; falls back to ``fallback``
    (stderr with ``<N>`` prefixes) for a message the socket will not take."""

    def __init__(self, fallback: logging.Handler, address: str = JOURNAL_SOCKET) -> None:
        super().__init__()
        self.fallback, self.address = fallback, address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if record.exc_info:
                message += "\n" + logging.Formatter().formatException(record.exc_info)
            entries = {"MESSAGE": message, "PRIORITY": str(priority(record.levelno)),
                       "SYSLOG_IDENTIFIER": IDENTIFIER, "CODE_FILE": record.pathname,
                       "CODE_LINE": str(record.lineno), "CODE_FUNC": record.funcName,
                       "EDGE_AGENT_LOGGER": record.name}
            entries.update({f"EDGE_AGENT_{k.upper()}": v for k, v in fields(record).items()})
            self.sock.sendto(encode_journal(entries), self.address)
        except OSError:
            self.fallback.handle(record)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
        super().close()


def encode_journal(entries: Mapping[str, str]) -> bytes:
    """Native journal protocol: ``KEY=value\\n``; a value with a newline is sent as
    ``KEY\\n`` + 64-bit little-endian length + value + ``\\n``."""
    out = bytearray()
    for key, value in entries.items():
        data = value.encode("utf-8", "replace")
        if b"\n" in data:
            out += key.encode() + b"\n" + len(data).to_bytes(8, "little") + data + b"\n"
        else:
            out += key.encode() + b"=" + data + b"\n"
    return bytes(out)


def under_journald(stream: TextIO, environ: Mapping[str, str]) -> bool:
    """True when ``stream`` is the journal stream systemd connected (systemd.exec(5):
    ``$JOURNAL_STREAM`` is ``<device>:<inode>`` of it)."""
    value = environ.get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    if not (device.isdigit() and inode.isdigit()):
        return False
    try:
        info = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return info.st_dev == int(device) and info.st_ino == int(inode)


def setup_logging(verbosity: int = 0, fmt: str = "auto", stream: TextIO | None = None,
                  environ: Mapping[str, str] | None = None,
                  journal_socket: str = JOURNAL_SOCKET) -> logging.Handler:
    """Install the one root handler (replacing earlier ones); returns it."""
    stream = sys.stderr if stream is None else stream
    env = os.environ if environ is None else environ
    journal = under_journald(stream, env)
    if fmt == "auto":
        fmt = "journal" if journal else "text"
    plain = logging.StreamHandler(stream)
    if fmt == "json":
        plain.setFormatter(JsonFormatter())
    else:   # journald stamps the time itself
        plain.setFormatter(TextFormatter(with_time=not journal and fmt == "text",
                                         with_priority=journal or fmt == "journal"))
    handler: logging.Handler = plain
    if fmt == "journal" and os.path.exists(journal_socket):
        handler = JournalHandler(plain, journal_socket)
    handler.addFilter(VerbosityFilter(verbosity))
    handler.addFilter(RepeatFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbosity else logging.INFO)
    # Libraries log below WARNING at a rate the filter would only throw away; with -v and
    # more their levels are left to the filter (NOTSET: a set-up before may have raised them).
    for name in ("paho", "aiomqtt", "amqtt", "pymodbus", "can", "web3", "asyncio"):
        logging.getLogger(name).setLevel(logging.NOTSET if verbosity else logging.WARNING)
    return handler


class StatusFeed(logging.Handler):
    """Every warning or worse, into the runtime's error log (count, first and last time).

    ``accept`` decides whether a record belongs to this agent (a process that runs two
    agents, as the demo does, gives each its own feed); records the runtime already put in
    the error log itself carry ``extra={"status_recorded": True}`` and are skipped."""

    def __init__(self, add: Callable[[int, str, str, str], object],
                 accept: Callable[[logging.LogRecord], bool] = lambda record: True) -> None:
        super().__init__(logging.WARNING)
        self.add, self.accept = add, accept

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "status_recorded", False) or not self.accept(record):
            return
        try:
            found = fields(record)
            reason = found.get("reason") or record.levelname.lower()
            message = record.getMessage()
            note = getattr(record, "repeat_note", "")
            if note and message.endswith(note):  # the log's note, not part of the error
                message = message[:-len(note)]
            self.add(int(record.created * 1e9), found["where"], reason, message)
        except Exception:  # noqa: BLE001 - logging must never raise (logging.Handler rule)
            self.handleError(record)
