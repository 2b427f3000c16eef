"""The status snapshot the runtime writes and ``edge-agent status`` prints.

Scope: the values (frozen dataclasses the runtime fills), their JSON form, an atomic file
writer, a strict reader, and the human summary with stale-file detection. No asyncio, no
clocks: ``now_ns`` is an argument everywhere.

Rules:

* The runtime rewrites the file every ``interval_s`` (default 2 s) by writing a temporary
  file in the same directory and renaming it over the old one (rename(2) is atomic), so a
  reader sees the old or the new snapshot, never half of one. No fsync: the snapshot is
  disposable and should live on tmpfs (``/run/edge-agent`` under systemd) so that it does
  not wear the SD card.
* The file is input like any other: a truncated or edited file gives a :class:`DecodeError`
  naming the field, never a traceback from deep inside ``json``.
* The agent is "not running" when the file is missing, says ``stopped``, is older than
  ``max(3 * interval_s, 10 s)``, or names a pid that no longer exists.
* Nothing secret goes in: broker as ``host:port`` without credentials, error messages from
  our error tree (which never carry key material).

The JSON codec (:func:`to_json_value` / :func:`from_json_value`) handles the shapes these
dataclasses use (int, float, str, bool, None unions, tuples, ``dict[str, int]``, nested
dataclasses); ``hil.report`` uses it for the session record.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
import types
import typing
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from agent.errors import DecodeError, EdgeAgentError
from agent.options import Table

STATUS_VERSION = 1
STATUS_FILE = "status.json"
MAX_STATUS_BYTES = 1 << 20
MAX_ERRORS = 20
MAX_MESSAGE_LEN = 300
STALE_MIN_S = 10.0
# LSB init-script exit codes, as `systemctl status` uses them.
EXIT_RUNNING, EXIT_NOT_RUNNING, EXIT_UNKNOWN = 0, 3, 4

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ErrorRecord:
    """One fault: when, where (a task name: ``source[obd0]``, ``uplink``), our reason code."""

    ts_ns: int
    where: str
    reason: str
    message: str

    @classmethod
    def from_exception(cls, ts_ns: int, where: str, exc: BaseException) -> ErrorRecord:
        reason = exc.reason if isinstance(exc, EdgeAgentError) else type(exc).__name__
        return cls(ts_ns, where, reason, str(exc)[:MAX_MESSAGE_LEN])


@dataclass(frozen=True, slots=True)
class SourceStatus:
    id: str
    kind: str
    state: str                          # starting | running | retrying | failed | stopped
    readings: int = 0                   # emitted since start
    rate_hz: float = 0.0
    counters: dict[str, int] = field(default_factory=dict)   # Source.counters (faults)
    last_error: ErrorRecord | None = None


@dataclass(frozen=True, slots=True)
class SpoolStatus:
    depth: int                          # envelopes committed, not yet acknowledged
    bytes: int
    capacity_bytes: int
    next_seq: int
    oldest_ts_ns: int | None = None
    dropped: int = 0                    # envelopes deleted unsent (declared by drop envelopes)


@dataclass(frozen=True, slots=True)
class UplinkStatus:
    state: str                          # connected | connecting | disconnected | disabled
    broker: str                         # host:port, never credentials
    since_ns: int | None = None         # when ``state`` was entered
    published: int = 0                  # acknowledged (PUBACK) since start
    in_flight: int = 0
    reconnects: int = 0
    last_error: ErrorRecord | None = None


@dataclass(frozen=True, slots=True)
class ChannelStatus:
    channel_id: str                     # hex
    peer: str
    state: str                          # the protocol state's name
    nonce: int
    energy_wh: int
    t_ev: int                           # paid vehicle -> station, token's smallest unit
    t_cs: int                           # paid station -> vehicle (V2G)
    connector: int = 0
    settlement: str = ""                # the settlement job: waiting | closing | settled ...
    end_reason: str = ""                # why the session ended (max-energy, cable-pulled ...)


@dataclass(frozen=True, slots=True)
class AgentStatus:
    device_id: str
    role: str
    pid: int
    state: str                          # starting | running | stopping | stopped
    started_ns: int
    updated_ns: int
    interval_s: float
    version: str = ""
    sources: tuple[SourceStatus, ...] = ()
    spool: SpoolStatus | None = None
    uplink: UplinkStatus | None = None
    channels: tuple[ChannelStatus, ...] = ()
    errors: tuple[ErrorRecord, ...] = ()    # the last MAX_ERRORS, oldest first
    format: int = STATUS_VERSION


class ErrorLog:
    """The bounded list of last errors the runtime keeps for the snapshot."""

    def __init__(self, maxlen: int = MAX_ERRORS) -> None:
        self._items: deque[ErrorRecord] = deque(maxlen=maxlen)

    def add(self, ts_ns: int, where: str, exc: BaseException) -> ErrorRecord:
        record = ErrorRecord.from_exception(ts_ns, where, exc)
        self._items.append(record)
        return record

    def snapshot(self) -> tuple[ErrorRecord, ...]:
        return tuple(self._items)


class RateMeter:
    """Readings per second over a sliding window; time is an argument (no clock here)."""

    def __init__(self, window_s: float = 10.0) -> None:
        self.window_ns = int(window_s * 1e9)
        self._samples: deque[tuple[int, int]] = deque()

    def observe(self, total: int, now_ns: int) -> None:
        self._samples.append((now_ns, total))
        while len(self._samples) > 2 and now_ns - self._samples[1][0] >= self.window_ns:
            self._samples.popleft()

    def rate(self) -> float:
        if len(self._samples) < 2:
            return 0.0
        (t0, n0), (t1, n1) = self._samples[0], self._samples[-1]
        return (n1 - n0) * 1e9 / (t1 - t0) if t1 > t0 else 0.0


# --- config ---------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class StatusConfig:
    """``[status]``: ``path`` (default: see :func:`status_path`), ``interval_s``."""

    path: Path | None = None
    interval_s: float = 2.0

    @classmethod
    def from_table(cls, table: Table) -> StatusConfig:
        raw = table.opt_str("path")
        value = cls(path=Path(raw) if raw else None,
                    interval_s=table.float("interval_s", 2.0, min=0.1, max=300.0))
        table.reject_unknown()
        return value


def status_path(state_dir: Path, configured: Path | None = None,
                environ: Mapping[str, str] | None = None,
                run_dir: Path = Path("/run/edge-agent")) -> Path:
    """Where the snapshot lives; the runtime and ``edge-agent status`` agree on it.

    The configured path wins; else ``$RUNTIME_DIRECTORY`` (set by systemd's
    RuntimeDirectory=); else ``/run/edge-agent`` if it exists (the CLI, run by a technician
    on a box where the unit runs); else the state directory.
    """
    if configured is not None:
        return configured
    runtime_dir = (os.environ if environ is None else environ).get("RUNTIME_DIRECTORY")
    if runtime_dir:
        return Path(runtime_dir.split(":")[0]) / STATUS_FILE
    if run_dir.is_dir():
        return run_dir / STATUS_FILE
    return state_dir / STATUS_FILE


# --- JSON codec -----------------------------------------------------------------------------

def to_json_value(value: object) -> object:
    """Dataclasses -> dicts, tuples -> lists, bytes -> hex; everything else as it is."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_json_value(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple | list):
        return [to_json_value(item) for item in value]
    if isinstance(value, Mapping):
        return {str(k): to_json_value(v) for k, v in value.items()}
    if isinstance(value, bytes):
        return value.hex()
    return value


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_json_value(kind: Any, data: object, where: str = "") -> Any:
    """Inverse of :func:`to_json_value` for annotation ``kind``; DecodeError names ``where``."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(kind)
        if data is None and type(None) in options:
            return None
        (inner,) = [option for option in options if option is not type(None)]
        return from_json_value(inner, data, where)
    if dataclasses.is_dataclass(kind):
        return _dataclass_from_json(kind, data, where)
    if origin is tuple:
        inner = typing.get_args(kind)[0]
        _expect(isinstance(data, list), where, "an array", data)
        return tuple(from_json_value(inner, item, f"{where}[{i}]") for i, item in enumerate(data))
    if origin is dict:
        key_kind, value_kind = typing.get_args(kind)
        _expect(isinstance(data, dict), where, "an object", data)
        return {key: from_json_value(value_kind, item, f"{where}.{key}")
                for key, item in data.items()}
    if kind is bytes:
        _expect(isinstance(data, str), where, "a hex string", data)
        try:
            return bytes.fromhex(data)
        except ValueError:
            raise DecodeError(f"{where}: expected a hex string", reason="bad-json-value") from None
    if kind is float:
        _expect(isinstance(data, int | float) and not isinstance(data, bool), where, "a number",
                data)
        return float(data)
    if kind in (int, str, bool):
        _expect(isinstance(data, kind) and (kind is bool or not isinstance(data, bool)), where,
                kind.__name__, data)
        return data
    if kind is object:
        return data
    raise TypeError(f"{where}: no JSON decoding for {kind!r}")   # a bug in our annotations


def _dataclass_from_json(cls: type[T], data: object, where: str) -> T:
    _expect(isinstance(data, dict), where or cls.__name__, "an object", data)
    assert isinstance(data, dict)
    hints = _hints(cls)
    values = {}
    for f in dataclasses.fields(cls):   # type: ignore[arg-type]
        path = f"{where}.{f.name}" if where else f.name
        if f.name in data:
            values[f.name] = from_json_value(hints[f.name], data[f.name], path)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise DecodeError(f"{path}: missing", reason="bad-json-value")
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise DecodeError(f"{where or cls.__name__}: {exc}", reason="bad-json-value") from None


def _expect(ok: bool, where: str, expected: str, found: object) -> None:
    if not ok:
        shown = type(found).__name__ if not isinstance(found, int | float | str) else repr(found)
        raise DecodeError(f"{where}: expected {expected}, found {shown[:40]}",
                          reason="bad-json-value")


def decode_json(cls: type[T], data: bytes, max_bytes: int = MAX_STATUS_BYTES) -> T:
    if len(data) > max_bytes:
        raise DecodeError(f"{cls.__name__}: larger than {max_bytes} bytes", reason="oversize")
    try:
        parsed = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise DecodeError(f"{cls.__name__}: not JSON: {exc}", reason="bad-json") from None
    return from_json_value(cls, parsed)


# --- file -----------------------------------------------------------------------------------

def encode_status(status: AgentStatus) -> bytes:
    return json.dumps(to_json_value(status), separators=(",", ":"), allow_nan=False).encode()


def write_status(path: Path, status: AgentStatus) -> None:
    """Replace ``path`` atomically with the snapshot. Errors: EdgeAgentError(status-write)."""
    try:
        data = encode_status(status)
    except (TypeError, ValueError) as exc:   # a NaN rate, a value of the wrong type: a bug
        raise EdgeAgentError(f"cannot encode the status snapshot: {exc}",
                             reason="status-encode") from exc
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW,
                     0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise EdgeAgentError(f"cannot write status file {path}: {exc.strerror}",
                             reason="status-write") from exc


def read_status(path: Path) -> AgentStatus:
    """The snapshot; FileNotFoundError if there is none, DecodeError if it is damaged."""
    with path.open("rb") as handle:
        data = handle.read(MAX_STATUS_BYTES + 1)
    status = decode_json(AgentStatus, data)
    if status.format != STATUS_VERSION:
        raise DecodeError(f"format: expected {STATUS_VERSION}, found {status.format}",
                          reason="bad-json-value")
    return status


# --- the runtime's status task -------------------------------------------------------------

def status_line(status: AgentStatus) -> str:
    """One line for systemd's ``STATUS=`` (shown by ``systemctl status``)."""
    rate = sum(source.rate_hz for source in status.sources)
    running = sum(source.state == "running" for source in status.sources)
    parts = [f"{status.state}: {running}/{len(status.sources)} sources, {rate:.1f} readings/s"]
    if status.spool is not None:
        parts.append(f"spool {status.spool.depth}")
    if status.uplink is not None:
        parts.append(f"uplink {status.uplink.state}")
    parts += [f"channel {ch.state} nonce {ch.nonce}" for ch in status.channels[:2]]
    return ", ".join(parts)


