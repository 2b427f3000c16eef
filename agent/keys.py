"""Device keys: the Ed25519 identity key and the secp256k1 settlement key.

Both are generated on the device (``edge-agent keys init``) and never leave it: the secret
files are raw 32-byte seeds, mode 0600, under ``<state_dir>/keys/``. A secret file that group
or others can read is refused (InsecureKeyFile) with the command that fixes it. Secrets never
appear in a repr, a log line or an exception.

Provisioning record (DESIGN s7): the public keys, the device id and a time, signed by the new
identity key and by the new settlement key (proof of possession of both), as deterministic
CBOR and as JSON. A rotation record introduces a new key pair and is signed by the OLD
identity key (and by the new keys, for possession); the envelope seq simply continues.

Every signature here is domain-separated by a context string that names the record type, so
a provisioning signature can never pass as an envelope or channel signature.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import stat
import time
from dataclasses import dataclass
from pathlib import Path

import nacl.exceptions
import nacl.signing
from coincurve import PrivateKey, PublicKey

from agent import dcbor
from agent.durable import OS, FileOps, create_file, make_dir, write_atomic
from agent.errors import BadSignature, InsecureKeyFile, KeyStoreError, MalformedEnvelope

IDENTITY_FILE = "identity.ed25519"
SETTLEMENT_FILE = "settlement.secp256k1"
DEVICE_FILE = "device.json"
RECORDS_DIR = "records"

PROVISION_CONTEXT = b"evedge/v1/provision"
ROTATE_CONTEXT = b"evedge/v1/rotate"


def key_id(public: bytes) -> bytes:
    """8-byte key id: the first bytes of SHA-256 of the Ed25519 public key."""
    return hashlib.sha256(public).digest()[:8]


def fingerprint(public: bytes) -> str:
    """Short, readable fingerprint for a technician: 8 base32 chars in two groups."""
    text = base64.b32encode(hashlib.sha256(public).digest()[:5]).decode()
    return f"{text[:4]}-{text[4:]}"


def verify_ed25519(public: bytes, message: bytes, signature: bytes) -> None:
    """Return if ``signature`` is ``public``'s over ``message``; raise BadSignature."""
    try:
        nacl.signing.VerifyKey(public).verify(message, signature)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, TypeError) as exc:
        raise BadSignature("Ed25519 signature does not verify", kid=key_id(public)) from exc


class IdentityKey:
    """The device's Ed25519 identity key. Signs envelopes and channel messages."""

    __slots__ = ("_signing", "public", "kid")

    def __init__(self, seed: bytes) -> None:
        if not isinstance(seed, bytes) or len(seed) != 32:
            raise KeyStoreError("an Ed25519 seed is 32 bytes")
        self._signing = nacl.signing.SigningKey(seed)
        self.public = bytes(self._signing.verify_key)
        self.kid = key_id(self.public)

    @classmethod
    def generate(cls) -> IdentityKey:
        return cls(os.urandom(32))

    def sign(self, message: bytes) -> bytes:
        return self._signing.sign(message).signature

    def seed(self) -> bytes:
        return bytes(self._signing)

    def __repr__(self) -> str:
        return f"IdentityKey(kid={self.kid.hex()})"


class SettlementKey:
    """The device's secp256k1 key: signs channel states the EVM contract checks."""

    __slots__ = ("_private", "public", "_address")

    def __init__(self, secret: bytes) -> None:
        if not isinstance(secret, bytes) or len(secret) != 32:
            raise KeyStoreError("a secp256k1 secret is 32 bytes")
        try:
            self._private = PrivateKey(secret)
        except ValueError:
            raise KeyStoreError("secp256k1 secret out of range") from None
        self.public = self._private.public_key.format(compressed=True)
        self._address: bytes | None = None

    @property
    def address(self) -> bytes:
        """20-byte Ethereum address; computed on first use, because keccak (pycryptodome)
        costs ~30 ms of start-up that a telemetry-only agent never needs."""
        if self._address is None:
            from agent.channel.state import eth_address

            self._address = eth_address(self._private.public_key)
        return self._address

    @classmethod
    def generate(cls) -> SettlementKey:
        return cls(PrivateKey().secret)

    @property
    def private_key(self) -> PrivateKey:
        return self._private

    def sign_digest(self, digest: bytes) -> bytes:
        from agent.channel.state import sign_digest

        return sign_digest(self._private, digest)

    def secret(self) -> bytes:
        return self._private.secret

    def __repr__(self) -> str:
        return f"SettlementKey(address=0x{self.address.hex()})"


