"""What ``edge-agent status`` prints, and whether the agent is running.

Scope: read the snapshot (agent/status.py) and say in words what the agent is doing; decide
"not running" when the file is missing, says ``stopped``, is older than
``max(3 * interval_s, 10 s)``, or names a pid that no longer exists. Exit codes follow the
LSB init-script convention ``systemctl status`` uses (0 running, 3 not running, 4 unknown).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path

from agent.errors import DecodeError
from agent.jsoncodec import to_json_value
from agent.status import (
    AgentStatus,
    ErrorRecord,
    SpoolStatus,
    StatusConfig,
    UplinkStatus,
    read_status,
    status_path,
)

STALE_MIN_S = 10.0
EXIT_RUNNING, EXIT_NOT_RUNNING, EXIT_UNKNOWN = 0, 3, 4


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
                        run_dir: Path = Path("/run/edge-agent"),
                        state_dir: Path | None = None) -> Path:
    """For ``edge-agent status [--config FILE] [--state-dir DIR] [--file PATH]``: an explicit
    file wins, else the config's ``[status] path`` / ``[device] state_dir``, else
    ``--state-dir`` or ``$EDGE_AGENT_STATE_DIR`` (where an agent started by hand writes it),
    else the service's ``/run/edge-agent``, else ``/var/lib/edge-agent``. Config errors are
    ConfigErrors (the CLI prints them)."""
    if status_file is not None:
        return status_file
    env = dict(os.environ if environ is None else environ)
    env.pop("RUNTIME_DIRECTORY", None)    # the CLI's own, if any, is not the agent's
    if config_file is not None:
        from agent.config import load_config

        config = load_config(config_file)
        configured = StatusConfig.from_table(config.section("status")).path
        return status_path(config.device.state_dir, configured, env, run_dir)
    chosen = state_dir or (Path(env["EDGE_AGENT_STATE_DIR"]) if env.get("EDGE_AGENT_STATE_DIR")
                           else None)
    if chosen is not None:
        return status_path(chosen, None, env, None)
    return status_path(Path("/var/lib/edge-agent"), None, env, run_dir)


def status_summary(path: Path, now_ns: int | None = None, *,
                   check_pid: bool = True, as_json: bool = False) -> tuple[str, int]:
    """What ``edge-agent status`` prints, and its exit code (0 running, 3 not, 4 unknown).

    ``as_json``: one object for scripts, ``{"running", "reason", "file", "status"}`` with
    the snapshot as the agent wrote it (``null`` when there is none)."""
    now_ns = time.time_ns() if now_ns is None else now_ns
    status: AgentStatus | None = None
    try:
        status = read_status(path)
    except FileNotFoundError:
        problem, code = f"edge-agent is not running (no status file at {path})", EXIT_NOT_RUNNING
    except PermissionError:
        problem, code = f"cannot read {path}: permission denied (try sudo)", EXIT_UNKNOWN
    except (DecodeError, OSError) as exc:
        problem, code = f"status file {path} is unreadable: {exc}", EXIT_UNKNOWN
    if status is None:
        if as_json:
            return _json(False, problem, path, None), code
        return problem, code
    reason = not_running_reason(status, now_ns, pid_alive(status.pid) if check_pid else None)
    code = EXIT_RUNNING if reason is None else EXIT_NOT_RUNNING
    if as_json:
        return _json(reason is None, reason, path, status), code
    text = format_status(status, now_ns)
    if reason is not None:
        return f"edge-agent is NOT RUNNING: {reason}\nlast known state:\n{text}", code
    return text, code


def _json(running: bool, reason: str | None, path: Path, status: AgentStatus | None) -> str:
    return json.dumps({"running": running, "reason": reason, "file": str(path),
                       "status": to_json_value(status) if status is not None else None})


def format_status(status: AgentStatus, now_ns: int) -> str:
    up_s = (now_ns - status.started_ns) / 1e9
    lines = [f"edge-agent {status.version} {status.role} {status.device_id!r}: {status.state}, "
             f"pid {status.pid}, up {_duration(up_s)}, "
             f"updated {_ago((now_ns - status.updated_ns) / 1e9)}"]
    lines.append("sources:" if status.sources else "sources: none")
    for source in status.sources:
        faults = ", ".join(f"{k}={v}" for k, v in sorted(source.counters.items()) if v)
        requests = ", ".join(f"{k}={v}" for k, v in sorted(source.requests.items()) if v)
        lines.append(f"  {source.id:<10} {source.kind:<11} {source.state:<9} "
                     f"{source.rate_hz:7.1f}/s {source.readings:>9} readings"
                     + (f"  requests: {requests}" if requests else "")
                     + (f"  faults: {faults}" if faults else ""))
        if source.meters:
            lines.append(f"    meters: {', '.join(source.meters)}")
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
    full = f"DISK FULL ({spool.lost} envelopes not stored, declared), " \
        if spool.state == "disk-full" else ""
    return (f"spool:    {full}{spool.depth} envelopes waiting, {_size(spool.bytes)} of "
            f"{_size(spool.capacity_bytes)} ({share:.1f} %){oldest}, next seq {spool.next_seq}, "
            f"dropped {spool.dropped}")


def _uplink_line(uplink: UplinkStatus | None, now_ns: int) -> str:
    if uplink is None:
        return "uplink:   not configured"
    since = f" for {_duration((now_ns - uplink.since_ns) / 1e9)}" if uplink.since_ns else ""
    mqtt = f", MQTT {uplink.protocol}" if uplink.protocol else ""
    line = (f"uplink:   {uplink.state} ({uplink.broker}{mqtt}){since}, "
            f"{uplink.published} published, "
            f"{uplink.in_flight} in flight, {uplink.reconnects} reconnects")
    if uplink.last_error is not None:
        line += f"\n    last error {_error(uplink.last_error, now_ns)}"
    return line


def _error(error: ErrorRecord, now_ns: int) -> str:
    text = (f"{_clock(error.ts_ns)} ({_ago((now_ns - error.ts_ns) / 1e9)}) {error.where} "
            f"{error.reason}: {error.message}")
    if error.count > 1:
        text += f" ({error.count} times since {_clock(error.first_seen_ns)})"
    return text


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
