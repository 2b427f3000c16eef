"""Manufacturer data of EVs as data: UDS ReadDataByIdentifier profiles (sans-I/O).

Scope: a profile (``profiles/<name>.toml``, one per vehicle family) names the ECUs of a
family (request id, response id), the data identifiers (DIDs) to read from each with
ISO 14229-1 service 0x22, how often, and where each value sits in the answer: byte offset,
length, sign, an optional bit mask and shift, a linear scale ``raw * mul / div + add`` or a
table of states, the VSS name and so the unit. The profiles come from public community
documentation (OVMS vehicle modules, open PID collections); each cites its source.

Rules (ISO 14229-1 s10.2, ReadDataByIdentifier):

* Request ``22 <DID hi> <DID lo>``, positive answer ``62 <DID hi> <DID lo> <data>``,
  negative ``7F 22 <NRC>`` (0x31 requestOutOfRange: the ECU has no such DID; 0x78 is
  handled by the requester, it is not an answer).
* Offsets count from the first data byte after the DID echo; an answer shorter than the
  DID's ``min_length`` is a :class:`DecodeError` (``wrong-length``), never a guess.
* Values are big-endian (every profile shipped here is). A value named in Wh (an energy
  counter) is an integer; everything else is int when ``div == 1``, else a float rounded
  to 6 places. A state table maps raw codes to values; a code outside it with no
  ``default`` gives no reading (an unknown state is not a value).
* Every name must be in ``agent.readings.VEHICLE_SIGNALS``: its unit comes from there, so a
  profile cannot emit a signal in a unit the table does not know.

Errors: a malformed profile raises ConfigError naming the file and key; a malformed answer
raises DecodeError with a kebab-case reason.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from agent.errors import ConfigError, DecodeError
from agent.readings import VEHICLE_SIGNALS
from firmware_adapters.obd.pids import NEGATIVE_RESPONSE, NegativeResponse, Signal
from firmware_adapters.obd.requester import Route

SERVICE_READ_DID = 0x22
POSITIVE_READ_DID = 0x62
NS = 1_000_000_000
INTEGER_UNITS = frozenset({"Wh"})  # energy is an integer (house rule)


@dataclass(frozen=True, slots=True)
class Field:
    """One value inside a DID's data."""

    name: str
    unit: str
    offset: int
    length: int
    mul: int = 1
    div: int = 1
    add: int = 0
    signed: bool = False
    mask: int | None = None
    shift: int = 0
    states: tuple[tuple[int, int], ...] = ()
    default: int | None = None

    def raw(self, data: bytes) -> int:
        chunk = data[self.offset:self.offset + self.length]
        if len(chunk) != self.length:
            raise DecodeError(f"{self.name}: bytes {self.offset}..{self.offset + self.length - 1}"
                              f" beyond a {len(data)}-byte answer", reason="wrong-length")
        if self.mask is not None:
            return (int.from_bytes(chunk, "big") & self.mask) >> self.shift
        return int.from_bytes(chunk, "big", signed=self.signed)

    def decode(self, data: bytes) -> int | float | None:
        raw = self.raw(data)
        if self.states:
            return dict(self.states).get(raw, self.default)
        if self.unit in INTEGER_UNITS:  # exact integer arithmetic, rounded half up
            q, r = divmod(raw * self.mul + self.add * self.div, self.div)
            return q + (2 * r >= self.div)
        if self.div == 1:
            return raw * self.mul + self.add
        return round(raw * self.mul / self.div + self.add, 6)


@dataclass(frozen=True, slots=True)
class Did:
    ecu: str
    route: Route
    did: int
    period_ns: int
    min_length: int
    fields: tuple[Field, ...]

    @property
    def request(self) -> bytes:
        return bytes((SERVICE_READ_DID,)) + self.did.to_bytes(2, "big")

    def decode(self, payload: bytes) -> tuple[Signal, ...] | NegativeResponse:
        """One ECU's complete answer to :attr:`request`."""
        if not payload:
            raise DecodeError("empty answer", reason="empty")
        if payload[0] == NEGATIVE_RESPONSE:
            if len(payload) != 3 or payload[1] != SERVICE_READ_DID:
                raise DecodeError("malformed negative response", reason="wrong-length")
            return NegativeResponse(payload[1], payload[2])
        if payload[0] != POSITIVE_READ_DID:
            raise DecodeError(f"unexpected service byte {payload[0]:#04x}",
                              reason="unexpected-service")
        if payload[1:3] != self.did.to_bytes(2, "big"):
            raise DecodeError(f"answer names DID {payload[1:3].hex()}, asked {self.did:04X}",
                              reason="unexpected-did")
        data = payload[3:]
        if len(data) < self.min_length:
            raise DecodeError(f"DID {self.did:04X}: {len(data)} data bytes, expected at least "
                              f"{self.min_length}", reason="wrong-length")
        out: list[Signal] = []
        for f in self.fields:
            value = f.decode(data)
            if value is not None:
                out.append((f.name, f.unit, value))
        return tuple(out)


