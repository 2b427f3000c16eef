"""Meter map files (TOML) -> :class:`registers.MeterMap`: the built-in maps, map files,
inline maps in config. Sans-I/O apart from reading the file.

A map file cites its register document and gives, besides the registers: the meter's
documented per-request limit (``max_read``), its function code(s), word order and scaling,
its "not available" sentinels (map-level per type, ``sentinels = { uint32 = [0xFFFFFFFF] }``,
or per register), its physical limits (``[limits]``) and its identity registers
(``[identity] serial = {...}``, ``model = {..., match = [...]}``: read once per connection;
``match`` makes ``map = "auto"`` recognise the model: text prefixes, or exact model codes).

Every problem is a ConfigError naming the file and the key (firmware_adapters may not
import agent.config, hence the small reader at the end).
"""

from __future__ import annotations

import builtins
import difflib
import tomllib
from collections.abc import Mapping
from fractions import Fraction
from importlib import resources
from pathlib import Path

from agent.errors import ConfigError, Prose
from agent.readings import METER_SIGNALS
from firmware_adapters.modbus.registers import (
    FUNCTION_HOLDING,
    FUNCTION_INPUT,
    MAX_REGISTERS_PER_READ,
    DataType,
    IdentityField,
    IdentityKind,
    Limits,
    MeterMap,
    Order,
    RegisterSpec,
)

PACKAGE = "firmware_adapters.modbus"


def map_from_table(data: Mapping[str, object], where: str) -> MeterMap:
    """Build a map from its TOML form (a map file, or an inline ``map`` table in config);
    every problem is a ConfigError naming ``where`` and the key."""
    reader = _Reader(data, where, "")
    default_function = reader.int("function", FUNCTION_INPUT)
    word_order = reader.choice("word_order", "big", ("big", "little"))
    byte_order = reader.choice("byte_order", "big", ("big", "little"))
    defaults = _type_sentinels(reader)
    specs = []
    rows = data.get("register", [])
    if not isinstance(rows, list) or not rows:
        raise ConfigError(file=where, key="register", expected="an array of tables",
                          found=rows)
    for index, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise ConfigError(file=where, key=f"register[{index}]", expected="a table",
                              found=row)
        item = _Reader(row, where, f"register[{index}]")
        dtype_name = item.choice("type", None, tuple(t.value for t in DataType))
        scale_from = item.int("scale_from", -1)
        try:
            specs.append(RegisterSpec(
                name=item.choice("name", None, tuple(METER_SIGNALS)),
                function=item.int("function", default_function),
                address=item.int("address", None),
                dtype=DataType(dtype_name),
                scale=item.fraction("scale", "1"),
                word_order=Order(item.choice("word_order", word_order, ("big", "little"))),
                byte_order=Order(item.choice("byte_order", byte_order, ("big", "little"))),
                scale_from=None if scale_from < 0 else scale_from,
                sentinels=frozenset(item.sentinels("sentinels", defaults.get(dtype_name, ()))),
            ))
        except ValueError as exc:
            raise ConfigError(file=where, key=f"register[{index}]",
                              expected="a valid register", found=str(exc)) from None
    try:
        return MeterMap(model=reader.str("model", None), document=reader.str("document", ""),
                        registers=tuple(specs),
                        rated_power_w=reader.int("rated_power_w", None),
                        max_read=reader.int("max_read", MAX_REGISTERS_PER_READ),
                        max_gap=reader.int("max_gap", 16),
                        serial=_identity(data, where, "serial"),
                        model_id=_identity(data, where, "model"),
                        limits=_limits(data, where),
                        extra_holding=_extra(data, where))
    except ValueError as exc:
        raise ConfigError(file=where, key="(map)", expected="a consistent register map",
                          found=str(exc)) from None


def _type_sentinels(reader: _Reader) -> dict[str, tuple[int, ...]]:
    table = reader.table("sentinels")
    sub = _Reader(table, reader.where, "sentinels")
    for key in table:
        if key not in {t.value for t in DataType}:
            raise sub._error(key, "a register type", key)
    return {key: tuple(sub.sentinels(key, ())) for key in table}


def _identity(data: Mapping[str, object], where: str, which: str) -> IdentityField | None:
    table = _Reader(data, where, "").table("identity")
    if which not in table:
        return None
    row = table[which]
    if not isinstance(row, Mapping):
        raise ConfigError(file=where, key=f"identity.{which}", expected="a table", found=row)
    item = _Reader(row, where, f"identity.{which}")
    kind = IdentityKind(item.choice("type", None, tuple(k.value for k in IdentityKind)))
    count = {IdentityKind.UINT16: 1, IdentityKind.UINT32: 2}.get(kind)
    match = item.raw("match", [])
    if not isinstance(match, list) or not all(isinstance(m, str) and m for m in match):
        raise item._error("match", "an array of non-empty strings", match)
    try:
        return IdentityField(item.int("function", FUNCTION_HOLDING), item.int("address", None),
                             kind, count or item.int("count", None), tuple(match))
    except ValueError as exc:
        raise ConfigError(file=where, key=f"identity.{which}", expected="a valid identity "
                          "register", found=str(exc)) from None