class Notify(typing.Protocol):
    def status(self, text: str) -> bool: ...

    def watchdog(self) -> bool: ...


async def publish_status(snapshot: Callable[[], AgentStatus], path: Path, interval_s: float,
                         notifier: Notify | None = None,
                         watchdog_interval_s: float | None = None,
                         on_error: Callable[[BaseException], None] | None = None) -> None:
    """The runtime's ``status`` task: until cancelled, every tick write the snapshot, send
    ``WATCHDOG=1`` and (when it changed) ``STATUS=``.

    The tick is ``interval_s``, shortened to ``watchdog_interval_s`` (half of systemd's
    WatchdogSec, :func:`agent.sdnotify.watchdog_interval_s`) when that is shorter. Pinging
    from this event-loop task is deliberate: a loop that hangs stops the pings and systemd
    restarts the agent. A failed write goes to ``on_error`` and the task goes on.
    """
    import asyncio  # here, not at the top: the CLI's `status` imports this module too

    tick = min(interval_s, watchdog_interval_s or interval_s)
    last_line = None
    while True:
        status = snapshot()
        try:
            write_status(path, status)
        except EdgeAgentError as exc:
            if on_error is not None:
                on_error(exc)
        if notifier is not None:
            notifier.watchdog()
            line = status_line(status)
            if line != last_line:
                notifier.status(line)
                last_line = line
        await asyncio.sleep(tick)


