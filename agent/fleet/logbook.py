"""The mileage logbook: a self-contained bundle anyone checks offline (the digital logbook
against odometer fraud).

``make_bundle(db, vin)`` (``edge-agent fleet logbook VIN --out FILE``) collects, for every
device that reported that VIN, the ORIGINAL signed envelopes carrying its odometer readings
(``Vehicle.TraveledDistance``), its VIN, its odometer events (``odometer-*``) and its drop
declarations; every other envelope of the chain in between is left out, and each run of
left-out envelopes is represented by its seq range and the hash of its last envelope only.
That hash is what the next included envelope's signed ``prev`` must equal, so the links
still check, and the bundle stays small and says nothing about the trips in between.

``verify_bundle(data, trusted)`` (``edge-agent verify --logbook FILE [--registry FILE]``)
needs no database: it admits the keys through their provisioning/rotation records
(agent.fleet_keys rules: proof of possession, rotations signed by the old key), checks each
included envelope's signature, the revocations (a key revoked before an envelope's time
fails it; a key revoked in the trusted registry fails everything it signed), seq continuity
and every link, that every chain carries a signed VIN reading equal to the bundle's VIN and
none other, and that the odometer never goes down, per chain and over the whole history in
time across devices; it prints the mileage history. With ``trusted`` every signing key must
be in it or rotated from one of its keys; without, the report says that the keys come from
the bundle alone, with their fingerprints. A bundle with no chain, no signed envelope or no
odometer reading fails. What it proves and what it cannot: docs/fleet.md (the logbook).

Bundle (deterministic CBOR map)::

    {"type": "evedge-logbook", "v": 1, "vin": tstr, "made_ns": uint,
     "keys": [record bstr, ...],            # provisioning / rotation records (CBOR)
     "revoked": [[kid bstr, revoked_ns uint], ...],
     "chains": {device tstr: [entry, ...]}, # entry: envelope bstr | [first, last, hash|null]
     "anchors": [...]}                       # optional (agent.fleet.anchor)
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field

from agent import dcbor
from agent.envelope import GENESIS, MAX_ENVELOPE_BYTES, P_SEQ, OpenedEnvelope, open_envelope
from agent.errors import EdgeAgentError, MalformedEnvelope, RemoteProtocolError, SignatureError
from agent.fleet.db import Database
from agent.fleet.registry import envelope_time
from agent.fleet_keys import FleetRegistry
from agent.keys import fingerprint

ODOMETER = "Vehicle.TraveledDistance"
VIN = "Vehicle.VehicleIdentification.VIN"
BUNDLE_TYPE = "evedge-logbook"
MAX_BUNDLE_BYTES = 64 << 20


class LogbookError(EdgeAgentError):
    """No such vehicle in the database, or a bundle that is not a logbook."""

    reason = "logbook"


# --------------------------------------------------------------------------- making


def make_bundle(db: Database, vin: str, now_ns: int | None = None) -> bytes:
    devices = [r[0] for r in db.query(
        "SELECT DISTINCT device FROM readings WHERE name = ? AND value_text = ? "
        "ORDER BY device", (VIN, vin))]
    if not devices:
        raise LogbookError(f"no device in the fleet database reported VIN {vin}")
    chains: dict[str, list[object]] = {}
    kids: set[bytes] = set()
    for device in devices:
        chains[device] = _chain_entries(db, device, kids)
    records, revoked = [], []
    for kid, record in db.query("SELECT kid, record FROM keys"):
        if record is not None and (bytes(kid) in kids or _device_of_record(record) in devices):
            records.append(bytes(record))
    for kid, revoked_ns in db.query("SELECT kid, revoked_ns FROM revoked"):
        revoked.append([bytes(kid), int(revoked_ns)])
    records.sort(key=lambda r: _created_of(r))
    from agent.fleet.anchor import bundle_anchors

    bundle: dict[str, object] = {
        "type": BUNDLE_TYPE, "v": 1, "vin": vin,
        "made_ns": time.time_ns() if now_ns is None else now_ns,
        "keys": records, "revoked": sorted(revoked), "chains": chains,
        "anchors": bundle_anchors(db, chains)}
    return dcbor.dumps(bundle)


def _chain_entries(db: Database, device: str, kids: set[bytes]) -> list[object]:
    """The included envelopes in seq order, with each run of left-out ones in between."""
    wanted = {int(r[0]) for r in db.query(
        "SELECT DISTINCT seq FROM readings WHERE device = ? AND name IN (?, ?)",
        (device, ODOMETER, VIN))}
    wanted |= {int(r[0]) for r in db.query(
        "SELECT DISTINCT seq FROM events WHERE device = ? AND code LIKE 'odometer-' || ?",
        (device, "%"))}
    wanted |= {int(r[0]) for r in db.query(
        "SELECT seq FROM envelopes WHERE device = ? AND drop_first IS NOT NULL", (device,))}
    first, last = min(wanted), max(wanted)
    entries: list[object] = []
    run_start: int | None = None
    previous, previous_hash = first - 1, None
    for seq, digest, raw, kid in db.query(
            "SELECT seq, hash, raw, kid FROM envelopes WHERE device = ? AND seq BETWEEN ? AND ? "
            "ORDER BY seq", (device, first, last)):
        seq = int(seq)
        if seq > previous + 1:  # the fleet database itself misses these: say so
            if run_start is not None:
                entries.append([run_start, previous, previous_hash])
            entries.append([previous + 1, seq - 1, None])
            run_start = None
        if seq in wanted:
            if run_start is not None:
                entries.append([run_start, seq - 1, previous_hash])
                run_start = None
            entries.append(bytes(raw))
            kids.add(bytes(kid))
        elif run_start is None:
            run_start = seq
        previous, previous_hash = seq, bytes(digest)
    return entries


def _device_of_record(record: bytes) -> str | None:
    decoded = dcbor.loads(bytes(record))
    device = decoded.get("device") if isinstance(decoded, dict) else None
    return device if isinstance(device, str) else None


def _created_of(record: bytes) -> tuple[int, int]:
    decoded = dcbor.loads(record)
    assert isinstance(decoded, dict)
    return (0 if decoded.get("type") == "provision" else 1, int(decoded.get("created_ns", 0)))


# --------------------------------------------------------------------------- checking


@dataclass(frozen=True, slots=True)
class Mileage:
    device: str
    seq: int
    ts_ns: int
    km: float


@dataclass(frozen=True, slots=True)
class SigningKey:
    """A key that signed envelopes of the bundle, and where the verifier's trust in it came
    from (``registry``: the trusted registry file, directly or through rotation records;
    ``bundle``: only the bundle's own provisioning/rotation records)."""

    device: str
    kid: bytes
    fingerprint: str
    envelopes: int
    trusted_by: str


@dataclass
class LogbookReport:
    vin: str = ""
    history: list[Mileage] = field(default_factory=list)
    events: list[tuple[str, int, str, str]] = field(default_factory=list)  # device seq code msg
    failures: list[str] = field(default_factory=list)
    codes: list[str] = field(default_factory=list)   # the reason code of each failure
    envelopes: int = 0
    anchored: int = 0      # envelopes whose root's transaction is proven in a block
    recorded: int = 0      # envelopes in a root the fleet recorded, not on chain (yet)
    anchorings: list[str] = field(default_factory=list)
    registry: str | None = None   # the trusted registry file, None: keys from the bundle only
    keys: list[SigningKey] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        # verify_bundle records a failure for an empty bundle or one without an odometer
        # reading; the conditions stay here too so that no report of nothing is ever ok
        return not self.failures and self.envelopes > 0 and bool(self.history)

    def fail(self, reason: str, code: str = "anchor") -> None:
        """One failure; ``code`` is its reason code (agent.fleet.anchor's carry "anchor")."""
        self.failures.append(reason)
        self.codes.append(code)

    def to_dict(self) -> dict[str, object]:
        reasons = dict(Counter(self.codes))
        return {
            "ok": self.ok, "vin": self.vin, "envelopes": self.envelopes,
            "mileage": [{"device": m.device, "seq": m.seq, "ts_ns": m.ts_ns, "km": m.km}
                        for m in self.history],
            "events": [{"device": d, "seq": q, "code": c, "message": t}
                       for d, q, c, t in self.events],
            "reasons": reasons,
            "failures": [{"code": c, "detail": f} for c, f in zip(self.codes, self.failures,
                                                                   strict=True)],
            "trust": {"keys_from": "registry" if self.registry is not None else "bundle",
                      "registry": self.registry,
                      "keys": [{"device": k.device, "kid": k.kid.hex(),
                                "fingerprint": k.fingerprint, "envelopes": k.envelopes,
                                "trusted_by": k.trusted_by} for k in self.keys]},
            "anchored": self.anchored, "recorded": self.recorded,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def format(self) -> str:
        lines = [f"mileage logbook of VIN {self.vin}: {self.envelopes} signed envelope(s)"]
        for m in self.history:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(m.ts_ns / 1e9))
            lines.append(f"  {when} UTC  {m.km:>10.1f} km  ({m.device} seq {m.seq})")
        for device, seq, code, message in self.events:
            lines.append(f"  event {code} ({device} seq {seq}): {message}")
        if self.anchored:
            lines.append(f"  {self.anchored} envelope(s) anchored on chain:")
            lines += [f"    {line}" for line in self.anchorings]
        if self.recorded:
            lines.append(f"  {self.recorded} envelope(s) in Merkle roots not on chain (yet)")
        if self.registry is None:
            lines.append("  keys: taken from the bundle itself only, not checked against a "
                         "registry")
            lines.append("  (give --registry FILE to check them); trusted here:")
        else:
            lines.append(f"  keys: checked against the registry {self.registry}:")
        for k in self.keys:
            how = "" if k.trusted_by in ("bundle", "registry") else f", {k.trusted_by}"
            lines.append(f"    {k.device} key {k.kid.hex()} fingerprint {k.fingerprint} "
                         f"({k.envelopes} envelope(s){how})")
        for reason in self.failures:
            lines.append(f"FAIL {reason}")
        if not self.ok:
            lines.append("logbook verification FAILED")
        elif self.registry is None:
            lines.append("logbook verifies against the keys it carries itself (no registry)")
        else:
            lines.append(f"logbook verifies against the registry {self.registry}")
        return "\n".join(lines)


@dataclass
class _Chain:
    """What one device chain gave: the VIN values its verified envelopes carry, and the
    envelopes each key signed."""

    vins: set[str] = field(default_factory=set)


def verify_bundle(data: bytes, trusted: FleetRegistry | None = None,
                  registry_name: str = "registry") -> LogbookReport:
    """Check a logbook bundle offline. Never raises for bad content: reports it.

    ``trusted``: the fleet registry the reader trusts (a file): every key that signed an
    envelope must be in it, or reached from one of its keys through the bundle's rotation
    records, and its revocations refuse the key for everything. None: the keys come from
    the bundle's own records only, which the report says (``registry`` None)."""
    report = LogbookReport(registry=registry_name if trusted is not None else None)
    try:
        bundle = dcbor.loads(data, max_bytes=MAX_BUNDLE_BYTES, max_items=10_000_000)
        if not isinstance(bundle, dict) or bundle.get("type") != BUNDLE_TYPE \
                or bundle.get("v") != 1:
            raise MalformedEnvelope("not a logbook bundle (type/version)")
        vin = bundle.get("vin")
        if not isinstance(vin, str) or not vin:
            raise MalformedEnvelope("bundle vin must be a non-empty text string")
        report.vin = vin
        registry = _admit_keys(bundle, trusted, report)
        revoked = _revocations(bundle)
        chains = bundle.get("chains")
        if not isinstance(chains, dict):
            raise MalformedEnvelope("bundle chains must be a map")
        if not chains:
            report.fail("the bundle holds no device chain: nothing to verify", "no-chains")
        signed: dict[bytes, int] = {}
        for device, entries in sorted(chains.items()):
            if not isinstance(device, str) or not isinstance(entries, list):
                raise MalformedEnvelope("bundle chain entries must be arrays")
            chain = _Chain()
            _check_chain(device, entries, registry, revoked, report, chain, signed)
            _check_vins(device, vin, chain, report)
        _check_trust(registry, trusted, signed, report)
        from agent.fleet.anchor import check_anchors

        check_anchors(bundle, chains, report)
        if chains and report.envelopes == 0:
            report.fail("the bundle holds no signed envelope: nothing is proven", "no-envelopes")
    except (RemoteProtocolError, ValueError, TypeError) as exc:
        report.fail(f"malformed bundle: {exc}", "malformed-bundle")
    report.history.sort(key=lambda m: (m.ts_ns, m.device, m.seq))
    _check_history(report)
    return report


def _admit_keys(bundle: dict[object, object], trusted: FleetRegistry | None,
                report: LogbookReport) -> FleetRegistry:
    registry = FleetRegistry(keys=dict(trusted.keys) if trusted else {},
                             revoked=set(trusted.revoked) if trusted else set())
    records = bundle.get("keys")
    if not isinstance(records, list):
        raise MalformedEnvelope("bundle keys must be an array of records")
    for raw in records:
        if not isinstance(raw, bytes):
            raise MalformedEnvelope("a key record is a byte string (CBOR)")
        record = dcbor.loads(raw, max_bytes=4096)
        if not isinstance(record, dict):
            raise MalformedEnvelope("a key record is a CBOR map")
        try:
            registry.add_record(record)  # the fleet registry's own rules
        except (SignatureError, RemoteProtocolError) as exc:
            report.fail(f"key record of {record.get('device')!r} refused: {exc}",
                        f"key-record-{exc.reason}")
    return registry


def _anchored_kids(registry: FleetRegistry, trusted: FleetRegistry) -> set[bytes]:
    """The trusted registry's keys and those its keys rotated to (bundle rotation records,
    whose old-key signature FleetRegistry.add_record checked), transitively."""
    anchored = set(trusted.keys)
    grew = True
    while grew:
        grew = False
        for entry in registry.keys.values():
            if entry.kid not in anchored and entry.rotated_from in anchored:
                anchored.add(entry.kid)
                grew = True
    return anchored


def _check_trust(registry: FleetRegistry, trusted: FleetRegistry | None,
                 signed: dict[bytes, int], report: LogbookReport) -> None:
    anchored = _anchored_kids(registry, trusted) if trusted is not None else set()
    for kid, count in sorted(signed.items()):
        entry = registry.keys[kid]
        if trusted is None:
            how = "bundle"
        elif kid in trusted.keys:
            how = "registry"
        elif kid in anchored:
            how = "rotated from a registry key"
        else:
            how = "NOT in the registry"
            report.fail(f"key {kid.hex()} of device {entry.device} (fingerprint "
                        f"{fingerprint(entry.ed25519)}) signed {count} envelope(s) and is not "
                        f"in the registry {report.registry} (nor rotated from a key in it)",
                        "untrusted-key")
        report.keys.append(SigningKey(entry.device, kid, fingerprint(entry.ed25519), count, how))


def _check_vins(device: str, vin: str, chain: _Chain, report: LogbookReport) -> None:
    """The claimed VIN must be signed data: every chain carries a signed VIN reading equal
    to it, and no signed VIN reading differs from it."""
    for other in sorted(chain.vins - {vin}):
        report.fail(f"{device}: signed VIN reading {other!r} is not the bundle's VIN {vin!r}",
                    "vin-mismatch")
    if vin not in chain.vins:
        report.fail(f"{device}: no signed {VIN} reading of {vin!r} in its chain: the bundle's "
                    f"VIN is not bound to this device's envelopes", "vin-not-signed")


def _check_history(report: LogbookReport) -> None:
    """The odometer never goes down over the whole VIN history in time, across devices (a
    swapped box must not restart lower). Pairs of one chain _odometer already reported."""
    if report.envelopes and not report.history:
        report.fail(f"no signed odometer reading ({ODOMETER}) in the bundle: not a mileage "
                    f"logbook", "no-odometer")
    for before, after in zip(report.history, report.history[1:], strict=False):
        if after.km < before.km and (before.device != after.device or after.seq < before.seq):
            report.fail(f"odometer went down from {before.km} km ({before.device} seq "
                        f"{before.seq}) to {after.km} km ({after.device} seq {after.seq}) "
                        f"later in time", "odometer-rollback")


def _revocations(bundle: dict[object, object]) -> dict[bytes, int]:
    revoked: dict[bytes, int] = {}
    items = bundle.get("revoked", [])
    if not isinstance(items, list):
        raise MalformedEnvelope("bundle revoked must be an array")
    for item in items:
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], bytes)
                and type(item[1]) is int):
            raise MalformedEnvelope("a revocation is [kid, revoked_ns]")
        revoked[item[0]] = item[1]
    return revoked


