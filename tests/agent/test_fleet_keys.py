"""The fleet registry refuses what would let a key speak for a device it should not."""

import os
import stat

import pytest

from agent.errors import RegistryRefusal
from agent.fleet_keys import FleetRegistry
from agent.keys import KeyStore


def provisioned(tmp_path, name="a", device="dev-1"):
    store = KeyStore(tmp_path / name)
    keys, record = store.init(device)
    registry = FleetRegistry()
    registry.add_record(record)
    return store, keys, record, registry


def test_a_rotation_signed_by_a_revoked_key_is_refused(tmp_path):
    store, old, _, registry = provisioned(tmp_path)
    _, rotation = store.rotate()
    registry.revoke(old.identity.kid)
    with pytest.raises(RegistryRefusal) as info:
        registry.add_record(rotation)
    assert info.value.reason == "revoked-signer" and old.identity.kid.hex() in str(info.value)
    assert len(registry.keys) == 1


def test_one_key_rotates_once(tmp_path):
    store, old, _, registry = provisioned(tmp_path)
    copy = KeyStore(tmp_path / "copy")        # a copy of the old key, taken before rotating
    copy.dir.mkdir(parents=True)
    for path in store.dir.iterdir():
        if path.is_file():
            (copy.dir / path.name).write_bytes(path.read_bytes())
            os.chmod(copy.dir / path.name, 0o600)
    _, first = store.rotate()
    registry.add_record(first)
    assert registry.add_record(first).kid == registry.current_keys("dev-1")[0].kid  # same again
    _, fork = copy.rotate()
    with pytest.raises(RegistryRefusal) as info:
        registry.add_record(fork)
    assert info.value.reason == "already-rotated"


def test_a_revoked_key_is_never_added_again(tmp_path):
    _, keys, record, registry = provisioned(tmp_path)
    registry.revoke(keys.identity.kid)
    with pytest.raises(RegistryRefusal) as info:
        registry.add_record(record)
    assert info.value.reason == "revoked-key" and "is revoked" in str(info.value)


def test_revoking_an_unknown_kid_is_refused_with_the_nearest(tmp_path):
    _, keys, _, registry = provisioned(tmp_path)
    typo = bytearray(keys.identity.kid)
    typo[-1] ^= 0x01
    with pytest.raises(RegistryRefusal) as info:
        registry.revoke(bytes(typo))
    assert info.value.reason == "unknown-kid"
    assert f"did you mean {keys.identity.kid.hex()}" in str(info.value)
    assert not registry.revoked
    assert registry.revoke(keys.identity.kid) is True
    assert registry.revoke(keys.identity.kid) is False    # already revoked: says so


def test_a_second_keys_init_for_one_device_needs_replace_and_is_recorded(tmp_path):
    _, first, _, registry = provisioned(tmp_path, "box1", "ev-0042")
    _, record = KeyStore(tmp_path / "box2").init("ev-0042")
    with pytest.raises(RegistryRefusal) as info:
        registry.add_record(record)
    assert info.value.reason == "device-exists" and "--replace" in str(info.value)
    entry = registry.add_record(record, replace=True, now_ns=123)
    assert entry.replaces == (first.identity.kid,) and entry.replaced_ns == 123
    assert [k.kid for k in registry.current_keys("ev-0042")] == [entry.kid]
    # The old key still verifies what it signed: replacing is not revoking.
    assert registry.lookup(first.identity.kid) == first.identity.public
    path = tmp_path / "fleet.toml"
    registry.save(path)
    assert FleetRegistry.load(path).keys == registry.keys


def test_the_registry_file_is_readable_by_the_service_and_keeps_its_mode(tmp_path):
    _, _, _, registry = provisioned(tmp_path)
    path = tmp_path / "fleet.toml"
    registry.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644   # public keys only
    path.chmod(0o640)
    registry.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".tmp"]


def test_a_device_whose_key_is_revoked_is_still_known_and_needs_replace(tmp_path):
    # The old box was lost and its key revoked: a new `keys init` under the same device id
    # is a re-provisioning, refused without --replace and recorded with it.
    _, first, _, registry = provisioned(tmp_path, "box1", "ev-0042")
    registry.revoke(first.identity.kid)
    _, record = KeyStore(tmp_path / "box2").init("ev-0042")
    with pytest.raises(RegistryRefusal) as info:
        registry.add_record(record)
    assert info.value.reason == "device-exists" and "is revoked" in str(info.value)
    assert len(registry.keys) == 1
    entry = registry.add_record(record, replace=True, now_ns=456)
    assert entry.replaces == (first.identity.kid,) and entry.replaced_ns == 456
    assert registry.superseded_by(first.identity.kid) == entry
    assert registry.superseded_by(entry.kid) is None