# --- key files -------------------------------------------------------------------------

def read_secret(path: Path) -> bytes:
    """A 32-byte secret seed file, refused when group or others can read it."""
    try:
        info = path.stat()
    except FileNotFoundError:
        raise KeyStoreError(f"no key file {path}: run `edge-agent keys init --state-dir "
                            f"{path.parent.parent}` first", reason="missing-key") from None
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise InsecureKeyFile(
            f"key file {path} is readable by others (mode {stat.S_IMODE(info.st_mode):04o}); "
            f"fix it with: chmod 600 {path}")
    try:
        data = path.read_bytes()
    except PermissionError:
        raise KeyStoreError(f"key file {path} is not readable by this user") from None
    if len(data) != 32:
        raise KeyStoreError(f"key file {path} is {len(data)} bytes, expected 32")
    return data


@dataclass(frozen=True, slots=True)
class DeviceKeys:
    device_id: str
    identity: IdentityKey
    settlement: SettlementKey


KEY_FILES = (IDENTITY_FILE, SETTLEMENT_FILE, DEVICE_FILE)
NEW = ".new"  # suffix of a rotation's files before they replace the current ones


class KeyStore:
    """The key directory ``<state_dir>/keys``: secrets, the device file, issued records.

    Power-cut safety (issue 15.2; agent.durable): ``init`` builds the whole directory as
    ``keys.partial`` and renames it into place, so there are either no keys or complete
    ones. ``rotate`` writes the new files as ``*.new`` (fsync'd, directory fsync'd), then
    the rotation record signed by the old key (temp, fsync, rename, fsync: the commit
    point), then renames the new files over the old ones. At every instant the old key, or
    the new key with its record, is on disk; ``load`` finishes a rotation a crash
    interrupted (forward if its record is on disk, back otherwise)."""

    def __init__(self, state_dir: str | os.PathLike[str], *, ops: FileOps = OS) -> None:
        self.dir = Path(state_dir) / "keys"
        self.ops = ops

    def exists(self) -> bool:
        return (self.dir / IDENTITY_FILE).exists()

    def load(self) -> DeviceKeys:
        self._finish_rotation()
        identity = IdentityKey(read_secret(self.dir / IDENTITY_FILE))
        settlement = SettlementKey(read_secret(self.dir / SETTLEMENT_FILE))
        try:
            device = json.loads((self.dir / DEVICE_FILE).read_text())
            device_id = device["device"]
            kid = device["kid"]
        except (OSError, ValueError, KeyError, TypeError):
            raise KeyStoreError(f"{self.dir / DEVICE_FILE} is missing or damaged") from None
        if kid != identity.kid.hex():
            raise KeyStoreError(f"{self.dir / DEVICE_FILE} names key {kid}, the identity key "
                                f"is {identity.kid.hex()}")
        return DeviceKeys(device_id, identity, settlement)

    def init(self, device_id: str | None = None) -> tuple[DeviceKeys, dict[str, object]]:
        """Generate both keys; refuse to overwrite. Returns the keys and the provisioning
        record (signed by both new keys)."""
        if self.exists():
            raise KeyStoreError(f"keys already exist in {self.dir}; use `edge-agent keys rotate`",
                                reason="keys-exist")
        identity, settlement = IdentityKey.generate(), SettlementKey.generate()
        device_id = device_id or f"dev-{fingerprint(identity.public).replace('-', '').lower()}"
        record = provisioning_record(device_id, identity, settlement, time.time_ns())
        ops = self.ops
        partial = self.dir.with_name(self.dir.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)  # a crashed init's leftovers
        make_dir(self.dir.parent, ops=ops)
        ops.mkdir(partial, 0o700)
        ops.mkdir(partial / RECORDS_DIR, 0o700)
        self._write_keys(partial, identity, settlement, device_id, suffix="")
        create_file(partial / RECORDS_DIR / _record_name(record),
                    (record_to_json(record) + "\n").encode(), mode=0o644, ops=ops)
        ops.fsync_dir(partial / RECORDS_DIR)
        ops.fsync_dir(partial)
        try:
            ops.replace(partial, self.dir)  # onto nothing, or an empty directory
        except OSError as exc:
            raise KeyStoreError(f"{self.dir} exists and is not empty ({exc.strerror}); "
                                "move it away first") from None
        ops.fsync_dir(self.dir.parent)
        return DeviceKeys(device_id, identity, settlement), record

    def rotate(self) -> tuple[DeviceKeys, dict[str, object]]:
        """New key pair; the rotation record is signed by the old identity key. The old
        secrets are replaced only once the new ones and the record are durable."""
        old = self.load()  # also ends a rotation that crashed: no *.new left after it
        identity, settlement = IdentityKey.generate(), SettlementKey.generate()
        record = rotation_record(old.device_id, old.identity, identity, settlement, time.time_ns())
        ops = self.ops
        self._write_keys(self.dir, identity, settlement, old.device_id, suffix=NEW)
        ops.fsync_dir(self.dir)
        self._save_record(record)  # the commit point (see the class docstring)
        for name in KEY_FILES:
            ops.replace(self.dir / (name + NEW), self.dir / name)
        ops.fsync_dir(self.dir)
        return DeviceKeys(old.device_id, identity, settlement), record

    def _write_keys(self, directory: Path, identity: IdentityKey, settlement: SettlementKey,
                    device_id: str, suffix: str) -> None:
        """The three files, each fsync'd (the caller fsyncs the directory once)."""
        public = {"device": device_id, "ed25519": identity.public.hex(),
                  "kid": identity.kid.hex(), "secp256k1": settlement.public.hex(),
                  "address": "0x" + settlement.address.hex()}
        create_file(directory / (IDENTITY_FILE + suffix), identity.seed(), ops=self.ops)
        create_file(directory / (SETTLEMENT_FILE + suffix), settlement.secret(), ops=self.ops)
        create_file(directory / (DEVICE_FILE + suffix),
                    (json.dumps(public, indent=2) + "\n").encode(), mode=0o644, ops=self.ops)

    def _finish_rotation(self) -> None:
        """Forward if the record of the keys in ``*.new`` (or already in place) is on disk,
        else back (the record is written before any key file is replaced)."""
        pending = [name for name in KEY_FILES if (self.dir / (name + NEW)).exists()]
        if not pending:
            return
        identity = _public_or_none(self.dir, IDENTITY_FILE, IdentityKey)
        settlement = _public_or_none(self.dir, SETTLEMENT_FILE, SettlementKey)
        forward = any(r.get("type") == "rotate" and r.get("ed25519") == identity
                      and r.get("secp256k1") == settlement for r in self._records())
        for name in pending:
            if forward:
                self.ops.replace(self.dir / (name + NEW), self.dir / name)
            else:
                self.ops.unlink(self.dir / (name + NEW))
        self.ops.fsync_dir(self.dir)

    def _records(self) -> list[dict[str, object]]:
        records = []
        for path in sorted((self.dir / RECORDS_DIR).glob("*.json")):
            try:
                records.append(record_from_json(path.read_text()))
            except (OSError, MalformedEnvelope):
                continue  # a torn leftover is no record
        return records

    def _save_record(self, record: dict[str, object]) -> Path:
        path = self.dir / RECORDS_DIR / _record_name(record)
        make_dir(path.parent, ops=self.ops)
        write_atomic(path, (record_to_json(record) + "\n").encode(), mode=0o644, ops=self.ops)
        return path

    def latest_record(self) -> dict[str, object]:
        records = sorted((self.dir / RECORDS_DIR).glob("*.json"),
                         key=lambda p: int(p.stem.split("-")[-1]))
        if not records:
            raise KeyStoreError(f"no provisioning record in {self.dir / RECORDS_DIR}")
        return record_from_json(records[-1].read_text())


