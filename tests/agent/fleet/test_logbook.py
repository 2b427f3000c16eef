"""The mileage logbook: made from the fleet database, checked offline; an edited odometer
value, a removed envelope or a key revoked before it signed fail with the reason."""

import json

import pytest

from agent import dcbor
from agent.cli import main
from agent.envelope import Sealer
from agent.fleet import registry as fleet_registry
from agent.fleet.anchor import merkle_proof, merkle_root, record_period, root_from_proof
from agent.fleet.db import open_database
from agent.fleet.logbook import make_bundle, verify_bundle
from agent.fleet.store import store_batch
from agent.fleet_keys import FleetRegistry
from agent.keys import IdentityKey, SettlementKey, fingerprint, rotation_record
from agent.readings import Event, Reading

from .helpers import Device, register, verified

VIN = "WVWZZZ1JZXW000001"
DAY = 86_400 * 10**9
VIN_NAME, ODO = "Vehicle.VehicleIdentification.VIN", "Vehicle.TraveledDistance"


@pytest.fixture
def fleet(tmp_path):
    db = open_database(f"sqlite:///{tmp_path / 'fleet.db'}")
    car = Device("car-1")
    snap = register(db, car)
    sealed = [car.sealer.seal_readings([Reading("Vehicle.VehicleIdentification.VIN", VIN, "",
                                                DAY)])]
    for day in range(1, 6):
        sealed += car.envelopes(3, ts0=day * DAY)  # unrelated: speed
        sealed.append(car.sealer.seal_readings(
            [Reading("Vehicle.TraveledDistance", 1000.0 + 100 * day, "km", day * DAY + 10)]))
    sealed.append(car.sealer.seal_events([Event("odometer-jump", "odometer rose 900 km",
                                                6 * DAY, "obd0")]))
    sealed += car.envelopes(2, ts0=7 * DAY)
    store_batch(db, verified(snap, sealed))
    yield db, car, sealed
    db.close()


def test_logbook_verifies_and_keeps_only_what_it_needs(fleet):
    db, car, sealed = fleet
    bundle = make_bundle(db, VIN)
    report = verify_bundle(bundle)
    assert report.ok, report.format()
    assert [m.km for m in report.history] == [1100.0, 1200.0, 1300.0, 1400.0, 1500.0]
    assert report.events[0][2] == "odometer-jump"
    chain = dcbor.loads(bundle)["chains"]["car-1"]
    full = [e for e in chain if isinstance(e, bytes)]
    assert len(full) == 7  # VIN, five odometer readings, the event; speed left out
    assert sealed[1].data not in full and len(bundle) < sum(len(e.data) for e in sealed)


def edit(bundle: bytes, change) -> bytes:
    decoded = dcbor.loads(bundle)
    change(decoded)
    return dcbor.dumps(decoded)


def test_edited_odometer_value_fails(fleet):
    db, _, _ = fleet
    bundle = make_bundle(db, VIN)
    needle = dcbor.dumps(1300.0)
    assert needle in bundle
    forged = bundle.replace(needle, dcbor.dumps(1250.0))
    report = verify_bundle(forged)
    assert not report.ok and any("bad-signature" in f for f in report.failures)


def test_removed_envelope_fails(fleet):
    db, _, _ = fleet
    bundle = make_bundle(db, VIN)

    def drop_third_odometer(b):
        chain = b["chains"]["car-1"]
        index = [i for i, e in enumerate(chain) if isinstance(e, bytes)][3]
        del chain[index]

    report = verify_bundle(edit(bundle, drop_third_odometer))
    assert not report.ok and any("missing from the logbook" in f or "expected" in f
                                 for f in report.failures), report.failures


def test_key_revoked_before_it_signed_fails(fleet):
    db, car, _ = fleet
    fleet_registry.revoke(db, car.key.kid, 3 * DAY)  # stolen on day 3
    report = verify_bundle(make_bundle(db, VIN))
    assert not report.ok
    # odometer readings of days 3, 4 and 5, and the event of day 6
    assert sum("after its revocation" in f for f in report.failures) == 4
    # revoked after everything it signed: the history stands
    db2 = db
    db2.transaction(lambda d: d.execute("UPDATE revoked SET revoked_ns = ?", (100 * DAY,)))
    assert verify_bundle(make_bundle(db2, VIN)).ok


