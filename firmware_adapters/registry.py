"""Source and charger kinds named in config -> lazily imported classes, through entry points.

As python-can does for its interfaces, every kind is an entry point of the group
``edge_agent.sources`` (pyproject.toml): the product's drivers, the simulators ``hil/``
ships (``hil-ecu``, ``hil-meter``), and any third-party package that adds one. Charger
kinds (``[[chargers]]``: ``modbus-evse``, ``hil-evse``) are the group ``edge_agent.chargers``. Nothing is
imported until a config names the kind, because importing a driver pulls in its hardware
stack (python-can, pymodbus ...).

A driver whose optional dependency is not installed raises AdapterUnavailable naming the
extra to install (``pip install 'ev-edge-agent[vehicle]'``). That translation happens only
when the missing module is a third-party one: a ModuleNotFoundError for one of our own
modules is a bug and propagates as it is.
"""

from __future__ import annotations

import difflib
import functools
from importlib.metadata import EntryPoint, entry_points

from agent.errors import AdapterUnavailable, ConfigError, Prose
from firmware_adapters.base import Source
from firmware_adapters.evse.base import Charger

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
        near = difflib.get_close_matches(kind, known_kinds(group), n=1)
        hint = f" (did you mean {near[0]}?)" if near else ""
        raise ConfigError(key=f"{what}.kind", expected=f"one of: {known}",
                          found=Prose(f'"{kind}"{hint}')) from None
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


ROLES = ("vehicle", "station")


def kind_roles(kind: str, group: str = SOURCES_GROUP) -> frozenset[str]:
    """The device roles a kind is for, from its entry point's extras (``[vehicle]``,
    ``[station]``: the extra that installs a role's drivers names the role); empty when the
    kind is unknown or says nothing (any role)."""
    entry = _kinds(group).get(kind)
    return frozenset(entry.extras) & frozenset(ROLES) if entry is not None else frozenset()


def kinds_for_role(role: str, group: str = SOURCES_GROUP) -> tuple[str, ...]:
    return tuple(k for k in known_kinds(group) if not kind_roles(k, group) or
                 role in kind_roles(k, group))


def source_class(kind: str) -> type[Source]:
    cls = load_kind(SOURCES_GROUP, kind, "sources")
    if not (isinstance(cls, type) and issubclass(cls, Source)):
        raise ConfigError(key="sources.kind", expected="a Source class registered for it",
                          found=f"{kind} -> {cls!r}")
    return cls


def charger_class(kind: str) -> type[Charger]:
    """The Charger class registered as ``kind`` in ``edge_agent.chargers`` (``[[chargers]]``
    tables name it; the service calls ``charger_class(kind).from_options(...)``)."""
    cls = load_kind(CHARGERS_GROUP, kind, "chargers")
    if not (isinstance(cls, type) and issubclass(cls, Charger)):
        raise ConfigError(key="chargers.kind", expected="a Charger class registered for it",
                          found=f"{kind} -> {cls!r}")
    return cls
