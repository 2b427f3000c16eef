"""Source kinds named in config -> lazily imported classes, through entry points.

As python-can does for its interfaces, every kind is an entry point of the group
``edge_agent.sources`` (pyproject.toml): the product's drivers, the simulators ``hil/``
ships (``hil-ecu``, ``hil-meter``), and any third-party package that adds one. Nothing is
imported until a config names the kind, because importing a driver pulls in its hardware
stack (python-can, pymodbus ...).

A driver whose optional dependency is not installed raises AdapterUnavailable naming the
extra to install (``pip install 'ev-edge-agent[vehicle]'``). That translation happens only
when the missing module is a third-party one: a ModuleNotFoundError for one of our own
modules is a bug and propagates as it is.
"""

from __future__ import annotations

import functools
from importlib.metadata import EntryPoint, entry_points

from agent.errors import AdapterUnavailable, ConfigError
from firmware_adapters.base import Source

SOURCES_GROUP = "edge_agent.sources"
CHARGERS_GROUP = "edge_agent.chargers"
OWN_PACKAGES = frozenset({"agent", "firmware_adapters", "hil"})


@functools.cache
def _kinds(group: str) -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=group)}


def known_kinds(group: str = SOURCES_GROUP) -> tuple[str, ...]:
    return tuple(sorted(_kinds(group)))


def load_kind(group: str, kind: str, what: str) -> object:
    """The object registered as ``kind`` in ``group``; ConfigError for an unknown kind,
    AdapterUnavailable(missing-dependency) for an uninstalled optional dependency."""
    try:
        entry = _kinds(group)[kind]
    except KeyError:
        known = ", ".join(known_kinds(group)) or "none installed"
        raise ConfigError(key=f"{what}.kind", expected=f"one of: {known}", found=kind) from None
    try:
        return entry.load()
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").partition(".")[0]
        if not missing or missing in OWN_PACKAGES:
            raise  # our own module is missing or broken: a bug, not an install step
        extra = f"[{','.join(entry.extras)}]" if entry.extras else ""
        raise AdapterUnavailable(
            f"{what} kind {kind!r} needs the {exc.name!r} package: "
            f"pip install 'ev-edge-agent{extra}'", reason="missing-dependency") from exc


def source_class(kind: str) -> type[Source]:
    cls = load_kind(SOURCES_GROUP, kind, "sources")
    if not (isinstance(cls, type) and issubclass(cls, Source)):
        raise ConfigError(key="sources.kind", expected="a Source class registered for it",
                          found=f"{kind} -> {cls!r}")
    return cls


def charger_class(kind: str) -> type:
    """The charger adapter class of ``kind`` (entry point group ``edge_agent.chargers``:
    firmware_adapters/evse, and the simulated wallbox hil/ ships)."""
    cls = load_kind(CHARGERS_GROUP, kind, "chargers")
    if not (isinstance(cls, type) and callable(getattr(cls, "from_options", None))):
        raise ConfigError(key="chargers.kind", expected="a Charger class registered for it",
                          found=f"{kind} -> {cls!r}")
    return cls