def test_anchor_proofs_are_checked(fleet):
    db, _, sealed = fleet
    hashes = [e.hash for e in sealed]
    root = record_period(db, hashes, 0, 1)
    for index in range(len(hashes)):
        assert root_from_proof(hashes[index], index, len(hashes),
                               merkle_proof(hashes, index)) == root == merkle_root(hashes)
    bundle = make_bundle(db, VIN)
    report = verify_bundle(bundle)
    # recorded, not on chain: the paths check, nothing is claimed about time
    assert report.ok and report.recorded == 7 and report.anchored == 0
    assert "7 envelope(s) in Merkle roots not on chain (yet)" in report.format()

    def bend(b):
        b["anchors"][0]["root"] = bytes(32)

    assert not verify_bundle(edit(bundle, bend)).ok


def test_cli_writes_and_verifies_the_logbook(fleet, tmp_path, capsys):
    db, car, _ = fleet
    out, reg = tmp_path / "car.logbook", tmp_path / "fleet.toml"
    trusted_registry(car).save(reg)
    assert main(["fleet", "logbook", VIN, "--db", db.url, "--out", str(out)]) == 0
    assert main(["verify", "--logbook", str(out), "--registry", str(reg)]) == 0
    text = capsys.readouterr().out
    assert "1500.0 km" in text and "logbook verifies" in text
    out.write_bytes(out.read_bytes().replace(dcbor.dumps(1500.0), dcbor.dumps(1490.0)))
    assert main(["verify", "--logbook", str(out), "--registry", str(reg)]) == 1
    assert main(["fleet", "logbook", "NOPE", "--db", db.url, "--out", str(out)]) == 1


# --------------------------------------------------------------------------- forgeries


def trusted_registry(*devices: Device) -> FleetRegistry:
    registry = FleetRegistry()
    for device in devices:
        registry.add_record(device.record)
    return registry


def codes(report) -> set[str]:
    return set(report.to_dict()["reasons"])


def test_edited_vin_fails(fleet):
    db, _, _ = fleet
    bundle = make_bundle(db, VIN)

    def other_vin(b):
        b["vin"] = "WVWZZZ1JZXW999999"

    report = verify_bundle(edit(bundle, other_vin))
    assert not report.ok and "vin-mismatch" in codes(report), report.failures
    assert any("WVWZZZ1JZXW999999" in f and VIN in f for f in report.failures)


def test_chain_without_a_signed_vin_fails(fleet):
    db, _, sealed = fleet
    bundle = make_bundle(db, VIN)

    def hide_vin(b):  # the VIN envelope folded into a left-out run: the links still check
        chain = b["chains"]["car-1"]
        assert chain[0] == sealed[0].data
        chain[0] = [0, 0, sealed[0].hash]

    report = verify_bundle(edit(bundle, hide_vin))
    assert not report.ok and "vin-not-signed" in codes(report), report.failures


def test_another_vehicles_chain_fails(tmp_path, fleet):
    db, _, _ = fleet
    other_db = open_database(f"sqlite:///{tmp_path / 'other.db'}")
    other = Device("car-2", seed=2)
    snap = register(other_db, other)
    store_batch(other_db, verified(snap, [
        other.sealer.seal_readings([Reading(VIN_NAME, "WVWZZZ1JZXW000002", "", DAY)]),
        other.sealer.seal_readings([Reading(ODO, 5.0, "km", DAY + 1)])]))
    stranger = dcbor.loads(make_bundle(other_db, "WVWZZZ1JZXW000002"))
    other_db.close()

    def splice(b):
        b["chains"]["car-2"] = stranger["chains"]["car-2"]
        b["keys"] += stranger["keys"]

    report = verify_bundle(edit(make_bundle(db, VIN), splice))
    assert not report.ok and codes(report) >= {"vin-mismatch", "vin-not-signed"}, \
        report.failures


def test_key_revoked_in_the_registry_file_fails(fleet):
    db, car, _ = fleet
    bundle = make_bundle(db, VIN)
    trusted = trusted_registry(car)
    assert verify_bundle(bundle, trusted).ok
    trusted.revoke(car.key.kid)  # a file's revocation has no time: refused for everything
    report = verify_bundle(bundle, trusted)
    assert not report.ok and "revoked-key" in codes(report), report.failures


