"""A JSON codec for our frozen dataclasses, driven by their annotations.

Scope: :func:`to_json_value` turns a dataclass (nested dataclasses, tuples, ``dict[str, V]``,
bytes as hex, ``X | None``) into JSON-ready values; :func:`from_json_value` is its strict
inverse for a given annotation, so a file edited by hand or cut short gives a
:class:`DecodeError` that names the field (``sources[0].rate_hz: expected a number``), never
a traceback from deep inside ``json``. Used by the status snapshot (agent/status.py) and the
session record (hil/report.py).

Hand-written rather than a library (dacite, pydantic): the shapes are few, and the reader
must treat the file as hostile input with our own error type and nothing else.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from agent.errors import DecodeError

T = TypeVar("T")
MAX_JSON_BYTES = 1 << 20


_PLAIN = frozenset({str, int, float, bool, type(None)})


def to_json_value(value: object) -> object:
    """Dataclasses -> dicts, tuples -> lists, bytes -> hex; everything else as it is.

    (Plain values first and the field names cached per class: the runtime encodes its
    status snapshot every 2 s, and dataclasses.fields() per value was most of that.)"""
    kind = type(value)
    if kind in _PLAIN:
        return value
    names = _field_names(kind)
    if names is not None:
        return {name: to_json_value(getattr(value, name)) for name in names}
    if isinstance(value, tuple | list):
        return [to_json_value(item) for item in value]
    if isinstance(value, Mapping):
        return {str(k): to_json_value(v) for k, v in value.items()}
    if isinstance(value, bytes):
        return value.hex()
    return value


_FIELDS: dict[type, tuple[str, ...] | None] = {}


def _field_names(kind: type) -> tuple[str, ...] | None:
    """The fields of a dataclass, None for any other class (a dataclass class itself is
    a value of class ``type``: not encoded as its fields). Cached per class."""
    try:
        return _FIELDS[kind]
    except KeyError:
        names = tuple(f.name for f in dataclasses.fields(kind)) \
            if dataclasses.is_dataclass(kind) else None
        _FIELDS[kind] = names
        return names


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_json_value(kind: Any, data: object, where: str = "") -> Any:
    """Inverse of :func:`to_json_value` for annotation ``kind``; DecodeError names ``where``.

    (``Any`` here because an annotation is not a type mypy can follow; :func:`decode_json`
    is the typed entry point.)"""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(kind)
        if data is None and type(None) in options:
            return None
        (inner,) = [option for option in options if option is not type(None)]
        return from_json_value(inner, data, where)
    if isinstance(kind, type) and dataclasses.is_dataclass(kind):
        return _dataclass_from_json(kind, data, where)
    if origin is tuple:
        inner = typing.get_args(kind)[0]
        _expect(isinstance(data, list), where, "an array", data)
        assert isinstance(data, list)
        return tuple(from_json_value(inner, item, f"{where}[{i}]") for i, item in enumerate(data))
    if origin is dict:
        _key_kind, value_kind = typing.get_args(kind)
        _expect(isinstance(data, dict), where, "an object", data)
        assert isinstance(data, dict)
        return {key: from_json_value(value_kind, item, f"{where}.{key}")
                for key, item in data.items()}
    if kind is bytes:
        _expect(isinstance(data, str), where, "a hex string", data)
        assert isinstance(data, str)
        try:
            return bytes.fromhex(data)
        except ValueError:
            raise DecodeError(f"{where}: expected a hex string", reason="bad-json-value") from None
    if kind is float:
        _expect(isinstance(data, int | float) and not isinstance(data, bool), where, "a number",
                data)
        assert isinstance(data, int | float)
        return float(data)
    if kind in (int, str, bool):
        _expect(isinstance(data, kind) and (kind is bool or not isinstance(data, bool)), where,
                {int: "an integer", str: "a string", bool: "true or false"}[kind], data)
        return data
    if kind is object:
        return data
    raise TypeError(f"{where}: no JSON decoding for {kind!r}")   # a bug in our annotations


def _dataclass_from_json(cls: type[T], data: object, where: str) -> T:
    _expect(isinstance(data, dict), where or cls.__name__, "an object", data)
    assert isinstance(data, dict) and dataclasses.is_dataclass(cls)
    hints = _hints(typing.cast(type, cls))
    values = {}
    for f in dataclasses.fields(cls):
        path = f"{where}.{f.name}" if where else f.name
        if f.name in data:
            values[f.name] = from_json_value(hints[f.name], data[f.name], path)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise DecodeError(f"{path}: missing", reason="bad-json-value")
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise DecodeError(f"{where or cls.__name__}: {exc}", reason="bad-json-value") from None


def _expect(ok: bool, where: str, expected: str, found: object) -> None:
    if not ok:
        shown = json.dumps(found)[:40] if isinstance(found, int | float | str) else \
            {dict: "an object", list: "an array", type(None): "null"}.get(type(found), "a value")
        raise DecodeError(f"{where}: expected {expected}, found {shown}",
                          reason="bad-json-value")


def decode_json(cls: type[T], data: bytes, max_bytes: int = MAX_JSON_BYTES) -> T:
    """Parse ``data`` as JSON and decode it as ``cls``; DecodeError for anything else."""
    if len(data) > max_bytes:
        raise DecodeError(f"{cls.__name__}: larger than {max_bytes} bytes", reason="oversize")
    try:
        parsed = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise DecodeError(f"{cls.__name__}: not JSON: {exc}", reason="bad-json") from None
    result: T = from_json_value(cls, parsed)
    return result
