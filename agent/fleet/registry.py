"""The fleet registry in the fleet database, so every ingest worker shares one.

The RULES are agent.fleet_keys.FleetRegistry's (proof of possession, a rotation signed by a
key of the same device, and whatever refusals that class grows): every change here loads
the registry from the database into a FleetRegistry, applies the change through its
methods, and writes the result back in the same transaction. Nothing is checked twice in
two ways.

What the database adds to the TOML file: the provisioning/rotation RECORD of each key (the
mileage logbook ships it, so a buyer checks the key's proofs himself) and the TIME of each
revocation: a revocation takes effect for envelopes signed after it (an envelope's time is
the newest timestamp of its readings or events), so a key stolen today does not void the
history it signed honestly. Revocations imported from fleet.toml have no time: they count
from 0 (every envelope of that key is refused).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from agent import dcbor
from agent.envelope import GENESIS, OpenedEnvelope, open_envelope
from agent.errors import RevokedKey, UnknownKey
from agent.fleet.db import Database
from agent.fleet_keys import FleetRegistry, RegisteredKey


@dataclass
class RegistrySnapshot:
    """The registry as one worker holds it in memory, with revocation times."""

    registry: FleetRegistry
    revoked_ns: dict[bytes, int] = field(default_factory=dict)
    records: dict[bytes, bytes] = field(default_factory=dict)  # kid -> record CBOR
    loaded_ns: int = 0

    def public_key(self, kid: bytes) -> bytes:
        """kid -> Ed25519 key, revoked or not (the revocation time is checked after the
        envelope is open, see :meth:`open`)."""
        entry = self.registry.keys.get(kid)
        if entry is None:
            raise UnknownKey(f"key {kid.hex()} is not in the fleet registry", kid=kid)
        return entry.ed25519

    def open(self, data: bytes) -> OpenedEnvelope:
        """open_envelope, then the revocation rule; raises only agent.errors."""
        opened = open_envelope(data, self.public_key)
        revoked = self.revoked_ns.get(opened.kid)
        if revoked is not None and envelope_time(opened) >= revoked:
            raise RevokedKey(f"key {opened.kid.hex()} was revoked at {revoked} ns, before "
                             f"this envelope (seq {opened.seq}) was signed", kid=opened.kid)
        return opened


def envelope_time(opened: OpenedEnvelope) -> int:
    """When an envelope was signed, as far as it says: its newest reading or event time.
    A drop envelope says nothing: it counts as signed now (a revoked key's drops are
    refused)."""
    times = [r.ts_ns for r in opened.readings] + [e.ts_ns for e in opened.events]
    return max(times) if times else time.time_ns()


def load(db: Database) -> RegistrySnapshot:
    snapshot = RegistrySnapshot(FleetRegistry(), loaded_ns=time.time_ns())
    for kid, device, ed, secp, added, rotated, record in db.query(
            "SELECT kid, device, ed25519, secp256k1, added_ns, rotated_from, record FROM keys"):
        entry = RegisteredKey(device, bytes(kid), bytes(ed), bytes(secp), int(added),
                              bytes(rotated) if rotated is not None else None)
        snapshot.registry.keys[entry.kid] = entry
        if record is not None:
            snapshot.records[entry.kid] = bytes(record)
    for kid, revoked_ns in db.query("SELECT kid, revoked_ns FROM revoked"):
        snapshot.registry.revoked.add(bytes(kid))
        snapshot.revoked_ns[bytes(kid)] = int(revoked_ns)
    return snapshot


def add_record(db: Database, record: dict[str, object]) -> RegisteredKey:
    """Admit the key a provisioning/rotation record introduces (FleetRegistry's rules)."""
    return add_records(db, [record])[0]


def add_records(db: Database, records: list[dict[str, object]]) -> list[RegisteredKey]:
    """Several records in one transaction, in order (a rotation after its provisioning)."""

    def work(d: Database) -> list[RegisteredKey]:
        registry = _load_in(d)
        entries = []
        for record in records:
            entry = registry.add_record(record)
            _write_key(d, entry, dcbor.dumps(record))
            if record.get("type") == "provision":
                # A provisioned device's chain starts at seq 0 (prev = genesis), so even
                # its very first envelopes count as missing if they never arrive.
                d.execute("INSERT INTO devices (device, base_seq, head_seq, head_hash, "
                          "max_seq) VALUES (?, -1, -1, ?, -1) ON CONFLICT DO NOTHING",
                          (entry.device, GENESIS))
            entries.append(entry)
        return entries

    return db.transaction(work)


def revoke(db: Database, kid: bytes, revoked_ns: int | None = None) -> tuple[int, bool]:
    """Revoke ``kid`` for envelopes signed from ``revoked_ns`` (now) on. Revoking it again
    from an earlier time moves the revocation earlier; a later time changes nothing (a
    revocation never narrows). Returns (the revocation time in force, whether it changed)."""
    when = time.time_ns() if revoked_ns is None else revoked_ns

    def work(d: Database) -> tuple[int, bool]:
        registry = _load_in(d)
        registry.revoke(kid)
        rows = d.query("SELECT revoked_ns FROM revoked WHERE kid = ?", (kid,))
        if not rows:
            d.execute("INSERT INTO revoked (kid, revoked_ns) VALUES (?, ?)", (kid, when))
            return when, True
        current = int(rows[0][0])
        if when >= current:
            return current, False
        d.execute("UPDATE revoked SET revoked_ns = ? WHERE kid = ?", (when, kid))
        return when, True

    return db.transaction(work)


def import_toml(db: Database, path: str | os.PathLike[str]) -> tuple[int, int]:
    """Copy the keys and revocations of a fleet.toml into the database (kept ones stay).
    Returns (keys, revocations) imported."""
    source = FleetRegistry.load(path)

    def work(d: Database) -> tuple[int, int]:
        known = _load_in(d)
        keys = [e for kid, e in source.keys.items() if kid not in known.keys]
        for entry in keys:
            _write_key(d, entry, None)
        revoked = [kid for kid in source.revoked if kid not in known.revoked]
        for kid in revoked:
            d.execute("INSERT INTO revoked (kid, revoked_ns) VALUES (?, 0) "
                      "ON CONFLICT DO NOTHING", (kid,))
        return len(keys), len(revoked)

    return db.transaction(work)


def _load_in(db: Database) -> FleetRegistry:
    registry = FleetRegistry()
    for kid, device, ed, secp, added, rotated in db.execute(
            "SELECT kid, device, ed25519, secp256k1, added_ns, rotated_from FROM keys"
            + db.for_update()).fetchall():
        registry.keys[bytes(kid)] = RegisteredKey(
            device, bytes(kid), bytes(ed), bytes(secp), int(added),
            bytes(rotated) if rotated is not None else None)
    registry.revoked = {bytes(r[0]) for r in db.execute("SELECT kid FROM revoked").fetchall()}
    return registry


def _write_key(db: Database, entry: RegisteredKey, record: bytes | None) -> None:
    db.execute("INSERT INTO keys (kid, device, ed25519, secp256k1, added_ns, rotated_from, "
               "record) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (kid) DO UPDATE SET "
               # a key imported from a fleet.toml has no record: its record, once given,
               # is kept (a logbook carries it); a record already there stays
               "record = COALESCE(keys.record, excluded.record)",
               (entry.kid, entry.device, entry.ed25519, entry.secp256k1, entry.added_ns,
                entry.rotated_from, record))