def _record_name(record: dict[str, object]) -> str:
    return f"{record['type']}-{record['created_ns']}.json"


def _public_or_none(directory: Path, name: str,
                    key: type[IdentityKey] | type[SettlementKey]) -> bytes | None:
    """The public key of ``name.new`` if it exists, else of ``name``; None if unreadable."""
    path = directory / (name + NEW)
    if not path.exists():
        path = directory / name
    try:
        return key(read_secret(path)).public
    except KeyStoreError:
        return None


# --- provisioning and rotation records --------------------------------------------------

_BYTES_FIELDS = ("ed25519", "secp256k1", "old_kid", "sig", "sig_old", "sig_secp256k1")


def _signed_body(record: dict[str, object]) -> bytes:
    body = {k: v for k, v in record.items() if not k.startswith("sig")}
    return dcbor.dumps(body)


def _secp_digest(context: bytes, body: bytes) -> bytes:
    return hashlib.sha256(context + b"/secp256k1\0" + body).digest()


def provisioning_record(device_id: str, identity: IdentityKey, settlement: SettlementKey,
                        created_ns: int) -> dict[str, object]:
    record: dict[str, object] = {
        "type": "provision", "v": 1, "device": device_id, "created_ns": created_ns,
        "ed25519": identity.public, "secp256k1": settlement.public,
    }
    body = _signed_body(record)
    record["sig"] = identity.sign(PROVISION_CONTEXT + b"\0" + body)
    record["sig_secp256k1"] = settlement.sign_digest(_secp_digest(PROVISION_CONTEXT, body))
    return record


