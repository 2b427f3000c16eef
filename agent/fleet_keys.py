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
    replaces = ["..."]       # kids this key replaced (`registry add --replace`), if any
    replaced_ns = 17637...   # when the replacement was admitted

    [revoked]
    kids = ["..."]

``registry add`` is the technician's step: it takes a provisioning (or rotation) record and
admits the key only if the record's proofs of possession check. A rotated-out key stays
valid for the envelopes it signed; only ``revoke`` makes a key unacceptable.

What it refuses (RegistryRefusal, each with a reason code), because each would let a key
that should not speak for a device speak for it:

* a rotation record signed by a revoked key (``revoked-signer``): whoever stole the key
  could otherwise introduce a fresh one;
* a second rotation from one key (``already-rotated``): a copy of an old key must not fork
  the device's key history;
* re-adding a revoked key (``revoked-key``);
* a provisioning record for a device id that already has keys, revoked ones included
  (``device-exists``): a second ``keys init`` with the same ``--device-id`` on another
  box. A legitimate re-provisioning (the SD card died, the box was swapped) passes ``replace=True``
  (``registry add --replace``), recorded on the new key as ``replaces``/``replaced_ns``;
  the old keys stay valid for what they signed (revoke them if the old box is lost);
* revoking a key id the registry does not hold (``unknown-kid``), with the nearest one.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import stat
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w

from agent.channel.state import eth_address
from agent.config import load_toml
from agent.errors import ConfigError, RegistryRefusal, RevokedKey, UnknownKey
from agent.keys import check_record, key_id
from agent.options import Table

REGISTRY_MODE = 0o644


