"""The mileage logbook: made from the fleet database, checked offline; an edited odometer
value, a removed envelope or a key revoked before it signed fail with the reason."""

import pytest

from agent import dcbor
from agent.cli import main
from agent.fleet import registry as fleet_registry
from agent.fleet.anchor import merkle_proof, merkle_root, record_period, root_from_proof
from agent.fleet.db import open_database
from agent.fleet.logbook import make_bundle, verify_bundle
from agent.fleet.store import store_batch
from agent.readings import Event, Reading

from .helpers import Device, register, verified

VIN = "WVWZZZ1JZXW000001"
DAY = 86_400 * 10**9


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
    db, _, _ = fleet
    out = tmp_path / "car.logbook"
    assert main(["fleet", "logbook", VIN, "--db", db.url, "--out", str(out)]) == 0
    assert main(["verify", "--logbook", str(out), "--registry", str(tmp_path / "none")]) == 0
    text = capsys.readouterr().out
    assert "1500.0 km" in text and "logbook verifies" in text
    out.write_bytes(out.read_bytes().replace(dcbor.dumps(1500.0), dcbor.dumps(1490.0)))
    assert main(["verify", "--logbook", str(out), "--registry", str(tmp_path / "none")]) == 1
    assert main(["fleet", "logbook", "NOPE", "--db", db.url, "--out", str(out)]) == 1