def rotation_record(device_id: str, old: IdentityKey, identity: IdentityKey,
                    settlement: SettlementKey, created_ns: int) -> dict[str, object]:
    record: dict[str, object] = {
        "type": "rotate", "v": 1, "device": device_id, "created_ns": created_ns,
        "old_kid": old.kid, "ed25519": identity.public, "secp256k1": settlement.public,
    }
    body = _signed_body(record)
    record["sig_old"] = old.sign(ROTATE_CONTEXT + b"\0" + body)
    record["sig"] = identity.sign(ROTATE_CONTEXT + b"\0" + body)
    record["sig_secp256k1"] = settlement.sign_digest(_secp_digest(ROTATE_CONTEXT, body))
    return record


def check_record(record: dict[str, object], old_public: bytes | None = None) -> None:
    """Check a provisioning or rotation record's proofs; raise BadSignature or
    MalformedEnvelope. A rotation record also needs the old key (``old_public``)."""
    kind = record.get("type")
    expected = {"provision": {"type", "v", "device", "created_ns", "ed25519", "secp256k1",
                              "sig", "sig_secp256k1"}}
    expected["rotate"] = expected["provision"] | {"old_kid", "sig_old"}
    if kind not in expected or set(record) != expected[kind] or record.get("v") != 1:
        raise MalformedEnvelope("not a provisioning or rotation record (fields/type/version)",
                                reason="malformed-record")
    for name in _BYTES_FIELDS:
        if name in record and not isinstance(record[name], bytes):
            raise MalformedEnvelope(f"record field {name} must be bytes", reason="malformed-record")
    if not isinstance(record["device"], str) or not isinstance(record["created_ns"], int):
        raise MalformedEnvelope("record device/created_ns have wrong types",
                                reason="malformed-record")
    from agent.channel.state import eth_address, recover_signer

    context = PROVISION_CONTEXT if kind == "provision" else ROTATE_CONTEXT
    body = _signed_body(record)
    public = record["ed25519"]
    if len(public) != 32:  # type: ignore[arg-type]
        raise MalformedEnvelope("ed25519 public key must be 32 bytes", reason="malformed-record")
    verify_ed25519(public, context + b"\0" + body, record["sig"])  # type: ignore[arg-type]
    try:
        secp_address = eth_address(PublicKey(record["secp256k1"]))
    except ValueError:
        raise MalformedEnvelope("secp256k1 public key is not on the curve",
                                reason="malformed-record") from None
    signer = recover_signer(_secp_digest(context, body), record["sig_secp256k1"])  # type: ignore[arg-type]
    if signer != secp_address:
        raise BadSignature("secp256k1 proof of possession does not match the key",
                           reason="bad-pop")
    if kind == "rotate":
        if old_public is None or key_id(old_public) != record["old_kid"]:
            raise BadSignature("rotation record names a key we do not know",
                               reason="unknown-old-key")
        verify_ed25519(old_public, context + b"\0" + body, record["sig_old"])  # type: ignore[arg-type]


def record_to_json(record: dict[str, object]) -> str:
    """JSON form: bytes as lowercase hex."""
    return json.dumps({k: v.hex() if isinstance(v, bytes) else v for k, v in record.items()},
                      indent=2, sort_keys=True)


def record_from_json(text: str) -> dict[str, object]:
    try:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("not an object")
        return {k: bytes.fromhex(v) if k in _BYTES_FIELDS else v for k, v in data.items()}
    except (ValueError, TypeError) as exc:
        raise MalformedEnvelope(f"record is not valid JSON: {exc}",
                                reason="malformed-record") from None


def record_to_cbor(record: dict[str, object]) -> bytes:
    return dcbor.dumps(record)