def _limits(data: Mapping[str, object], where: str) -> Limits:
    item = _Reader(_Reader(data, where, "").table("limits"), where, "limits")
    base = Limits()
    return Limits(max_voltage_mv=item.int("max_voltage_v", base.max_voltage_mv // 1000) * 1000,
                  max_current_ma=item.int("max_current_a", 0) * 1000,
                  max_energy_wh=item.int("max_energy_wh", base.max_energy_wh))


def _extra(data: Mapping[str, object], where: str) -> tuple[tuple[int, int], ...]:
    """Holding registers a meter serves besides its measurements (a signed meter's
    transaction interface), as [[address, count], ...]: the simulator serves them."""
    rows = data.get("extra_holding", [])
    if not isinstance(rows, list) or not all(
            isinstance(r, list) and len(r) == 2 and all(isinstance(v, int) and not
                                                         isinstance(v, bool) for v in r)
            for r in rows):
        raise ConfigError(file=where, key="extra_holding", expected="[[address, count], ...]",
                          found=rows)
    return tuple((a, c) for a, c in rows)


def builtin_maps() -> tuple[str, ...]:
    """Names of the maps shipped in ``firmware_adapters/modbus/maps`` (file stems)."""
    folder = resources.files(PACKAGE).joinpath("maps")
    return tuple(sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".toml")))


def load_map(name_or_path: str) -> MeterMap:
    """A built-in map by name (``"sdm630"``) or a map file by path."""
    if name_or_path in builtin_maps():
        resource = resources.files(PACKAGE).joinpath("maps", f"{name_or_path}.toml")
        text, where = resource.read_text(encoding="utf-8"), f"maps/{name_or_path}.toml"
    else:
        path = Path(name_or_path)
        if path.suffix != ".toml":
            near = difflib.get_close_matches(name_or_path, builtin_maps(), n=1)
            hint = f" (did you mean {near[0]}?)" if near else ""
            raise ConfigError(key="map", expected=f"one of {', '.join(builtin_maps())} "
                              "or a .toml file", found=Prose(f'"{name_or_path}"{hint}'))
        try:
            text, where = path.read_text(encoding="utf-8"), str(path)
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read map file ({exc.strerror})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: not valid TOML: {exc}") from None
    return map_from_table(data, where)


class _Reader:
    """Typed access to one TOML table (firmware_adapters may not import agent.config)."""

    def __init__(self, data: Mapping[builtins.str, object], where: builtins.str,
                 prefix: builtins.str) -> None:
        self.data, self.where, self.prefix = data, where, prefix

    def _get(self, key: builtins.str, default: object) -> object:
        if key in self.data:
            return self.data[key]
        if default is None:
            raise self._error(key, "a value (the key is required)", None)
        return default

    def _error(self, key: builtins.str, expected: builtins.str, found: object) -> ConfigError:
        full = f"{self.prefix}.{key}" if self.prefix else key
        return ConfigError(file=self.where, key=full, expected=expected, found=found)

    def int(self, key: builtins.str, default: builtins.int | None) -> builtins.int:
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, builtins.int):
            raise self._error(key, "an integer", value)
        return value

    def str(self, key: builtins.str, default: builtins.str | None) -> builtins.str:
        value = self._get(key, default)
        if not isinstance(value, builtins.str):
            raise self._error(key, "a string", value)
        return value

    def choice(self, key: builtins.str, default: builtins.str | None,
               choices: tuple[builtins.str, ...]) -> builtins.str:
        value = self._get(key, default)
        if value not in choices:
            shown = ", ".join(choices) if len(choices) <= 8 else "a METER_SIGNALS name"
            raise self._error(key, f"one of {shown}", value)
        return builtins.str(value)

    def raw(self, key: builtins.str, default: object) -> object:
        return self.data.get(key, default)

    def table(self, key: builtins.str) -> Mapping[builtins.str, object]:
        value = self.data.get(key, {})
        if not isinstance(value, Mapping):
            raise self._error(key, "a table", value)
        return value

    def sentinels(self, key: builtins.str, default: tuple[builtins.int, ...]) -> list[builtins.int]:
        """Integers or hex strings ("0xFFFFFFFFFFFFFFFF" does not fit a TOML integer)."""
        value = self.data.get(key, list(default))
        out = []
        for item in value if isinstance(value, list) else [value]:
            try:
                if isinstance(item, bool) or not isinstance(item, builtins.int | builtins.str):
                    raise ValueError
                out.append(item if isinstance(item, builtins.int) else int(item, 0))
            except ValueError:
                raise self._error(key, "an array of integers or hex strings", value) from None
        return out

    def fraction(self, key: builtins.str, default: builtins.str) -> Fraction:
        value = self._get(key, default)
        try:
            if isinstance(value, bool) or not isinstance(value, builtins.int | builtins.str):
                raise ValueError
            result = Fraction(value)
        except (ValueError, ZeroDivisionError):
            raise self._error(key, "a decimal string or integer > 0", value) from None
        if result <= 0:
            raise self._error(key, "a decimal string or integer > 0", value)
        return result
