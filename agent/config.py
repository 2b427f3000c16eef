"""TOML config -> validated, frozen values.

Every error names the file, the dotted key, what was expected and what was found, in one
line (a ConfigError); the CLI prints it without a traceback.

Each part of the agent validates its own table with :class:`Table` (sources in their
``from_options``, the uplink its ``[mqtt]`` table, ...), so this module stays the one place
that knows the file's overall shape and the helpers every part shares.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from agent.errors import ConfigError

T = TypeVar("T")
_MISSING = object()


class Table:
    """Typed access to one TOML table, with errors that say where.

    ``where`` is ``"<file>"`` and ``prefix`` the dotted path of this table
    (``"sources[0]"``), so a bad value reads ``vehicle.toml: sources[0].rate_hz: expected
    a number > 0, found -1``.
    """

    def __init__(self, data: Mapping[str, object], where: str, prefix: str = "") -> None:
        if not isinstance(data, Mapping):
            raise ConfigError(file=where, key=prefix or "(top)", expected="a table",
                              found=type(data).__name__)
        self.data, self.where, self.prefix = data, where, prefix
        self._used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def error(self, name: str, expected: str, found: object) -> ConfigError:
        return ConfigError(file=self.where, key=self.key(name), expected=expected, found=found)

    def _get(self, name: str, default: object) -> object:
        self._used.add(name)
        if name in self.data:
            return self.data[name]
        if default is _MISSING:
            raise ConfigError(file=self.where, key=self.key(name), expected="a value",
                              found="nothing (the key is required)")
        return default

    def str(self, name: str, default: object = _MISSING, *, choices: tuple[str, ...] = ()) -> str:
        value = self._get(name, default)
        if not isinstance(value, str) or (choices and value not in choices):
            expected = "one of " + ", ".join(choices) if choices else "a string"
            raise self.error(name, expected, value)
        return value

    def opt_str(self, name: str) -> str | None:
        value = self._get(name, None)
        if value is None:
            return None
        if not isinstance(value, str):
            raise self.error(name, "a string", value)
        return value

    def int(self, name: str, default: object = _MISSING, *, min: int | None = None,
            max: int | None = None) -> int:
        value = self._get(name, default)
        if isinstance(value, bool) or not isinstance(value, int) or \
                (min is not None and value < min) or (max is not None and value > max):
            raise self.error(name, _range("an integer", min, max), value)
        return value

    def float(self, name: str, default: object = _MISSING, *, min: float | None = None,
              max: float | None = None) -> float:
        value = self._get(name, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or \
                (min is not None and value < min) or (max is not None and value > max):
            raise self.error(name, _range("a number", min, max), value)
        return float(value)

    def bool(self, name: str, default: object = _MISSING) -> bool:
        value = self._get(name, default)
        if not isinstance(value, bool):
            raise self.error(name, "true or false", value)
        return value

    def list(self, name: str, default: object = _MISSING) -> list[object]:
        value = self._get(name, default)
        if not isinstance(value, list):
            raise self.error(name, "an array", value)
        return value

    def table(self, name: str, required: bool = False) -> Table:
        value = self._get(name, _MISSING if required else {})
        if not isinstance(value, Mapping):
            raise self.error(name, "a table", value)
        return Table(value, self.where, self.key(name))

    def tables(self, name: str) -> Iterator[Table]:
        """An array of tables (``[[sources]]``), each with its index in the prefix."""
        for index, item in enumerate(self.list(name, [])):
            yield Table(item, self.where, f"{self.key(name)}[{index}]")  # type: ignore[arg-type]

    def path(self, name: str, default: object = _MISSING) -> Path:
        return Path(self.str(name, default))

    def rest(self) -> dict[str, object]:
        """Keys not read so far (for adapter options passed on as they are)."""
        return {k: v for k, v in self.data.items() if k not in self._used}

    def reject_unknown(self) -> None:
        """Call after reading every key: a typo is an error, not a silent default."""
        unknown = sorted(set(self.data) - self._used)
        if unknown:
            raise self.error(unknown[0], "a known key", f"unknown key {unknown[0]!r}")


def _range(kind: str, low: float | None, high: float | None) -> str:
    if low is not None and high is not None:
        return f"{kind} in [{low}, {high}]"
    if low is not None:
        return f"{kind} >= {low}"
    if high is not None:
        return f"{kind} <= {high}"
    return kind


def load_toml(path: str | os.PathLike[str]) -> Table:
    """Read a TOML file into a Table; a missing or malformed file is a ConfigError."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except PermissionError:
        raise ConfigError(f"{path}: not readable (permission denied)") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return Table(data, str(path))


@dataclass(frozen=True, slots=True)
class DeviceConfig:
    id: str | None
    role: str
    state_dir: Path

    @classmethod
    def from_table(cls, table: Table) -> DeviceConfig:
        value = cls(id=table.opt_str("id"),
                    role=table.str("role", "vehicle", choices=("vehicle", "station")),
                    state_dir=table.path("state_dir", "/var/lib/edge-agent"))
        table.reject_unknown()
        return value


@dataclass(frozen=True, slots=True)
class BatchConfig:
    max_readings: int = 50
    max_age_ms: int = 1000

    @classmethod
    def from_table(cls, table: Table) -> BatchConfig:
        value = cls(max_readings=table.int("max_readings", 50, min=1, max=10_000),
                    max_age_ms=table.int("max_age_ms", 1000, min=0, max=3_600_000))
        table.reject_unknown()
        return value


@dataclass(frozen=True, slots=True)
class SourceConfig:
    """One ``[[sources]]`` entry. ``options`` is validated by the source class itself."""

    id: str
    kind: str
    options: Mapping[str, object]
    where: str


@dataclass(frozen=True, slots=True)
class Config:
    """The whole file. Sections other parts own (``mqtt``, ``spool``, ``channel``,
    ``settlement``) are kept as Tables and validated by those parts at start-up."""

    path: str
    device: DeviceConfig
    batch: BatchConfig
    sources: tuple[SourceConfig, ...]
    sections: Mapping[str, Table] = field(default_factory=dict)

    def section(self, name: str) -> Table:
        return self.sections.get(name) or Table({}, self.path, name)


OTHER_SECTIONS = ("mqtt", "spool", "channel", "settlement", "status", "metrics", "hil")


def parse_config(top: Table) -> Config:
    sources = []
    seen: set[str] = set()
    for table in top.tables("sources"):
        source_id = table.str("id")
        if source_id in seen:
            raise table.error("id", "a unique source id", source_id)
        seen.add(source_id)
        kind = table.str("kind")
        sources.append(SourceConfig(source_id, kind, table.rest(), table.where))
    config = Config(
        path=top.where,
        device=DeviceConfig.from_table(top.table("device")),
        batch=BatchConfig.from_table(top.table("batch")),
        sources=tuple(sources),
        sections={name: top.table(name) for name in OTHER_SECTIONS},
    )
    top.reject_unknown()
    return config


def load_config(path: str | os.PathLike[str]) -> Config:
    return parse_config(load_toml(path))