# --- human summary --------------------------------------------------------------------------

def pid_alive(pid: int) -> bool | None:
    """True/False when we can tell (same pid namespace), None when we cannot."""
    if pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True                     # exists, belongs to another user
    except OSError:
        return None
    return True


def not_running_reason(status: AgentStatus, now_ns: int,
                       alive: bool | None = None) -> str | None:
    """Why the snapshot does not describe a running agent, or None if it does."""
    age_s = (now_ns - status.updated_ns) / 1e9
    limit_s = max(3 * status.interval_s, STALE_MIN_S)
    if status.state == "stopped":
        return f"stopped {_ago(age_s)}"
    if alive is False:
        return (f"pid {status.pid} is gone without a clean shutdown (crashed or killed; "
                f"last update {_ago(age_s)})")
    if age_s > limit_s:
        return f"status is stale: last update {_ago(age_s)} (expected every {status.interval_s:g} s)"
    return None


def resolve_status_path(config_file: Path | None = None, status_file: Path | None = None,
                        environ: Mapping[str, str] | None = None,
                        run_dir: Path = Path("/run/edge-agent")) -> Path:
    """For ``edge-agent status [--config FILE] [--file PATH]``: an explicit file wins, else
    the config's ``[status] path`` / ``[device] state_dir``, else the defaults. Config errors
    are ConfigErrors (the CLI prints them)."""
    if status_file is not None:
        return status_file
    state_dir, configured = Path("/var/lib/edge-agent"), None
    if config_file is not None:
        from agent.config import load_config

        config = load_config(config_file)
        state_dir = config.device.state_dir
        configured = StatusConfig.from_table(config.section("status")).path
    env = dict(os.environ if environ is None else environ)
    env.pop("RUNTIME_DIRECTORY", None)    # the CLI's own, if any, is not the agent's
    return status_path(state_dir, configured, env, run_dir)