def _check_chain(device: str, entries: list[object], registry: FleetRegistry,
                 revoked: dict[bytes, int], report: LogbookReport, chain: _Chain,
                 signed: dict[bytes, int]) -> None:
    expected_seq: int | None = None
    link: bytes | None = None  # hash the next envelope's prev must equal (None: unknown)
    last_km: Mileage | None = None
    verified = 0
    for entry in entries:
        if isinstance(entry, list):
            first, last, digest = _run(device, entry)
            if expected_seq is not None and first > expected_seq:
                report.fail(f"{device}: envelopes {expected_seq}..{first - 1} are missing "
                            f"from the logbook", "missing-envelopes")
            elif expected_seq is not None and first < expected_seq:
                report.fail(f"{device}: left-out run {first}..{last} starts before seq "
                            f"{expected_seq}, which the chain has reached", "run-overlap")
            if digest is None:
                report.fail(f"{device}: envelopes {first}..{last} are missing from the fleet's "
                            f"record (a gap)", "fleet-gap")
            expected_seq, link = last + 1, digest
            continue
        if not isinstance(entry, bytes):
            raise MalformedEnvelope("a chain entry is an envelope or [first, last, hash]")
        try:
            opened = open_envelope(entry, registry.lookup)
        except (SignatureError, RemoteProtocolError) as exc:
            claimed = _claimed_seq(entry)
            if claimed is not None:
                what = f"the envelope claiming seq {claimed}"
            elif expected_seq is not None:
                what = f"the envelope where seq {expected_seq} was expected"
            else:
                what = "the first envelope of the chain"
            report.fail(f"{device}: {what}: {exc.reason}: {exc}", exc.reason)
            expected_seq, link = (expected_seq + 1 if expected_seq is not None else None), None
            continue
        _check_envelope(device, opened, expected_seq, link, registry, revoked, report)
        expected_seq, link = opened.seq + 1, opened.hash
        report.envelopes += 1
        verified += 1
        signed[opened.kid] = signed.get(opened.kid, 0) + 1
        chain.vins.update(r.value for r in opened.readings
                          if r.name == VIN and isinstance(r.value, str))
        last_km = _odometer(device, opened, last_km, report)
    if not verified:
        report.fail(f"{device}: no signed envelope in this chain", "no-envelopes")


