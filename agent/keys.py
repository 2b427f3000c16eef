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
import stat
import time
from dataclasses import dataclass
from pathlib import Path

import nacl.exceptions
import nacl.signing
from coincurve import PrivateKey, PublicKey

from agent import dcbor
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

def _write_secret(path: Path, secret: bytes) -> None:
    """Create ``path`` mode 0600 from the start (never world-readable, not even briefly)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, secret)
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_secret(path: Path) -> bytes:
    try:
        info = path.stat()
    except FileNotFoundError:
        raise KeyStoreError(f"no key file {path}: run `edge-agent keys init` first",
                            reason="missing-key") from None
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


class KeyStore:
    """The key directory ``<state_dir>/keys``: secrets, the device file, issued records."""

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.dir = Path(state_dir) / "keys"

    def exists(self) -> bool:
        return (self.dir / IDENTITY_FILE).exists()

    def load(self) -> DeviceKeys:
        identity = IdentityKey(_read_secret(self.dir / IDENTITY_FILE))
        settlement = SettlementKey(_read_secret(self.dir / SETTLEMENT_FILE))
        try:
            device = json.loads((self.dir / DEVICE_FILE).read_text())
            device_id = device["device"]
        except (OSError, ValueError, KeyError, TypeError):
            raise KeyStoreError(f"{self.dir / DEVICE_FILE} is missing or damaged") from None
        return DeviceKeys(device_id, identity, settlement)

    def init(self, device_id: str | None = None) -> tuple[DeviceKeys, dict[str, object]]:
        """Generate both keys; refuse to overwrite. Returns the keys and the provisioning
        record (signed by both new keys)."""
        if self.exists():
            raise KeyStoreError(f"keys already exist in {self.dir}; use `edge-agent keys rotate`",
                                reason="keys-exist")
        identity, settlement = IdentityKey.generate(), SettlementKey.generate()
        device_id = device_id or f"dev-{fingerprint(identity.public).replace('-', '').lower()}"
        self._store(identity, settlement, device_id, suffix="")
        record = provisioning_record(device_id, identity, settlement, time.time_ns())
        self._save_record(record)
        return DeviceKeys(device_id, identity, settlement), record

    def rotate(self) -> tuple[DeviceKeys, dict[str, object]]:
        """New key pair; the rotation record is signed by the old identity key. The old
        secrets are deleted once the new ones are durable."""
        old = self.load()
        identity, settlement = IdentityKey.generate(), SettlementKey.generate()
        record = rotation_record(old.device_id, old.identity, identity, settlement, time.time_ns())
        self._store(identity, settlement, old.device_id, suffix=".new")
        for name in (IDENTITY_FILE, SETTLEMENT_FILE, DEVICE_FILE):
            os.replace(self.dir / (name + ".new"), self.dir / name)
        _fsync_dir(self.dir)
        self._save_record(record)
        return DeviceKeys(old.device_id, identity, settlement), record

    def _store(self, identity: IdentityKey, settlement: SettlementKey, device_id: str,
               suffix: str) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if suffix:  # leftovers of a rotation that crashed before its os.replace
            for name in (IDENTITY_FILE, SETTLEMENT_FILE, DEVICE_FILE):
                (self.dir / (name + suffix)).unlink(missing_ok=True)
        _write_secret(self.dir / (IDENTITY_FILE + suffix), identity.seed())
        _write_secret(self.dir / (SETTLEMENT_FILE + suffix), settlement.secret())
        public = {"device": device_id, "ed25519": identity.public.hex(),
                  "kid": identity.kid.hex(), "secp256k1": settlement.public.hex(),
                  "address": "0x" + settlement.address.hex()}
        (self.dir / (DEVICE_FILE + suffix)).write_text(json.dumps(public, indent=2) + "\n")
        _fsync_dir(self.dir)

    def _save_record(self, record: dict[str, object]) -> Path:
        records = self.dir / RECORDS_DIR
        records.mkdir(exist_ok=True)
        path = records / f"{record['type']}-{record['created_ns']}.json"
        path.write_text(record_to_json(record) + "\n")
        return path

    def latest_record(self) -> dict[str, object]:
        records = sorted((self.dir / RECORDS_DIR).glob("*.json"),
                         key=lambda p: int(p.stem.split("-")[-1]))
        if not records:
            raise KeyStoreError(f"no provisioning record in {self.dir / RECORDS_DIR}")
        return record_from_json(records[-1].read_text())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
        secp_address = eth_address(PublicKey(record["secp256k1"]))  # type: ignore[arg-type]
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