def forged_bundle(tmp_path, device: str = "car-9") -> bytes:
    """A made-up device with its own self-signed provisioning record."""
    forger_db = open_database(f"sqlite:///{tmp_path / (device + '.db')}")
    forger = Device(device, seed=9)
    snap = register(forger_db, forger)
    store_batch(forger_db, verified(snap, [
        forger.sealer.seal_readings([Reading(VIN_NAME, VIN, "", DAY)]),
        forger.sealer.seal_readings([Reading(ODO, 900.0, "km", DAY + 1)])]))
    bundle = make_bundle(forger_db, VIN)
    forger_db.close()
    return bundle


def test_forged_bundle_fails_against_the_registry(tmp_path, fleet):
    _, car, _ = fleet
    forged = forged_bundle(tmp_path)
    report = verify_bundle(forged, trusted_registry(car), registry_name="fleet.toml")
    assert not report.ok and "untrusted-key" in codes(report), report.failures
    assert any("is not in the registry fleet.toml" in f for f in report.failures)
    # an impostor under the device id the registry knows fails too
    assert not verify_bundle(forged_bundle(tmp_path, "car-1"), trusted_registry(car)).ok
    # without a registry it verifies, and says plainly what was trusted
    alone = verify_bundle(forged)
    assert alone.ok, alone.failures
    text = alone.format()
    assert "not checked against a registry" in text
    assert fingerprint(Device("car-9", seed=9).key.public) in text
    trust = alone.to_dict()["trust"]
    assert trust["registry"] is None and trust["keys_from"] == "bundle"
    assert [k["fingerprint"] for k in trust["keys"]] == [fingerprint(
        Device("car-9", seed=9).key.public)]


def test_rotated_key_is_reached_from_the_registry(tmp_path):
    db = open_database(f"sqlite:///{tmp_path / 'fleet.db'}")
    car = Device("car-1")
    snap = register(db, car)
    sealed = [car.sealer.seal_readings([Reading(VIN_NAME, VIN, "", DAY)]),
              car.sealer.seal_readings([Reading(ODO, 10.0, "km", DAY + 1)])]
    new_key, new_secp = IdentityKey(bytes([5]) * 32), SettlementKey(bytes([5]) * 31 + b"\x01")
    fleet_registry.add_record(db, rotation_record("car-1", car.key, new_key, new_secp, 2))
    snap = fleet_registry.load(db)
    sealer = Sealer(new_key, "car-1", bytes(16), car.sealer.next_seq, car.sealer.head)
    sealed.append(sealer.seal_readings([Reading(ODO, 20.0, "km", 2 * DAY)]))
    store_batch(db, verified(snap, sealed))
    bundle = make_bundle(db, VIN)
    db.close()
    report = verify_bundle(bundle, trusted_registry(car))
    assert report.ok, report.failures
    assert [m.km for m in report.history] == [10.0, 20.0]


def swap_fleet(tmp_path, km: float):
    """car-1 (the fixture's history up to 1500 km) replaced by car-2 in the same vehicle."""
    db = open_database(f"sqlite:///{tmp_path / 'swap.db'}")
    car, box = Device("car-1"), Device("car-2", seed=2)
    snap = register(db, car, box)
    first = [car.sealer.seal_readings([Reading(VIN_NAME, VIN, "", DAY)])]
    first += [car.sealer.seal_readings([Reading(ODO, 1000.0 + 100 * d, "km", d * DAY)])
              for d in range(1, 6)]
    second = [box.sealer.seal_readings([Reading(VIN_NAME, VIN, "", 6 * DAY)]),
              box.sealer.seal_readings([Reading(ODO, km, "km", 6 * DAY + 1)])]
    store_batch(db, verified(snap, first + second))
    bundle = make_bundle(db, VIN)
    db.close()
    return bundle, car, box


def test_odometer_rollback_across_a_device_swap_fails(tmp_path):
    bundle, car, box = swap_fleet(tmp_path, 600.0)
    report = verify_bundle(bundle, trusted_registry(car, box))
    assert not report.ok and "odometer-rollback" in codes(report), report.failures
    assert any("car-1" in f and "car-2" in f and "1500.0" in f for f in report.failures)


def test_device_swap_without_rollback_verifies(tmp_path):
    bundle, car, box = swap_fleet(tmp_path, 1600.0)
    report = verify_bundle(bundle, trusted_registry(car, box))
    assert report.ok, report.failures
    assert [m.km for m in report.history][-2:] == [1500.0, 1600.0]


