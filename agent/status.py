"""The status snapshot: the values the runtime fills, and their file.

Scope: the model (frozen dataclasses), the bounded error log and rate meter the runtime keeps,
where the file lives (:func:`status_path`), and its atomic writer and strict reader. No
asyncio, no clocks: ``now_ns`` is an argument everywhere. The other jobs live beside it:

* agent/jsoncodec.py      the annotation-driven JSON codec these dataclasses use
* agent/status_publisher.py  the runtime's ``status`` task (file, sd_notify STATUS/WATCHDOG)
* agent/status_view.py    what ``edge-agent status`` prints, and "is it running?"

Rules:

* The runtime rewrites the file every ``interval_s`` (default 2 s) by writing a temporary
  file in the same directory and renaming it over the old one (rename(2) is atomic), so a
  reader sees the old or the new snapshot, never half of one. No fsync: the snapshot is
  disposable and should live on tmpfs (``/run/edge-agent`` under systemd) so that it does
  not wear the SD card.
* The file is input like any other: a truncated or edited file gives a :class:`DecodeError`
  naming the field, never a traceback from deep inside ``json``.
* Nothing secret goes in: broker as ``host:port`` without credentials, error messages from
  our error tree (which never carry key material).
"""

from __future__ import annotations

import json
import os
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from agent.errors import DecodeError, EdgeAgentError
from agent.jsoncodec import decode_json, to_json_value
from agent.options import Table

STATUS_VERSION = 1
STATUS_FILE = "status.json"
MAX_STATUS_BYTES = 1 << 20
MAX_ERRORS = 20
MAX_MESSAGE_LEN = 300

@dataclass(frozen=True, slots=True)
class ErrorRecord:
    """One kind of fault: where (a task name: ``source[obd0]``, ``uplink``), our reason
    code, the last message, how often and when it was first and last seen."""

    ts_ns: int                          # last seen
    where: str
    reason: str
    message: str
    count: int = 1
    first_ns: int = 0                   # first seen (0: same as ts_ns)

    @classmethod
    def from_exception(cls, ts_ns: int, where: str, exc: BaseException) -> ErrorRecord:
        reason = exc.reason if isinstance(exc, EdgeAgentError) else type(exc).__name__
        return cls(ts_ns, where, reason, str(exc)[:MAX_MESSAGE_LEN])

    @property
    def first_seen_ns(self) -> int:
        return self.first_ns or self.ts_ns


@dataclass(frozen=True, slots=True)
class SourceStatus:
    id: str
    kind: str
    state: str                          # starting | running | retrying | failed | stopped
    readings: int = 0                   # emitted since start
    rate_hz: float = 0.0
    counters: dict[str, int] = field(default_factory=dict)   # Source.counters (faults)
    last_error: ErrorRecord | None = None
    meters: tuple[str, ...] = ()        # Source.identities(): the meters behind a source
    requests: dict[str, int] = field(default_factory=dict)   # Source.requests (not faults)


@dataclass(frozen=True, slots=True)
class SpoolStatus:
    depth: int                          # envelopes committed, not yet acknowledged
    bytes: int
    capacity_bytes: int
    next_seq: int
    oldest_ts_ns: int | None = None
    dropped: int = 0                    # envelopes deleted unsent (declared by drop envelopes)
    state: str = "ok"                   # ok | disk-full (commits fail, or it cannot open)
    lost: int = 0                       # envelopes never stored (disk full), declared


@dataclass(frozen=True, slots=True)
class UplinkStatus:
    state: str                          # connected | connecting | disconnected | disabled | stopped
    broker: str                         # host:port, never credentials
    since_ns: int | None = None         # when ``state`` was entered
    published: int = 0                  # acknowledged (PUBACK) since start
    in_flight: int = 0
    reconnects: int = 0
    last_error: ErrorRecord | None = None
    protocol: str = ""                  # "5", "3.1.1", "3.1.1 (broker refused 5)"


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
    """The errors the runtime shows in the snapshot: one entry per (where, reason), with a
    count and first/last time, the most recent ``maxlen`` kinds, oldest first. Everything
    the log shows as a warning or worse lands here (agent/logsetup.py StatusFeed)."""

    def __init__(self, maxlen: int = MAX_ERRORS) -> None:
        self.maxlen = maxlen
        self._items: dict[tuple[str, str], ErrorRecord] = {}

    def add(self, ts_ns: int, where: str, exc: BaseException) -> ErrorRecord:
        record = ErrorRecord.from_exception(ts_ns, where, exc)
        return self.add_entry(ts_ns, where, record.reason, record.message)

    def add_entry(self, ts_ns: int, where: str, reason: str, message: str) -> ErrorRecord:
        key = (where, reason)
        old = self._items.pop(key, None)
        record = ErrorRecord(ts_ns, where, reason, message[:MAX_MESSAGE_LEN],
                             count=old.count + 1 if old else 1,
                             first_ns=old.first_seen_ns if old else ts_ns)
        self._items[key] = record       # re-inserted: dict order is "last seen" order
        while len(self._items) > self.maxlen:
            del self._items[next(iter(self._items))]
        return record

    def snapshot(self) -> tuple[ErrorRecord, ...]:
        return tuple(self._items.values())


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
                run_dir: Path | None = Path("/run/edge-agent")) -> Path:
    """Where the snapshot lives; the runtime and ``edge-agent status`` agree on it.

    The configured path wins; else ``$RUNTIME_DIRECTORY`` (set by systemd's
    RuntimeDirectory=); else ``run_dir`` if it exists (the CLI, run by a technician on a box
    where the unit runs; the runtime passes None: an agent started by hand must not
    overwrite the service's snapshot); else the state directory.
    """
    if configured is not None:
        return configured
    runtime_dir = (os.environ if environ is None else environ).get("RUNTIME_DIRECTORY")
    if runtime_dir:
        return Path(runtime_dir.split(":")[0]) / STATUS_FILE
    if run_dir is not None and run_dir.is_dir():
        return run_dir / STATUS_FILE
    return state_dir / STATUS_FILE


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