@dataclass(frozen=True, slots=True)
class Profile:
    name: str
    title: str
    source: str
    ecus: tuple[tuple[str, Route], ...]
    dids: tuple[Did, ...]

    @property
    def signals(self) -> frozenset[str]:
        return frozenset(f.name for d in self.dids for f in d.fields)


# ----------------------------------------------------------------------------- loading
FIELD_KEYS = {"name", "offset", "length", "mul", "div", "add", "signed", "mask", "shift",
              "states", "default"}
DID_KEYS = {"ecu", "did", "period_s", "min_length", "fields"}
PROFILE_KEYS = {"name", "title", "source", "ecus", "dids"}


def builtin_profiles() -> tuple[str, ...]:
    """Names of the profiles shipped in ``firmware_adapters/obd/profiles`` (file stems)."""
    folder = resources.files(__package__).joinpath("profiles")
    return tuple(sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".toml")))


def load_profile(ref: str, where: str = "", key: str = "profile") -> Profile:
    """A shipped profile by name (``hyundai-egmp``) or a TOML file by path."""
    if ref.endswith(".toml"):
        path, label = Path(ref), ref
        try:
            text = path.read_bytes()
        except OSError as exc:
            raise ConfigError(file=where, key=key, expected="a readable profile TOML file",
                              found=ref) from exc
    else:
        if ref not in builtin_profiles():
            raise ConfigError(file=where, key=key, expected="one of: "
                              + ", ".join(builtin_profiles()) + " (or a .toml path)", found=ref)
        label = f"firmware_adapters/obd/profiles/{ref}.toml"
        text = resources.files(__package__).joinpath("profiles", f"{ref}.toml").read_bytes()
    try:
        data = tomllib.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(file=label, key="", expected="a TOML profile",
                          found=str(exc)[:80]) from exc
    return parse_profile(data, label)


def _int(table: Mapping[str, object], key: str, where: str, prefix: str, *, lo: int, hi: int,
         default: int | None = None) -> int:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ConfigError(file=where, key=f"{prefix}.{key}", expected=f"an integer {lo}..{hi}",
                          found=value)
    return value


def _unknown(table: Mapping[str, object], known: set[str], where: str, prefix: str) -> None:
    extra = sorted(set(table) - known)
    if extra:
        raise ConfigError(file=where, key=f"{prefix}.{extra[0]}",
                          expected="one of " + ", ".join(sorted(known)), found=extra[0])


def parse_field(spec: object, where: str, prefix: str) -> Field:
    if not isinstance(spec, Mapping):
        raise ConfigError(file=where, key=prefix, expected="a table", found=spec)
    _unknown(spec, FIELD_KEYS, where, prefix)
    name = spec.get("name")
    known = VEHICLE_SIGNALS.get(name) if isinstance(name, str) else None
    if known is None or not isinstance(name, str):
        raise ConfigError(file=where, key=f"{prefix}.name",
                          expected="a name from agent.readings.VEHICLE_SIGNALS", found=name)
    states_raw = spec.get("states", {})
    if not isinstance(states_raw, Mapping):
        raise ConfigError(file=where, key=f"{prefix}.states", expected="a table code = value",
                          found=states_raw)
    states = []
    for code, value in states_raw.items():
        if not str(code).isdigit() or isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(file=where, key=f"{prefix}.states.{code}",
                              expected="integer code = integer value", found=value)
        states.append((int(code), value))
    default = spec.get("default")
    if default is not None and (isinstance(default, bool) or not isinstance(default, int)):
        raise ConfigError(file=where, key=f"{prefix}.default", expected="an integer",
                          found=default)
    signed = spec.get("signed", False)
    if not isinstance(signed, bool):
        raise ConfigError(file=where, key=f"{prefix}.signed", expected="true or false",
                          found=signed)
    mask = spec.get("mask")
    length = _int(spec, "length", where, prefix, lo=1, hi=8)
    if mask is not None:
        mask = _int(spec, "mask", where, prefix, lo=1, hi=(1 << 8 * length) - 1)
    return Field(name, known.unit, _int(spec, "offset", where, prefix, lo=0, hi=4000), length,
                 _int(spec, "mul", where, prefix, lo=-10**9, hi=10**9, default=1),
                 _int(spec, "div", where, prefix, lo=1, hi=10**9, default=1),
                 _int(spec, "add", where, prefix, lo=-10**9, hi=10**9, default=0),
                 signed, mask, _int(spec, "shift", where, prefix, lo=0, hi=63, default=0),
                 tuple(sorted(states)), default)