def status_summary(path: Path, now_ns: int | None = None, *,
                   check_pid: bool = True) -> tuple[str, int]:
    """What ``edge-agent status`` prints, and its exit code (0 running, 3 not, 4 unknown)."""
    now_ns = time.time_ns() if now_ns is None else now_ns
    try:
        status = read_status(path)
    except FileNotFoundError:
        return f"edge-agent is not running (no status file at {path})", EXIT_NOT_RUNNING
    except PermissionError:
        return f"cannot read {path}: permission denied (try sudo)", EXIT_UNKNOWN
    except (DecodeError, OSError) as exc:
        return f"status file {path} is unreadable: {exc}", EXIT_UNKNOWN
    reason = not_running_reason(status, now_ns, pid_alive(status.pid) if check_pid else None)
    text = format_status(status, now_ns)
    if reason is not None:
        return f"edge-agent is NOT RUNNING: {reason}\nlast known state:\n{text}", EXIT_NOT_RUNNING
    return text, EXIT_RUNNING


def format_status(status: AgentStatus, now_ns: int) -> str:
    up_s = (now_ns - status.started_ns) / 1e9
    lines = [f"edge-agent {status.version} {status.role} {status.device_id!r}: {status.state}, "
             f"pid {status.pid}, up {_duration(up_s)}, "
             f"updated {_ago((now_ns - status.updated_ns) / 1e9)}"]
    lines.append("sources:" if status.sources else "sources: none")
    for source in status.sources:
        faults = ", ".join(f"{k}={v}" for k, v in sorted(source.counters.items()) if v)
        lines.append(f"  {source.id:<10} {source.kind:<11} {source.state:<9} "
                     f"{source.rate_hz:7.1f}/s {source.readings:>9} readings"
                     + (f"  faults: {faults}" if faults else ""))
        if source.last_error is not None:
            lines.append(f"    last error {_error(source.last_error, now_ns)}")
    lines.append(_spool_line(status.spool, now_ns))
    lines.append(_uplink_line(status.uplink, now_ns))
    lines.append("channels:" if status.channels else "channels: none open")
    for ch in status.channels:
        lines.append(f"  {_short_hex(ch.channel_id)} peer {ch.peer} {ch.state} nonce {ch.nonce}: "
                     f"{ch.energy_wh} Wh, paid {ch.t_ev} (vehicle->station) / "
                     f"{ch.t_cs} (station->vehicle)"
                     + (f", connector {ch.connector}" if ch.connector else "")
                     + (f", ended: {ch.end_reason}" if ch.end_reason else "")
                     + (f", settlement {ch.settlement}" if ch.settlement else ""))
    lines.append("last errors:" if status.errors else "last errors: none")
    lines.extend(f"  {_error(error, now_ns)}" for error in status.errors[-5:])
    return "\n".join(lines)


