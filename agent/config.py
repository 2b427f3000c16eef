"""TOML config -> validated, frozen values.

Every error names the file, the dotted key, what was expected and what was found, in one
line (a ConfigError); the CLI prints it without a traceback.

Each part of the agent validates its own table with :class:`agent.options.Table` (sources in
their ``from_options``, the uplink its ``[mqtt]`` table, ...), so this module stays the one
place that knows the file's overall shape.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from agent.errors import ConfigError
from agent.options import Table


def load_toml(path: str | os.PathLike[str], what: str = "config file") -> Table:
    """Read a TOML file into a Table; a missing or malformed file is a ConfigError that
    says which kind of file (``what``) was expected."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such {what}") from None
    except PermissionError:
        raise ConfigError(f"{path}: not readable (permission denied)") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, expected a {what} (TOML)") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a {what} (TOML is UTF-8 text)") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return Table(data, str(path))


def default_state_dir() -> str:
    """``[device] state_dir`` when the file does not set it: ``$EDGE_AGENT_STATE_DIR`` (as
    for the CLI's ``--state-dir``), else the service's ``/var/lib/edge-agent``."""
    return os.environ.get("EDGE_AGENT_STATE_DIR") or "/var/lib/edge-agent"


@dataclass(frozen=True, slots=True)
class DeviceConfig:
    id: str | None
    role: str
    state_dir: Path
    registry: Path | None = None    # the fleet registry (fleet.toml) the station trusts

    @classmethod
    def from_table(cls, table: Table) -> DeviceConfig:
        registry = table.opt_str("registry")
        value = cls(id=table.opt_str("id"),
                    role=table.str("role", "vehicle", choices=("vehicle", "station")),
                    state_dir=table.path("state_dir", default_state_dir()),
                    registry=Path(registry) if registry else None)
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
class ChargerConfig:
    """One ``[[chargers]]`` entry (a wallbox controller). ``options`` (``connectors`` and
    the kind's own keys) are validated by the charger class itself."""

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
    chargers: tuple[ChargerConfig, ...] = ()

    def section(self, name: str) -> Table:
        return self.sections.get(name) or Table({}, self.path, name)


OTHER_SECTIONS = ("mqtt", "spool", "channel", "settlement", "status", "metrics", "hil")


def parse_config(top: Table) -> Config:
    sources = []
    seen: set[str] = set()
    for table in top.tables("sources"):
        source_id = table.nonempty_str("id")
        if source_id in seen:
            raise table.error("id", "a unique source id", source_id)
        seen.add(source_id)
        kind = table.str("kind")
        sources.append(SourceConfig(source_id, kind, table.rest(), table.where))
    chargers: list[ChargerConfig] = []
    for table in top.tables("chargers"):
        charger_id = table.nonempty_str("id")
        if charger_id in {c.id for c in chargers}:
            raise table.error("id", "a unique charger id", charger_id)
        chargers.append(ChargerConfig(charger_id, table.str("kind"), table.rest(), table.where))
    config = Config(
        path=top.where,
        device=DeviceConfig.from_table(top.table("device")),
        batch=BatchConfig.from_table(top.table("batch")),
        sources=tuple(sources),
        sections={name: top.table(name) for name in OTHER_SECTIONS},
        chargers=tuple(chargers),
    )
    top.reject_unknown()
    return config


def load_config(path: str | os.PathLike[str]) -> Config:
    return parse_config(load_toml(path))