@dataclass(frozen=True, slots=True)
class RegisteredKey:
    device: str
    kid: bytes
    ed25519: bytes
    secp256k1: bytes
    added_ns: int
    rotated_from: bytes | None = None
    replaces: tuple[bytes, ...] = ()
    replaced_ns: int | None = None

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

    def successors(self) -> dict[bytes, RegisteredKey]:
        """kid -> the key that rotated away from it or replaced it (one pass over all)."""
        return {old: entry for entry in self.keys.values()
                for old in ((entry.rotated_from,) if entry.rotated_from else ()) + entry.replaces}

    def superseded_by(self, kid: bytes) -> RegisteredKey | None:
        """The key that rotated away from ``kid`` or replaced it, if any."""
        return self.successors().get(kid)

    def current_keys(self, device: str) -> list[RegisteredKey]:
        """The device's keys that nothing has rotated away from or replaced (and that are
        not revoked): normally one."""
        superseded = {k.rotated_from for k in self.keys.values() if k.rotated_from}
        superseded.update(kid for k in self.keys.values() for kid in k.replaces)
        return [k for k in self.keys.values() if k.device == device
                and k.kid not in superseded and k.kid not in self.revoked]

    # -- changes ---------------------------------------------------------------------
    def add_record(self, record: dict[str, object], *, replace: bool = False,
                   now_ns: int | None = None) -> RegisteredKey:
        """Admit the key a provisioning/rotation record introduces, after checking its
        proofs (BadSignature / MalformedEnvelope / UnknownKey) and the rules above
        (RegistryRefusal). The same record twice is not an error: it returns the entry."""
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
        device, created_ns = record["device"], record["created_ns"]
        assert isinstance(public, bytes) and isinstance(device, str)
        assert isinstance(created_ns, int)   # check_record checked the types
        kid = key_id(public)
        if kid in self.revoked:
            raise RegistryRefusal(f"key {kid.hex()} of device {device} is revoked: a revoked "
                                  f"key is never admitted again (make new keys with "
                                  f"`edge-agent keys rotate` or `keys init`)",
                                  kid=kid, reason="revoked-key")
        if kid in self.keys:
            return self.keys[kid]
        rotated_from = record.get("old_kid") if record["type"] == "rotate" else None
        replaces: tuple[bytes, ...] = ()
        if isinstance(rotated_from, bytes):
            self._check_rotation(device, rotated_from)
        else:
            current = self.current_keys(device)
            # Every key the device id ever had, revoked ones too: once its key is revoked,
            # a new `keys init` under the same id is still a re-provisioning, never silent.
            known = current or [k for k in self.keys.values() if k.device == device]
            if known and not replace:
                kids = ", ".join(k.kid.hex() for k in known)
                has = f"already has key {kids}" if current else \
                    f"is known here (its key {kids} is revoked)"
                raise RegistryRefusal(
                    f"device {device} {has}: a second `keys init` with this device id "
                    f"(another box?) is refused. If this box legitimately replaces the old "
                    f"one, run `edge-agent registry add --replace` (recorded in the "
                    f"registry), and revoke the old key if the old box is lost",
                    kid=known[0].kid, reason="device-exists")
            replaces = tuple(k.kid for k in known)
        entry = RegisteredKey(
            device=device, kid=kid, ed25519=public, secp256k1=record["secp256k1"],  # type: ignore[arg-type]
            added_ns=created_ns,
            rotated_from=rotated_from if isinstance(rotated_from, bytes) else None,
            replaces=replaces,
            replaced_ns=(time.time_ns() if now_ns is None else now_ns) if replaces else None)
        self.keys[entry.kid] = entry
        return entry

    def _check_rotation(self, device: str, old_kid: bytes) -> None:
        if old_kid in self.revoked:
            raise RegistryRefusal(f"rotation record for device {device} is signed by revoked "
                                  f"key {old_kid.hex()}: a revoked key cannot introduce a new "
                                  f"one (re-provision the device with `keys init` and "
                                  f"`registry add --replace`)", kid=old_kid,
                                  reason="revoked-signer")
        for other in self.keys.values():
            if other.rotated_from == old_kid:
                raise RegistryRefusal(f"key {old_kid.hex()} of device {device} was already "
                                      f"rotated to {other.kid.hex()}: one key rotates once "
                                      f"(a copy of an old key must not fork the device's keys)",
                                      kid=old_kid, reason="already-rotated")

    def revoke(self, kid: bytes) -> bool:
        """Mark ``kid`` revoked; False if it already was. A kid the registry does not hold
        is refused (a typo must not report success), naming the nearest known one."""
        if kid not in self.keys:
            near = difflib.get_close_matches(kid.hex(), [k.hex() for k in self.keys], n=1)
            hint = f"; did you mean {near[0]}?" if near else " (`registry show` lists them)"
            raise RegistryRefusal(f"key {kid.hex()} is not in the registry, nothing revoked"
                                  f"{hint}", kid=kid, reason="unknown-kid")
        if kid in self.revoked:
            return False
        self.revoked.add(kid)
        return True

    # -- file ------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> FleetRegistry:
        try:
            top = load_toml(path, "fleet registry file")
        except ConfigError as exc:
            if Path(path).exists():
                raise
            raise ConfigError(f"{exc}: give the fleet's registry with --registry FILE (the "
                              f"technician's `edge-agent registry add` writes it; the demo "
                              f"leaves one in demo-out/fleet.toml)") from None
        registry = cls()
        for device in top.tables("devices"):
            device_id = device.str("id")
            for key in device.tables("keys"):
                entry = RegisteredKey(
                    device=device_id, kid=_hex(key, "kid", 8), ed25519=_hex(key, "ed25519", 32),
                    secp256k1=_hex(key, "secp256k1", 33), added_ns=key.int("added_ns", 0, min=0),
                    rotated_from=_hex(key, "rotated_from", 8) if "rotated_from" in key.data
                    else None,
                    replaces=tuple(_hex_list(key, "replaces", 8)),
                    replaced_ns=key.opt_int("replaced_ns", min=0))
                key.str("address", "")
                key.reject_unknown()
                if key_id(entry.ed25519) != entry.kid:
                    raise key.error("kid", "the key id of the ed25519 key", entry.kid.hex())
                registry.keys[entry.kid] = entry
            device.reject_unknown()
        revoked = top.table("revoked")
        registry.revoked.update(_hex_list(revoked, "kids", 8))
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
            if entry.replaces:
                item["replaces"] = [kid.hex() for kid in entry.replaces]
                item["replaced_ns"] = entry.replaced_ns or 0
            by_device.setdefault(entry.device, []).append(item)
        document = {"devices": [{"id": d, "keys": k} for d, k in by_device.items()],
                    "revoked": {"kids": sorted(k.hex() for k in self.revoked)}}
        path = Path(path)
        # Public keys only, and the service reads it (/etc/edge-agent/fleet.toml, group
        # edge-agent): a new file is 0644; a file that exists keeps its mode and group.
        try:
            before = path.stat()
            mode, gid = stat.S_IMODE(before.st_mode), before.st_gid
        except FileNotFoundError:
            mode, gid = REGISTRY_MODE, -1
        fd, tmp = tempfile.mkstemp(dir=path.parent or ".", prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(b"# ev-edge-agent fleet registry (edge-agent registry add/revoke)\n")
                tomli_w.dump(document, handle)
                os.fchmod(handle.fileno(), mode)
                if gid != -1 and gid != os.getegid():
                    with contextlib.suppress(PermissionError):
                        os.fchown(handle.fileno(), -1, gid)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _is_hex(text: str, size: int) -> bool:
    try:
        return len(bytes.fromhex(text)) == size
    except ValueError:
        return False


def _hex_list(table: Table, name: str, size: int) -> list[bytes]:
    out = []
    for index, text in enumerate(table.list(name, [])):
        if not isinstance(text, str) or not _is_hex(text, size):
            raise table.error(f"{name}[{index}]", f"{size} bytes in hex", text)
        out.append(bytes.fromhex(text))
    return out


def _hex(table: Table, name: str, size: int) -> bytes:
    text = table.str(name)
    if not _is_hex(text, size):
        raise ConfigError(file=table.where, key=table.key(name),
                          expected=f"{size} bytes in hex", found=text)
    return bytes.fromhex(text)