def _claimed_seq(entry: bytes) -> int | None:
    """The seq an envelope that did not verify claims (unverified: only to name it)."""
    try:
        outer = dcbor.loads(entry, max_bytes=MAX_ENVELOPE_BYTES)
        parts = outer.value if isinstance(outer, dcbor.Tag) else None
        if isinstance(parts, list) and len(parts) == 4 and isinstance(parts[2], bytes):
            payload = dcbor.loads(parts[2], max_bytes=MAX_ENVELOPE_BYTES)
            seq = payload.get(P_SEQ) if isinstance(payload, dict) else None
            return seq if type(seq) is int else None
    except (RemoteProtocolError, ValueError, TypeError):
        pass
    return None


def _run(device: str, entry: list[object]) -> tuple[int, int, bytes | None]:
    if not (len(entry) == 3 and type(entry[0]) is int and type(entry[1]) is int
            and 0 <= entry[0] <= entry[1]
            and (entry[2] is None or (isinstance(entry[2], bytes) and len(entry[2]) == 32))):
        raise MalformedEnvelope(f"{device}: left-out run {entry!r} is not [first, last, "
                                f"hash | null] with 0 <= first <= last and a 32-byte hash")
    return entry[0], entry[1], entry[2]


def _check_envelope(device: str, opened: OpenedEnvelope, expected_seq: int | None,
                    link: bytes | None, registry: FleetRegistry, revoked: dict[bytes, int],
                    report: LogbookReport) -> None:
    if opened.device != device or registry.device_of(opened.kid) != device:
        report.fail(f"{device}: seq {opened.seq} is of device {opened.device}, signed by a "
                    f"key of {registry.device_of(opened.kid)}", "device-mismatch")
    if opened.kid in revoked and envelope_time(opened) >= revoked[opened.kid]:
        report.fail(f"{device}: seq {opened.seq} was signed by key {opened.kid.hex()} after "
                    f"its revocation", "revoked-key")
    if expected_seq is not None and opened.seq != expected_seq:
        report.fail(f"{device}: seq {opened.seq} where seq {expected_seq} was expected "
                    f"(an envelope removed or moved)", "seq-mismatch")
    elif link is not None and opened.prev != link:
        report.fail(f"{device}: seq {opened.seq} does not link to the envelope before it",
                    "broken-link")
    elif expected_seq is None and opened.seq == 0 and opened.prev != GENESIS:
        report.fail(f"{device}: seq 0 does not start from the genesis value",
                    "broken-link")


def _odometer(device: str, opened: OpenedEnvelope, last: Mileage | None,
              report: LogbookReport) -> Mileage | None:
    for event in opened.events:
        if event.code.startswith("odometer-"):
            report.events.append((device, opened.seq, event.code, event.message))
    for reading in opened.readings:
        if reading.name != ODOMETER or not isinstance(reading.value, int | float):
            continue
        mileage = Mileage(device, opened.seq, reading.ts_ns, float(reading.value))
        if last is not None and mileage.km < last.km:
            report.fail(f"{device}: odometer went down from {last.km} km (seq {last.seq}) to "
                        f"{mileage.km} km (seq {mileage.seq})", "odometer-rollback")
        report.history.append(mileage)
        last = mileage
    return last
