"""Key store, provisioning and rotation records, fleet registry."""

import json
import stat

import pytest

from agent.errors import (
    BadSignature,
    ConfigError,
    InsecureKeyFile,
    KeyStoreError,
    MalformedEnvelope,
    RevokedKey,
    UnknownKey,
)
from agent.fleet_keys import FleetRegistry
from agent.keys import (
    IdentityKey,
    KeyStore,
    check_record,
    record_from_json,
    record_to_json,
)


def test_init_writes_0600_files_and_refuses_to_overwrite(tmp_path):
    store = KeyStore(tmp_path)
    keys, record = store.init("dev-1")
    for name in ("identity.ed25519", "settlement.secp256k1"):
        mode = stat.S_IMODE((store.dir / name).stat().st_mode)
        assert mode == 0o600
    assert stat.S_IMODE(store.dir.stat().st_mode) & 0o077 == 0
    assert store.load().identity.public == keys.identity.public
    check_record(record)
    with pytest.raises(KeyStoreError):
        store.init("dev-1")


def test_world_readable_key_is_refused_with_the_fix(tmp_path):
    store = KeyStore(tmp_path)
    store.init("dev-1")
    (store.dir / "identity.ed25519").chmod(0o644)
    with pytest.raises(InsecureKeyFile) as info:
        store.load()
    assert "chmod 600" in str(info.value)


def test_missing_key_says_what_to_do(tmp_path):
    with pytest.raises(KeyStoreError, match="keys init"):
        KeyStore(tmp_path).load()


def test_secrets_never_in_repr_or_records(tmp_path):
    store = KeyStore(tmp_path)
    keys, record = store.init("dev-1")
    secret_hex = keys.identity.seed().hex()
    settlement_hex = keys.settlement.secret().hex()
    for text in (repr(keys.identity), repr(keys.settlement), record_to_json(record),
                 (store.dir / "device.json").read_text()):
        assert secret_hex not in text and settlement_hex not in text


def test_tampered_record_fails_proof_of_possession(tmp_path):
    _, record = KeyStore(tmp_path).init("dev-1")
    for field, value in (("device", "dev-evil"), ("created_ns", 5),
                         ("ed25519", IdentityKey.generate().public)):
        forged = dict(record, **{field: value})
        with pytest.raises(BadSignature):
            check_record(forged)
    with pytest.raises(MalformedEnvelope):
        check_record({k: v for k, v in record.items() if k != "sig"})


def test_rotation_signed_by_old_key_and_registry_accepts_it(tmp_path):
    store = KeyStore(tmp_path)
    old, record = store.init("dev-1")
    registry = FleetRegistry()
    registry.add_record(record)
    new, rotation = store.rotate()
    assert new.identity.kid != old.identity.kid and store.load().identity.kid == new.identity.kid
    entry = registry.add_record(rotation)
    assert entry.rotated_from == old.identity.kid and entry.device == "dev-1"
    # Old envelopes still verify with the old key: rotation is not revocation.
    assert registry.lookup(old.identity.kid) == old.identity.public
    # A rotation the registry cannot link to a known key is refused.
    with pytest.raises(UnknownKey):
        FleetRegistry().add_record(rotation)


def test_registry_file_round_trip_and_revocation(tmp_path):
    _, record = KeyStore(tmp_path / "a").init("dev-1")
    registry = FleetRegistry()
    entry = registry.add_record(record)
    registry.revoke(entry.kid)
    path = tmp_path / "fleet.toml"
    registry.save(path)
    loaded = FleetRegistry.load(path)
    assert loaded.keys == registry.keys and loaded.revoked == {entry.kid}
    with pytest.raises(RevokedKey):
        loaded.lookup(entry.kid)
    with pytest.raises(UnknownKey):
        loaded.lookup(bytes(8))


def test_registry_errors_name_the_key(tmp_path):
    path = tmp_path / "fleet.toml"
    path.write_text('[[devices]]\nid = "d"\n[[devices.keys]]\nkid = "zz"\n')
    with pytest.raises(ConfigError, match=r"devices\[0\].keys\[0\].kid"):
        FleetRegistry.load(path)


def test_record_json_round_trip(tmp_path):
    _, record = KeyStore(tmp_path).init("dev-1")
    again = record_from_json(record_to_json(record))
    assert again == record
    check_record(again)
    with pytest.raises(MalformedEnvelope):
        record_from_json("[1, 2]")
    json.loads(record_to_json(record))
