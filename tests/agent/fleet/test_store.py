"""store_batch: one transaction per batch, duplicates idempotent, forks and broken links
found, the head moved over what the database holds (late arrivals close gaps)."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.envelope import Sealer
from agent.fleet import queries
from agent.fleet.chain import ChainRow, missing, walk
from agent.fleet.db import open_database
from agent.fleet.store import store_batch
from agent.readings import Reading

from .helpers import Device, register, verified


@pytest.fixture
def db(tmp_path):
    database = open_database(f"sqlite:///{tmp_path / 'fleet.db'}")
    yield database
    database.close()


def head(db, device):
    return db.query("SELECT head_seq FROM devices WHERE device = ?", (device,))[0][0]


def test_batch_is_stored_with_readings_and_the_head_moves(db):
    car = Device("car-1")
    snap = register(db, car)
    result = store_batch(db, verified(snap, car.envelopes(10)))
    assert result.counters["stored"] == 10 and result.heads["car-1"][0] == 9
    assert db.query("SELECT COUNT(*) FROM readings")[0][0] == 10
    raw = db.query("SELECT raw FROM envelopes WHERE seq = 3")[0][0]
    assert snap.open(bytes(raw)).seq == 3  # raw bytes kept: re-verifiable


def test_duplicates_are_idempotent_and_a_fork_raises_an_alarm(db):
    car = Device("car-1")
    snap = register(db, car)
    sent = car.envelopes(5)
    store_batch(db, verified(snap, sent))
    again = store_batch(db, verified(snap, sent[2:4]))
    assert again.counters["duplicates"] == 2 and again.counters["stored"] == 0
    assert "car-1" in again.behind_head
    fork = Sealer(car.key, "car-1", bytes(16), next_seq=3, prev_hash=sent[2].hash)
    other = fork.seal_readings([Reading("Vehicle.Speed", 999, "km/h", 5)])
    result = store_batch(db, verified(snap, [other]))
    assert result.counters["forks"] == 1
    alarm = db.query("SELECT kind, seq, raw FROM alarms")
    assert alarm[0][0] == "fork" and alarm[0][1] == 3 and bytes(alarm[0][2]) == other.data
    assert db.query("SELECT COUNT(*) FROM envelopes")[0][0] == 5


def test_late_arrival_closes_the_gap(db):
    car = Device("car-1")
    snap = register(db, car)
    sent = car.envelopes(10)
    store_batch(db, verified(snap, sent[:3] + sent[6:]))
    assert head(db, "car-1") == 2
    assert queries.gaps(db) == [("car-1", 3, 5)]
    store_batch(db, verified(snap, sent[3:6]))  # the late replay (another worker, say)
    assert head(db, "car-1") == 9 and queries.gaps(db) == []


def test_declared_drop_covers_the_range_and_first_envelopes_missing_is_a_gap(db):
    car = Device("car-1")
    snap = register(db, car)
    sent = car.envelopes(8)
    drop = car.sealer.seal_drop(2, 5, sent[5].hash, 4, 400, "spool-full")
    store_batch(db, verified(snap, sent[:2] + sent[6:] + [drop]))
    assert head(db, "car-1") == 8 and queries.gaps(db) == []
    # a provisioned device starts at seq 0: losing its first envelopes is a gap
    van = Device("van-1", seed=2)
    snap = register(db, van)
    store_batch(db, verified(snap, van.envelopes(4)[2:]))
    assert head(db, "van-1") == -1 and queries.gaps(db) == [("van-1", 0, 1)]


def test_broken_link_is_an_alarm(db):
    car = Device("car-1")
    snap = register(db, car)
    sent = car.envelopes(3)
    liar = Sealer(car.key, "car-1", bytes(16), next_seq=3, prev_hash=bytes(32))
    store_batch(db, verified(snap, sent + [liar.seal_readings([])]))
    assert db.query("SELECT kind, seq FROM alarms") == [("broken-link", 3)]


def test_reading_with_fields_beyond_the_core_is_stored_in_extra(db):
    car = Device("car-1")
    snap = register(db, car)
    flagged = car.sealer.seal_readings([Reading("Vehicle.Speed", 1, "km/h", 1,
                                                flags=("implausible",))])
    store_batch(db, verified(snap, [flagged]))
    assert db.query("SELECT extra FROM readings") == [('{"flags": ["implausible"]}',)]


@settings(max_examples=80, deadline=None)
@given(st.permutations(list(range(12))), st.sets(st.integers(0, 11), max_size=4))
def test_walk_reaches_the_top_in_any_arrival_order(order, lost):
    """Rows fed in any order and in any split reach the same head as in order."""
    sealer = Sealer(Device("x").key, "x", bytes(16))
    sent = [sealer.seal_readings([]) for _ in range(12)]
    rows = {e.seq: ChainRow(e.seq, e.prev, e.hash) for e in sent if e.seq not in lost}
    seq, digest = -1, bytes(32)
    for index in order:
        if index in rows:
            moved = walk(seq, digest, [r for s, r in rows.items() if s > seq])
            assert not moved.broken
            seq, digest = moved.seq, moved.hash
    assert seq == (min(lost) - 1 if lost else 11)
    top = max(rows, default=-1)
    assert missing(-1, sorted(rows), []) == _ranges(sorted(s for s in lost if s < top))


def _ranges(values):
    out = []
    for v in values:
        if out and out[-1][1] == v - 1:
            out[-1] = (out[-1][0], v)
        else:
            out.append((v, v))
    return out


def test_envelopes_of_a_key_registered_later_are_stored_by_reverify(db):
    from agent.fleet import registry
    from agent.fleet.store import Rejection, reverify_rejected

    car, late = Device("car-1"), Device("late-1", seed=5)
    register(db, car)
    sent = late.envelopes(3)
    store_batch(db, [], [Rejection("t", e.data, "unknown-key", "not registered", 1)
                         for e in sent] + [Rejection("t", b"junk", "malformed-cbor", "", 1)])
    assert reverify_rejected(db, registry.load(db)) == (0, 4)
    snap = register(db, late)
    assert reverify_rejected(db, snap) == (3, 1)
    assert head(db, "late-1") == 2 and db.query("SELECT reason FROM rejected") == \
        [("malformed-cbor",)]


def test_a_revocation_only_moves_earlier(db):
    from agent.fleet import registry as fleet_registry

    car = Device("car-r")
    register(db, car)
    assert fleet_registry.revoke(db, car.key.kid, 5_000) == (5_000, True)
    assert fleet_registry.revoke(db, car.key.kid, 9_000) == (5_000, False)   # never narrows
    assert fleet_registry.revoke(db, car.key.kid, 2_000) == (2_000, True)    # stolen earlier
    assert fleet_registry.load(db).revoked_ns[car.key.kid] == 2_000


def test_a_record_given_after_an_import_is_kept(db, tmp_path):
    from agent.fleet import registry as fleet_registry
    from agent.fleet_keys import FleetRegistry

    car = Device("car-i")
    toml = FleetRegistry()
    toml.add_record(car.record)
    toml.save(tmp_path / "fleet.toml")
    assert fleet_registry.import_toml(db, tmp_path / "fleet.toml") == (1, 0)
    assert car.key.kid not in fleet_registry.load(db).records   # a fleet.toml has none
    fleet_registry.add_record(db, car.record)
    assert car.key.kid in fleet_registry.load(db).records       # a logbook can carry it now