def _spool_line(spool: SpoolStatus | None, now_ns: int) -> str:
    if spool is None:
        return "spool:    not open"
    share = 100 * spool.bytes / spool.capacity_bytes if spool.capacity_bytes else 0.0
    oldest = (f", oldest {_duration((now_ns - spool.oldest_ts_ns) / 1e9)} old"
              if spool.oldest_ts_ns is not None and spool.depth else "")
    return (f"spool:    {spool.depth} envelopes waiting, {_size(spool.bytes)} of "
            f"{_size(spool.capacity_bytes)} ({share:.1f} %){oldest}, next seq {spool.next_seq}, "
            f"dropped {spool.dropped}")


def _uplink_line(uplink: UplinkStatus | None, now_ns: int) -> str:
    if uplink is None:
        return "uplink:   not configured"
    since = f" for {_duration((now_ns - uplink.since_ns) / 1e9)}" if uplink.since_ns else ""
    line = (f"uplink:   {uplink.state} ({uplink.broker}){since}, {uplink.published} published, "
            f"{uplink.in_flight} in flight, {uplink.reconnects} reconnects")
    if uplink.last_error is not None:
        line += f"\n    last error {_error(uplink.last_error, now_ns)}"
    return line


def _error(error: ErrorRecord, now_ns: int) -> str:
    return (f"{_clock(error.ts_ns)} ({_ago((now_ns - error.ts_ns) / 1e9)}) {error.where} "
            f"{error.reason}: {error.message}")


def _clock(ts_ns: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(ts_ns / 1e9))


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    if seconds < 86400:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    return f"{seconds // 86400} d {seconds % 86400 // 3600} h"


def _ago(seconds: float) -> str:
    return "just now" if seconds < 1 else f"{_duration(seconds)} ago"


def _size(nbytes: int) -> str:
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("kB", 1 << 10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} B"


def _short_hex(text: str) -> str:
    return text if len(text) <= 16 else f"{text[:8]}..{text[-6:]}"