def test_empty_bundles_fail_with_a_reason(fleet, tmp_path):
    db, _, _ = fleet
    bundle = make_bundle(db, VIN)

    def no_chains(b):
        b["chains"] = {}

    def no_envelopes(b):
        b["chains"]["car-1"] = []

    for change, code in ((no_chains, "no-chains"), (no_envelopes, "no-envelopes")):
        report = verify_bundle(edit(bundle, change))
        assert not report.ok and report.failures and code in codes(report), report.failures
        assert "FAIL " in report.format()
    # a VIN and no odometer reading is not a mileage logbook
    only_vin = open_database(f"sqlite:///{tmp_path / 'vin.db'}")
    car = Device("car-1")
    snap = register(only_vin, car)
    store_batch(only_vin, verified(snap, [
        car.sealer.seal_readings([Reading(VIN_NAME, VIN, "", DAY)])]))
    report = verify_bundle(make_bundle(only_vin, VIN))
    only_vin.close()
    assert not report.ok and "no-odometer" in codes(report), report.failures


def test_invalid_left_out_runs_are_refused(fleet):
    db, _, sealed = fleet
    bundle = make_bundle(db, VIN)
    for run in ([-5, -5, sealed[0].hash], [3, 1, sealed[0].hash], [True, 2, None]):
        def bad_run(b, run=run):
            b["chains"]["car-1"].insert(0, run)

        report = verify_bundle(edit(bundle, bad_run))
        assert not report.ok, run
        assert not any("-6" in f or "..-" in f for f in report.failures), report.failures
        assert any("left-out run" in f for f in report.failures), report.failures


def test_a_bad_envelope_is_named_by_its_own_seq(fleet):
    db, _, _ = fleet
    bundle = make_bundle(db, VIN)
    # 1300.0 km is the odometer reading at seq 12
    report = verify_bundle(bundle.replace(dcbor.dumps(1300.0), dcbor.dumps(1250.0)))
    assert any("seq 12" in f and "bad-signature" in f for f in report.failures), \
        report.failures
    assert not any("after seq 11" in f for f in report.failures)

    def edit_first(b):  # the VIN envelope, seq 0, the first of the chain
        chain = b["chains"]["car-1"]
        chain[0] = chain[0].replace(dcbor.dumps(VIN), dcbor.dumps("WVWZZZ1JZXW000009"))

    report = verify_bundle(edit(bundle, edit_first))
    assert any("seq 0" in f for f in report.failures), report.failures
    assert not any("seq -1" in f for f in report.failures), report.failures


def test_cli_json_carries_vin_history_and_reasons(fleet, tmp_path, capsys):
    db, car, _ = fleet
    out, reg = tmp_path / "car.logbook", tmp_path / "fleet.toml"
    trusted_registry(car).save(reg)
    assert main(["fleet", "logbook", VIN, "--db", db.url, "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["verify", "--logbook", str(out), "--registry", str(reg), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] and doc["vin"] == VIN and doc["reasons"] == {}
    assert [m["km"] for m in doc["mileage"]] == [1100.0, 1200.0, 1300.0, 1400.0, 1500.0]
    assert doc["mileage"][0]["device"] == "car-1" and doc["mileage"][0]["seq"] == 4
    assert doc["trust"]["keys_from"] == "registry" and doc["trust"]["registry"] == str(reg)
    out.write_bytes(out.read_bytes().replace(dcbor.dumps(1500.0), dcbor.dumps(1490.0)))
    assert main(["verify", "--logbook", str(out), "--registry", str(reg), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert not doc["ok"] and doc["reasons"] == {"bad-signature": 1} and doc["failures"]
    # a registry file named that does not exist is an error, not a silent bundle-only check
    assert main(["verify", "--logbook", str(out), "--registry", str(tmp_path / "none")]) == 2


def test_cli_refuses_to_write_a_logbook_that_does_not_verify(tmp_path, capsys):
    db = open_database(f"sqlite:///{tmp_path / 'vin.db'}")
    car = Device("car-1")
    snap = register(db, car)
    store_batch(db, verified(snap, [car.sealer.seal_readings([Reading(VIN_NAME, VIN, "",
                                                                      DAY)])]))
    out = tmp_path / "car.logbook"
    assert main(["fleet", "logbook", VIN, "--db", db.url, "--out", str(out)]) == 1
    db.close()
    assert not out.exists()
    assert "odometer" in capsys.readouterr().out