def parse_profile(data: Mapping[str, object], where: str) -> Profile:
    _unknown(data, PROFILE_KEYS, where, "profile")
    texts = {}
    for key in ("name", "title", "source"):
        value = data.get(key)
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(file=where, key=key, expected="a non-empty string", found=value)
        texts[key] = value
    ecus_raw = data.get("ecus")
    if not isinstance(ecus_raw, Mapping) or not ecus_raw:
        raise ConfigError(file=where, key="ecus", expected="a table of ECUs", found=ecus_raw)
    ecus: dict[str, Route] = {}
    for ecu, spec in ecus_raw.items():
        if not isinstance(spec, Mapping):
            raise ConfigError(file=where, key=f"ecus.{ecu}", expected="{request, response}",
                              found=spec)
        _unknown(spec, {"request", "response"}, where, f"ecus.{ecu}")
        ecus[ecu] = Route(_int(spec, "request", where, f"ecus.{ecu}", lo=0, hi=0x1FFFFFFF),
                          _int(spec, "response", where, f"ecus.{ecu}", lo=0, hi=0x1FFFFFFF))
    dids_raw = data.get("dids")
    if not isinstance(dids_raw, list) or not dids_raw:
        raise ConfigError(file=where, key="dids", expected="an array of DIDs", found=dids_raw)
    dids: list[Did] = []
    for i, spec in enumerate(dids_raw):
        prefix = f"dids[{i}]"
        if not isinstance(spec, Mapping):
            raise ConfigError(file=where, key=prefix, expected="a table", found=spec)
        _unknown(spec, DID_KEYS, where, prefix)
        ecu = spec.get("ecu")
        if ecu not in ecus:
            raise ConfigError(file=where, key=f"{prefix}.ecu",
                              expected="one of " + ", ".join(ecus), found=ecu)
        period = spec.get("period_s", 5.0)
        if isinstance(period, bool) or not isinstance(period, int | float) \
                or not 0.05 <= period <= 86400:
            raise ConfigError(file=where, key=f"{prefix}.period_s",
                              expected="seconds, 0.05..86400", found=period)
        fields_raw = spec.get("fields")
        if not isinstance(fields_raw, list) or not fields_raw:
            raise ConfigError(file=where, key=f"{prefix}.fields", expected="an array of fields",
                              found=fields_raw)
        fields = tuple(parse_field(f, where, f"{prefix}.fields[{j}]")
                       for j, f in enumerate(fields_raw))
        did = Did(str(ecu), ecus[str(ecu)], _int(spec, "did", where, prefix, lo=0, hi=0xFFFF),
                  int(period * NS), _int(spec, "min_length", where, prefix, lo=1, hi=4000),
                  fields)
        for f in fields:
            if f.offset + f.length > did.min_length:
                raise ConfigError(file=where, key=f"{prefix}.min_length",
                                  expected=f"at least {f.offset + f.length} ({f.name})",
                                  found=did.min_length)
        if any((d.route, d.did) == (did.route, did.did) for d in dids):
            raise ConfigError(file=where, key=f"{prefix}.did", expected="each DID once per ECU",
                              found=f"{did.did:04X}")
        dids.append(did)
    return Profile(texts["name"], texts["title"], texts["source"], tuple(ecus.items()),
                   tuple(dids))


def markdown_profiles() -> str:
    """Every shipped profile as Markdown (docs/vehicle.md embeds it; a test keeps it equal)."""
    out: list[str] = []
    for name in builtin_profiles():
        p = load_profile(name)
        out += [f"### `{p.name}`: {p.title}", "", f"Source: {p.source}.", "",
                "| ECU (request -> response) | DID | period s | bytes | VSS name | unit | value |",
                "|---|---|---|---|---|---|---|"]
        for d in p.dids:
            for f in d.fields:
                ecu = f"{d.ecu} ({d.route.request_id:X} -> {d.route.response_id:X})"
                span = f"{f.offset}" if f.length == 1 else f"{f.offset}..{f.offset + f.length - 1}"
                out.append(f"| {ecu} | {d.did:04X} | {d.period_ns / NS:g} | {span} | {f.name} | "
                           f"{f.unit or '-'} | {_formula(f)} |")
        out.append("")
    return "\n".join(out)


def _formula(f: Field) -> str:
    raw = "signed raw" if f.signed else "raw"
    if f.mask is not None:
        raw = f"(raw & {f.mask:#x})" + (f" >> {f.shift}" if f.shift else "")
    if f.states:
        table = ", ".join(f"{k} -> {v}" for k, v in f.states)
        return f"{raw}: {table}" + ("" if f.default is None else f", else {f.default}")
    text = raw if f.mul == 1 else f"{raw} * {f.mul}"
    text = text if f.div == 1 else f"{text} / {f.div}"
    return text if not f.add else f"{text} {'+' if f.add > 0 else '-'} {abs(f.add)}"
