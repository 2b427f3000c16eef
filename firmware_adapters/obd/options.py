"""Config checking for the vehicle sources, by hand (firmware_adapters may not import
agent.config): each getter returns a typed value or raises ConfigError naming the file, the
key, what was expected and what was found."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from agent.errors import ConfigError, LocalProtocolError
from firmware_adapters.obd.pids import pid_spec

NS = 1_000_000_000

# PID key -> period in seconds when a config names none: what a fleet dashboard shows.
DEFAULT_PIDS: dict[str, float] = {
    "SPEED": 1.0, "RPM": 1.0, "HYBRID_BATTERY_REMAINING": 5.0, "ODOMETER": 5.0,
    "COOLANT_TEMP": 10.0, "CONTROL_MODULE_VOLTAGE": 10.0,
}


@dataclass(frozen=True, slots=True)
class Options:
    table: Mapping[str, object]
    where: str
    prefix: str

    def _err(self, key: str, expected: str, found: object) -> ConfigError:
        return ConfigError(file=self.where, key=f"{self.prefix}.{key}", expected=expected,
                           found=found)

    def check_keys(self, allowed: set[str]) -> None:
        extra = sorted(set(self.table) - allowed - {"kind", "id"})
        if extra:
            raise self._err(extra[0], "one of " + ", ".join(sorted(allowed)), extra[0])

    def str(self, key: str, default: str | None = None) -> str:
        value = self.table.get(key, default)
        if not isinstance(value, str) or not value:
            raise self._err(key, "a non-empty string", value)
        return value

    def int(self, key: str, default: int, lo: int, hi: int) -> int:
        value = self.table.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise self._err(key, f"an integer in {lo}..{hi}", value)
        return value

    def opt_int(self, key: str, lo: int, hi: int) -> int | None:
        return None if key not in self.table else self.int(key, 0, lo, hi)

    def float(self, key: str, default: float, lo: float, hi: float) -> float:
        value = self.table.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
            raise self._err(key, f"a number in {lo}..{hi}", value)
        return float(value)

    def bool(self, key: str, default: bool) -> bool:
        value = self.table.get(key, default)
        if not isinstance(value, bool):
            raise self._err(key, "true or false", value)
        return value

    def choice(self, key: str, default: object, choices: tuple[object, ...]) -> object:
        value = self.table.get(key, default)
        if value not in choices:
            raise self._err(key, "one of " + ", ".join(map(repr, choices)), value)
        return value

    def mapping(self, key: str, default: Mapping[str, object]) -> Mapping[str, object]:
        value = self.table.get(key, default)
        if not isinstance(value, Mapping) or not value:
            raise self._err(key, "a non-empty table", value)
        return value

    def pid_periods(self, key: str = "pids") -> dict[int, int]:
        """``pids = { SPEED = 1.0, "0C" = 0.5 }``: PID key or hex -> period in seconds."""
        periods = {}
        for ref, period in self.mapping(key, DEFAULT_PIDS).items():
            try:
                spec = pid_spec(ref)
            except LocalProtocolError:
                raise self._err(f"{key}.{ref}", "a PID key (SPEED) or hex (0D) from the "
                                "table in firmware_adapters/obd/pids.py", ref) from None
            if isinstance(period, bool) or not isinstance(period, int | float) \
                    or not 0.01 <= period <= 86400:
                raise self._err(f"{key}.{ref}", "a period in seconds, 0.01..86400", period)
            periods[spec.pid] = int(period * NS)
        return periods


POLL_KEYS = {"pids", "sleep_after", "probe_interval_s", "max_backoff", "read_vin",
             "dtc_period_s", "response_timeout_ms", "slack_km"}


def poll_settings(o: Options) -> dict[str, object]:
    """The :class:`~firmware_adapters.obd.scheduler.Poller` keyword arguments from config."""
    dtc = o.float("dtc_period_s", 60.0, 0.0, 86400.0)
    return {
        "periods_ns": o.pid_periods(),
        "sleep_after": o.int("sleep_after", 3, 1, 1000),
        "probe_interval_ns": int(o.float("probe_interval_s", 2.0, 0.05, 3600.0) * NS),
        "max_backoff": o.int("max_backoff", 16, 1, 1024),
        "read_vin": o.bool("read_vin", True),
        "dtc_period_ns": int(dtc * NS) if dtc else None,
    }
