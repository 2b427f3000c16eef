"""Typed, validated access to one table of config: the one options validator of the agent.

Every part validates its own table with :class:`Table`: the config sections (``[mqtt]``,
``[spool]``, ...), and the adapters' ``[[sources]]`` options (firmware_adapters may import
this module, DESIGN s2). Every error is a ConfigError that names the file, the dotted key,
what was expected and what was found, in one line; an unknown key is an error, not a silent
default, and names the nearest known key when it looks like a typo.
"""

from __future__ import annotations

import builtins
import difflib
import math
from collections.abc import Iterator, Mapping, Set
from pathlib import Path
from typing import TypeVar
from urllib.parse import SplitResult, urlsplit

from agent.errors import ConfigError, Prose, show_value

T = TypeVar("T")
_MISSING = object()


class Table:
    """Typed access to one TOML table, with errors that say where. (Its getters are named
    after the types they return, so annotations inside the class spell ``builtins.str``.)

    ``where`` is ``"<file>"`` and ``prefix`` the dotted path of this table
    (``"sources[0]"``), so a bad value reads ``vehicle.toml: sources[0].rate_hz: expected
    a number > 0, found -1``.
    """

    def __init__(self, data: object, where: builtins.str, prefix: builtins.str = "",
                 ignore: tuple[builtins.str, ...] = ()) -> None:
        if not isinstance(data, Mapping):
            raise ConfigError(file=where, key=prefix or "(top)", expected="a table",
                              found=type(data).__name__)
        self.data: Mapping[str, object] = data
        self.where, self.prefix = where, prefix
        self._used: set[builtins.str] = set(ignore)
        self._ignored = frozenset(ignore)  # valid here, read by another part (id, kind)

    @classmethod
    def source(cls, options: Mapping[builtins.str, object], where: builtins.str,
               source_id: builtins.str) -> Table:
        """A ``[[sources]]`` entry's options, keys named ``sources.<id>.<key>`` (``id`` and
        ``kind`` were read by agent.config)."""
        return cls(options, where, f"sources.{source_id}", ignore=("id", "kind"))

    @property
    def used(self) -> frozenset[builtins.str]:
        """The keys read so far (and those named as known)."""
        return frozenset(self._used)

    def key(self, name: builtins.str) -> builtins.str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def error(self, name: builtins.str, expected: builtins.str, found: object) -> ConfigError:
        return ConfigError(file=self.where, key=self.key(name), expected=expected, found=found)

    def _get(self, name: builtins.str, default: object) -> object:
        self._used.add(name)
        if name in self.data:
            return self.data[name]
        if default is _MISSING:
            # A typo of this very key (``urll``) is why it is missing: say so here, the
            # unknown-key check would only come after this error.
            # (cutoff 0.75: "urll" for "url" is 0.86, but "kind", a key read later, for
            # "id" is 0.67)
            typo = difflib.get_close_matches(name, [k for k in self.data if k not in self._used
                                                    and isinstance(k, builtins.str)], n=1,
                                             cutoff=0.75)
            hint = f"; is {typo[0]} a typo of {name}?" if typo else ""
            raise ConfigError(file=self.where, key=self.key(name), expected="a value",
                              found=Prose(f"nothing (the key is required{hint})"))
        return default

    def raw(self, name: builtins.str, default: object = _MISSING) -> object:
        """The value as the file has it (the caller checks its shape)."""
        return self._get(name, default)

    def str(self, name: builtins.str, default: object = _MISSING, *,
            choices: tuple[builtins.str, ...] = ()) -> builtins.str:
        value = self._get(name, default)
        if not isinstance(value, str) or (choices and value not in choices):
            expected = "one of " + ", ".join(choices) if choices else "a string"
            raise self.error(name, expected, value)
        return value

    def opt_str(self, name: builtins.str) -> builtins.str | None:
        value = self._get(name, None)
        if value is None:
            return None
        if not isinstance(value, str):
            raise self.error(name, "a string", value)
        return value

    def nonempty_str(self, name: builtins.str, default: object = _MISSING) -> builtins.str:
        value = self._get(name, default)
        if not isinstance(value, str) or not value:
            raise self.error(name, "a non-empty string", value)
        return value

    def choice(self, name: builtins.str, default: object, choices: tuple[T, ...]) -> T:
        """One of ``choices`` (any type: ``addressing = 11 | 29``)."""
        value = self._get(name, default)
        for choice in choices:
            if value == choice and type(value) is type(choice):
                return choice
        raise self.error(name, "one of " + ", ".join(map(_show, choices)), value)

    def int(self, name: builtins.str, default: object = _MISSING, *,
            min: builtins.int | None = None,
            max: builtins.int | None = None) -> builtins.int:
        value = self._get(name, default)
        if isinstance(value, bool) or not isinstance(value, int) or \
                (min is not None and value < min) or (max is not None and value > max):
            raise self.error(name, _range("an integer", min, max), value)
        return value

    def float(self, name: builtins.str, default: object = _MISSING, *,
              min: builtins.float | None = None,
              max: builtins.float | None = None) -> builtins.float:
        value = self._get(name, default)
        # nan and inf pass every comparison with a bound the wrong way (nan < min is False)
        if isinstance(value, bool) or not isinstance(value, int | float) or \
                not math.isfinite(value) or \
                (min is not None and value < min) or (max is not None and value > max):
            raise self.error(name, _range("a number", min, max), value)
        return float(value)

    def opt_int(self, name: builtins.str, *, min: builtins.int | None = None,
                max: builtins.int | None = None) -> builtins.int | None:
        if name not in self.data:
            self._used.add(name)
            return None
        return self.int(name, min=min, max=max)

    def bool(self, name: builtins.str, default: object = _MISSING) -> builtins.bool:
        value = self._get(name, default)
        if not isinstance(value, bool):
            raise self.error(name, "true or false", value)
        return value

    def list(self, name: builtins.str, default: object = _MISSING) -> builtins.list[object]:
        value = self._get(name, default)
        if not isinstance(value, list):
            raise self.error(name, "an array", value)
        return value

    def mapping(self, name: builtins.str, default: object = _MISSING
                ) -> Mapping[builtins.str, object]:
        """A non-empty table taken as plain data (``pids = { SPEED = 1.0 }``)."""
        value = self._get(name, default)
        if not isinstance(value, Mapping) or not value:
            raise self.error(name, "a non-empty table", value)
        return value

    def table(self, name: builtins.str, required: builtins.bool = False) -> Table:
        value = self._get(name, _MISSING if required else {})
        if not isinstance(value, Mapping):
            raise self.error(name, "a table", value)
        return Table(value, self.where, self.key(name))

    def tables(self, name: builtins.str) -> Iterator[Table]:
        """An array of tables (``[[sources]]``), each with its index in the prefix."""
        for index, item in enumerate(self.list(name, [])):
            yield Table(item, self.where, f"{self.key(name)}[{index}]")

    def path(self, name: builtins.str, default: object = _MISSING) -> Path:
        return Path(self.str(name, default))

    def rest(self) -> dict[builtins.str, object]:
        """Keys not read so far (for adapter options passed on as they are)."""
        return {k: v for k, v in self.data.items() if k not in self._used}

    def reject_unknown(self, known: Set[builtins.str] | None = None) -> None:
        """Call after reading every key (or up front, naming the ``known`` keys): a typo is
        an error, not a silent default."""
        allowed = self._used if known is None else self._used | set(known)
        unknown = sorted(set(self.data) - allowed)
        if unknown:
            known_keys = sorted(allowed - set(self._ignored))
            expected = "one of " + ", ".join(known_keys) if known_keys else "no keys here"
            error = self.error(unknown[0], expected, Prose(f'unknown key "{unknown[0]}"'))
            near = difflib.get_close_matches(unknown[0], sorted(allowed), n=1)
            if near:  # a typo: say which key was meant
                error = ConfigError(f'{error}; did you mean "{near[0]}"?', file=error.file,
                                    key=error.key, expected=error.expected, found=error.found)
            raise error

    def mark_used(self, *names: builtins.str) -> None:
        """Keys another part validates (so reject_unknown does not name them)."""
        self._used.update(names)


def _range(kind: str, low: float | None, high: float | None) -> str:
    if low is not None and high is not None:
        return f"{kind} in [{low}, {high}]"
    if low is not None:
        return f"{kind} >= {low}"
    if high is not None:
        return f"{kind} <= {high}"
    return kind


def _show(value: object) -> str:
    return show_value(value)


def split_url(url: str, key: str, expected: str) -> SplitResult:
    """``urlsplit``, with what urllib raises ValueError for as a ConfigError naming the key:
    a URL it cannot split (an unclosed "[": ``expected`` says what was), or a port out of
    0..65535 or not a number (found only when ``.port`` is read)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        raise ConfigError(key=key, expected=f"{expected} (an IPv6 address in [ ])",
                          found=url) from None
    try:
        parts.port  # noqa: B018 - reading it is the check
    except ValueError:
        raise ConfigError(key=key, expected="a port from 1 to 65535 after the host",
                          found=url) from None
    return parts
