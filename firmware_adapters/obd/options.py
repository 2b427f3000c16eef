"""The vehicle sources' shared options (PID periods, the poller's settings), on top of the
agent's one options validator (agent.options.Table): each returns a typed value or raises
ConfigError naming the file, the key, what was expected and what was found."""

from __future__ import annotations

import difflib

from agent.errors import LocalProtocolError, Prose
from agent.options import Table
from firmware_adapters.obd.pids import PIDS_BY_KEY, pid_spec
from firmware_adapters.obd.uds import load_profile

NS = 1_000_000_000

# PID key -> period in seconds when a config names none: what a fleet dashboard shows.
DEFAULT_PIDS: dict[str, float] = {
    "SPEED": 1.0, "RPM": 1.0, "HYBRID_BATTERY_REMAINING": 5.0, "ODOMETER": 5.0,
    "COOLANT_TEMP": 10.0, "CONTROL_MODULE_VOLTAGE": 10.0,
}


def pid_periods(o: Table, key: str = "pids") -> dict[int, int]:
    """``pids = { SPEED = 1.0, "0C" = 0.5 }``: PID key or hex -> period in seconds."""
    periods = {}
    for ref, period in o.mapping(key, DEFAULT_PIDS).items():
        try:
            spec = pid_spec(ref)
        except LocalProtocolError:
            near = difflib.get_close_matches(ref.upper(), PIDS_BY_KEY, n=1)
            hint = f" (did you mean {near[0]}?)" if near else ""
            raise o.error(f"{key}.{ref}", "a PID key (SPEED) or hex (0D) from the "
                          "table in firmware_adapters/obd/pids.py", Prose(f'"{ref}"{hint}')
                          ) from None
        if isinstance(period, bool) or not isinstance(period, int | float) \
                or not 0.01 <= period <= 86400:
            raise o.error(f"{key}.{ref}", "a period in seconds, 0.01..86400", period)
        periods[spec.pid] = int(period * NS)
    return periods


POLL_KEYS = {"pids", "sleep_after", "probe_interval_s", "max_backoff", "read_vin",
             "dtc_period_s", "response_timeout_ms", "slack_km", "profile", "profile_period_s",
             "sleep_hold_s", "wake_after"}


def poll_settings(o: Table) -> dict[str, object]:
    """The :class:`~firmware_adapters.obd.scheduler.Poller` keyword arguments from config."""
    dtc = o.float("dtc_period_s", 60.0, min=0.0, max=86400.0)
    return {
        "periods_ns": pid_periods(o),
        "sleep_after": o.int("sleep_after", 3, min=1, max=1000),
        "probe_interval_ns": int(o.float("probe_interval_s", 2.0, min=0.05, max=3600.0) * NS),
        "max_backoff": o.int("max_backoff", 16, min=1, max=1024),
        "read_vin": o.bool("read_vin", True),
        "dtc_period_ns": int(dtc * NS) if dtc else None,
        "profile": load_profile(o.nonempty_str("profile"), o.where, f"{o.prefix}.profile")
        if o.data.get("profile") is not None else None,
        "did_period_ns": int(o.float("profile_period_s", 0.0, min=0.0, max=86400.0) * NS)
        or None,
        "sleep_hold_ns": int(o.float("sleep_hold_s", 5.0, min=0.0, max=3600.0) * NS),
        "wake_after": o.int("wake_after", 2, min=1, max=100),
    }
