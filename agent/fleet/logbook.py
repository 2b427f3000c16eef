"""The mileage logbook: a self-contained bundle anyone checks offline (the digital logbook
against odometer fraud).

``make_bundle(db, vin)`` (``edge-agent fleet logbook VIN --out FILE``) collects, for every
device that reported that VIN, the ORIGINAL signed envelopes carrying its odometer readings
(``Vehicle.TraveledDistance``), its VIN, its odometer events (``odometer-*``) and its drop
declarations; every other envelope of the chain in between is left out, and each run of
left-out envelopes is represented by its seq range and the hash of its last envelope only.
That hash is what the next included envelope's signed ``prev`` must equal, so the links
still check, and the bundle stays small and says nothing about the trips in between.

``verify_bundle(data)`` (``edge-agent verify --logbook FILE``) needs no database: it admits
the keys through their provisioning/rotation records (agent.fleet_keys rules: proof of
possession, rotations signed by the old key), checks each included envelope's signature,
the revocations (a key revoked before an envelope's time fails it), seq continuity and
every link, and that the odometer never goes down; it prints the mileage history. What it
proves and what it cannot: nothing in the bundle can be edited, reordered or removed
without failing; but whether a LEFT-OUT envelope carried an odometer value rests on the
fleet's selection (anchoring, agent.fleet.anchor, pins the whole history in time).

Bundle (deterministic CBOR map)::

    {"type": "evedge-logbook", "v": 1, "vin": tstr, "made_ns": uint,
     "keys": [record bstr, ...],            # provisioning / rotation records (CBOR)
     "revoked": [[kid bstr, revoked_ns uint], ...],
     "chains": {device tstr: [entry, ...]}, # entry: envelope bstr | [first, last, hash|null]
     "anchors": [...]}                       # optional (agent.fleet.anchor)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from agent import dcbor
from agent.envelope import GENESIS, OpenedEnvelope, open_envelope
from agent.errors import EdgeAgentError, MalformedEnvelope, RemoteProtocolError, SignatureError
from agent.fleet.db import Database
from agent.fleet.registry import envelope_time
from agent.fleet_keys import FleetRegistry

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


@dataclass
class LogbookReport:
    vin: str = ""
    history: list[Mileage] = field(default_factory=list)
    events: list[tuple[str, int, str, str]] = field(default_factory=list)  # device seq code msg
    failures: list[str] = field(default_factory=list)
    envelopes: int = 0
    anchored: int = 0      # envelopes whose root's transaction is proven in a block
    recorded: int = 0      # envelopes in a root the fleet recorded, not on chain (yet)
    anchorings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures and self.envelopes > 0

    def fail(self, reason: str) -> None:
        self.failures.append(reason)

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
        for reason in self.failures:
            lines.append(f"FAIL {reason}")
        lines.append("logbook verifies" if self.ok else "logbook verification FAILED")
        return "\n".join(lines)


def verify_bundle(data: bytes, trusted: FleetRegistry | None = None) -> LogbookReport:
    """Check a logbook bundle offline. Never raises for bad content: reports it."""
    report = LogbookReport()
    try:
        bundle = dcbor.loads(data, max_bytes=MAX_BUNDLE_BYTES, max_items=10_000_000)
        if not isinstance(bundle, dict) or bundle.get("type") != BUNDLE_TYPE \
                or bundle.get("v") != 1:
            raise MalformedEnvelope("not a logbook bundle (type/version)")
        report.vin = str(bundle.get("vin", ""))
        registry = _admit_keys(bundle, trusted, report)
        revoked = _revocations(bundle)
        chains = bundle.get("chains")
        if not isinstance(chains, dict):
            raise MalformedEnvelope("bundle chains must be a map")
        for device, entries in sorted(chains.items()):
            if not isinstance(device, str) or not isinstance(entries, list):
                raise MalformedEnvelope("bundle chain entries must be arrays")
            _check_chain(device, entries, registry, revoked, report)
        from agent.fleet.anchor import check_anchors

        check_anchors(bundle, chains, report)
    except (RemoteProtocolError, ValueError, TypeError) as exc:
        report.fail(f"malformed bundle: {exc}")
    report.history.sort(key=lambda m: (m.ts_ns, m.device, m.seq))
    return report


def _admit_keys(bundle: dict[object, object], trusted: FleetRegistry | None,
                report: LogbookReport) -> FleetRegistry:
    registry = FleetRegistry(keys=dict(trusted.keys) if trusted else {})
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
            report.fail(f"key record of {record.get('device')!r} refused: {exc}")
    return registry


def _revocations(bundle: dict[object, object]) -> dict[bytes, int]:
    revoked: dict[bytes, int] = {}
    items = bundle.get("revoked", [])
    if not isinstance(items, list):
        raise MalformedEnvelope("bundle revoked must be an array")
    for item in items:
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], bytes)
                and isinstance(item[1], int)):
            raise MalformedEnvelope("a revocation is [kid, revoked_ns]")
        revoked[item[0]] = item[1]
    return revoked


def _check_chain(device: str, entries: list[object], registry: FleetRegistry,
                 revoked: dict[bytes, int], report: LogbookReport) -> None:
    expected_seq: int | None = None
    link: bytes | None = None  # hash the next envelope's prev must equal (None: unknown)
    last_km: Mileage | None = None
    for entry in entries:
        if isinstance(entry, list):
            first, last, digest = _run(entry)
            if expected_seq is not None and first != expected_seq:
                report.fail(f"{device}: envelopes {expected_seq}..{first - 1} are missing "
                            f"from the logbook")
            if digest is None:
                report.fail(f"{device}: envelopes {first}..{last} are missing from the fleet's "
                            f"record (a gap)")
            expected_seq, link = last + 1, digest
            continue
        if not isinstance(entry, bytes):
            raise MalformedEnvelope("a chain entry is an envelope or [first, last, hash]")
        try:
            opened = open_envelope(entry, registry.lookup)
        except (SignatureError, RemoteProtocolError) as exc:
            report.fail(f"{device}: envelope after seq {(expected_seq or 0) - 1}: "
                        f"{exc.reason}: {exc}")
            expected_seq, link = (expected_seq + 1 if expected_seq is not None else None), None
            continue
        _check_envelope(device, opened, expected_seq, link, registry, revoked, report)
        expected_seq, link = opened.seq + 1, opened.hash
        report.envelopes += 1
        last_km = _odometer(device, opened, last_km, report)


def _run(entry: list[object]) -> tuple[int, int, bytes | None]:
    if len(entry) != 3 or not isinstance(entry[0], int) or not isinstance(entry[1], int) \
            or entry[0] > entry[1] or not (entry[2] is None or isinstance(entry[2], bytes)):
        raise MalformedEnvelope("a left-out run is [first, last, hash | null]")
    return entry[0], entry[1], entry[2]


def _check_envelope(device: str, opened: OpenedEnvelope, expected_seq: int | None,
                    link: bytes | None, registry: FleetRegistry, revoked: dict[bytes, int],
                    report: LogbookReport) -> None:
    if opened.device != device or registry.device_of(opened.kid) != device:
        report.fail(f"{device}: seq {opened.seq} is of device {opened.device}, signed by a "
                    f"key of {registry.device_of(opened.kid)}")
    if opened.kid in revoked and envelope_time(opened) >= revoked[opened.kid]:
        report.fail(f"{device}: seq {opened.seq} was signed by key {opened.kid.hex()} after "
                    f"its revocation")
    if expected_seq is not None and opened.seq != expected_seq:
        report.fail(f"{device}: seq {opened.seq} where seq {expected_seq} was expected "
                    f"(an envelope removed or moved)")
    elif link is not None and opened.prev != link:
        report.fail(f"{device}: seq {opened.seq} does not link to the envelope before it")
    elif expected_seq is None and opened.seq == 0 and opened.prev != GENESIS:
        report.fail(f"{device}: seq 0 does not start from the genesis value")


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
                        f"{mileage.km} km (seq {mileage.seq})")
        report.history.append(mileage)
        last = mileage
    return last
