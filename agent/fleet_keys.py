"""The fleet registry: which devices exist, their keys, and which keys are revoked.

A TOML file the verifier and the station load (DESIGN s7)::

    [[devices]]
    id = "dev-k3f29qxa"

    [[devices.keys]]
    kid = "0f1e..."          # 8-byte key id, hex
    ed25519 = "..."          # 32-byte public key, hex
    secp256k1 = "..."        # 33-byte compressed public key, hex
    address = "0x..."        # its Ethereum address
    added_ns = 1763700000000000000
    rotated_from = "..."     # kid of the key that signed the rotation, if any

    [revoked]
    kids = ["..."]

``registry add`` is the technician's step: it takes a provisioning (or rotation) record and
admits the key only if the record's proofs of possession check. A rotated-out key stays
valid for the envelopes it signed; only ``revoke`` makes a key unacceptable.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w

from agent.channel.state import eth_address
from agent.config import load_toml
from agent.errors import ConfigError, RevokedKey, UnknownKey
from agent.keys import check_record, key_id
from agent.options import Table


@dataclass(frozen=True, slots=True)
class RegisteredKey:
    device: str
    kid: bytes
    ed25519: bytes
    secp256k1: bytes
    added_ns: int
    rotated_from: bytes | None = None

    @property
    def address(self) -> bytes:
        return eth_address(self.secp256k1)


@dataclass
class FleetRegistry:
    keys: dict[bytes, RegisteredKey] = field(default_factory=dict)
    revoked: set[bytes] = field(default_factory=set)

    # -- lookups ---------------------------------------------------------------------
    def lookup(self, kid: bytes) -> bytes:
        """kid -> Ed25519 public key, for agent.envelope.open_envelope."""
        if kid in self.revoked:
            raise RevokedKey(f"key {kid.hex()} is revoked", kid=kid)
        try:
            return self.keys[kid].ed25519
        except KeyError:
            raise UnknownKey(f"key {kid.hex()} is not in the fleet registry", kid=kid) from None

    def device_of(self, kid: bytes) -> str | None:
        entry = self.keys.get(kid)
        return entry.device if entry else None

    def devices(self) -> list[str]:
        return sorted({k.device for k in self.keys.values()})

    # -- changes ---------------------------------------------------------------------
    def add_record(self, record: dict[str, object]) -> RegisteredKey:
        """Admit the key a provisioning/rotation record introduces, after checking its
        proofs (raises BadSignature / MalformedEnvelope / UnknownKey)."""
        old_public = None
        if record.get("type") == "rotate":
            old_kid = record.get("old_kid")
            old = self.keys.get(old_kid) if isinstance(old_kid, bytes) else None
            if old is None:
                raise UnknownKey("rotation record signed by a key not in the registry",
                                 kid=old_kid if isinstance(old_kid, bytes) else None)
            if old.device != record.get("device"):
                raise UnknownKey("rotation record names another device than its old key",
                                 kid=old.kid)
            old_public = old.ed25519
        check_record(record, old_public)
        public = record["ed25519"]
        entry = RegisteredKey(
            device=record["device"], kid=key_id(public), ed25519=public,  # type: ignore[arg-type]
            secp256k1=record["secp256k1"], added_ns=record["created_ns"],  # type: ignore[arg-type]
            rotated_from=record.get("old_kid"),  # type: ignore[arg-type]
        )
        self.keys[entry.kid] = entry
        return entry

    def revoke(self, kid: bytes) -> None:
        self.revoked.add(kid)

    # -- file ------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> FleetRegistry:
        top = load_toml(path)
        registry = cls()
        for device in top.tables("devices"):
            device_id = device.str("id")
            for key in device.tables("keys"):
                entry = RegisteredKey(
                    device=device_id, kid=_hex(key, "kid", 8), ed25519=_hex(key, "ed25519", 32),
                    secp256k1=_hex(key, "secp256k1", 33), added_ns=key.int("added_ns", 0, min=0),
                    rotated_from=_hex(key, "rotated_from", 8) if "rotated_from" in key.data
                    else None)
                key.str("address", "")
                key.reject_unknown()
                if key_id(entry.ed25519) != entry.kid:
                    raise key.error("kid", "the key id of the ed25519 key", entry.kid.hex())
                registry.keys[entry.kid] = entry
            device.reject_unknown()
        revoked = top.table("revoked")
        for index, kid in enumerate(revoked.list("kids", [])):
            if not isinstance(kid, str) or not _is_hex(kid, 8):
                raise revoked.error(f"kids[{index}]", "an 8-byte key id in hex", kid)
            registry.revoked.add(bytes.fromhex(kid))
        revoked.reject_unknown()
        top.reject_unknown()
        return registry

    @classmethod
    def load_or_empty(cls, path: str | os.PathLike[str]) -> FleetRegistry:
        return cls.load(path) if Path(path).exists() else cls()

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write atomically (temp file + rename): a crash never leaves half a registry."""
        by_device: dict[str, list[dict[str, object]]] = {}
        for entry in sorted(self.keys.values(), key=lambda e: (e.device, e.added_ns)):
            item: dict[str, object] = {
                "kid": entry.kid.hex(), "ed25519": entry.ed25519.hex(),
                "secp256k1": entry.secp256k1.hex(), "address": "0x" + entry.address.hex(),
                "added_ns": entry.added_ns}
            if entry.rotated_from:
                item["rotated_from"] = entry.rotated_from.hex()
            by_device.setdefault(entry.device, []).append(item)
        document = {"devices": [{"id": d, "keys": k} for d, k in by_device.items()],
                    "revoked": {"kids": sorted(k.hex() for k in self.revoked)}}
        path = Path(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent or ".", prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "wb") as handle:
            handle.write(b"# ev-edge-agent fleet registry (edge-agent registry add/revoke)\n")
            tomli_w.dump(document, handle)
        os.replace(tmp, path)


def _is_hex(text: str, size: int) -> bool:
    try:
        return len(bytes.fromhex(text)) == size
    except ValueError:
        return False


def _hex(table: Table, name: str, size: int) -> bytes:
    text = table.str(name)
    if not _is_hex(text, size):
        raise ConfigError(file=table.where, key=table.key(name),
                          expected=f"{size} bytes in hex", found=text)
    return bytes.fromhex(text)
