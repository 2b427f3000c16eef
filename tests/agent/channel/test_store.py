"""The channel store: durable appends, torn tails, corruption, compaction, and restore."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.channel.protocol import Phase
from agent.channel.records import CosignedRecord, MeterRecord, SignedRecord
from agent.channel.store import ChannelStore, compact
from agent.errors import SpoolError
from tests.agent.channel.harness import Link, Setup


def charged_link(steps: int = 20) -> Link:
    link = Link(Setup())
    link.open_and_fund()
    link.charge(steps)
    return link


def test_records_round_trip_and_restore_both_parties(tmp_path: Path) -> None:
    link = charged_link()
    with ChannelStore(tmp_path / "cs") as cs, ChannelStore(tmp_path / "ev") as ev:
        cs.append(link.cs_store)
        ev.append(link.ev_store)
    cs, ev = ChannelStore(tmp_path / "cs"), ChannelStore(tmp_path / "ev")
    assert cs.records() == link.cs_store and ev.records() == link.ev_store
    station = link.setup.station(cs.records())
    vehicle = link.setup.vehicle(ev.records())
    assert station.phase is vehicle.phase is Phase.ACTIVE
    assert station.cosigned == vehicle.cosigned == link.cs.cosigned
    assert station.last_meter == link.cs.last_meter and station.charge_milli == link.cs.charge_milli
    # A restart cannot know which reserved nonces were used: it skips the whole reservation.
    assert vehicle.highest_signed == link.ev.nonce_reserved >= link.ev.highest_signed
    assert oct(os.stat(tmp_path / "cs").st_mode & 0o777) == "0o600"


def test_torn_last_frame_is_dropped(tmp_path: Path) -> None:
    link = charged_link(3)
    path = tmp_path / "ev"
    with ChannelStore(path) as store:
        store.append(link.ev_store)
    whole = path.read_bytes()
    for cut in (1, 5, 9, 30):
        path.write_bytes(whole[:-cut])
        records = ChannelStore(path).records()
        assert records == link.ev_store[:-1]
        assert path.stat().st_size < len(whole)  # truncated after the last good frame


def test_corruption_in_the_middle_raises(tmp_path: Path) -> None:
    link = charged_link(3)
    path = tmp_path / "cs"
    with ChannelStore(path) as store:
        store.append(link.cs_store)
    data = bytearray(path.read_bytes())
    data[20] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(SpoolError) as info:
        ChannelStore(path)
    assert info.value.reason == "store-corrupt"


def test_compaction_keeps_what_restore_needs(tmp_path: Path) -> None:
    link = charged_link(400)
    kept = compact(link.ev_store)
    assert len(kept) < len(link.ev_store) / 10
    vehicle = link.setup.vehicle(kept)
    assert vehicle.cosigned == link.ev.cosigned
    # A restart cannot know which reserved nonces were used: it skips the whole reservation.
    assert vehicle.highest_signed == link.ev.nonce_reserved >= link.ev.highest_signed
    station_kept = compact(link.cs_store)
    assert sum(isinstance(r, MeterRecord) for r in station_kept) == 256
    station = link.setup.station(station_kept)
    assert station.cosigned == link.cs.cosigned and station.last_meter == link.cs.last_meter
    # The METER counter reservation survives compaction: no counter is ever reused.
    assert station.counter_floor == link.cs.reserved >= link.cs.last_meter.counter
    assert station.base == link.cs.base
    # On open, a big file is rewritten compacted, and a restart still resumes.
    path = tmp_path / "ev"
    with ChannelStore(path) as store:
        store.append(link.ev_store)
    big = path.stat().st_size
    store = ChannelStore(path, compact_bytes=1024)
    assert path.stat().st_size < big
    assert [type(r) for r in store.records()] == [type(r) for r in kept]
    assert any(isinstance(r, SignedRecord) for r in store.records())
    assert any(isinstance(r, CosignedRecord) for r in store.records())


def test_restart_resumes_the_session(tmp_path: Path) -> None:
    """Kill the vehicle after it persisted a proposal but before the PAY left: on restart it
    sends the very same signed state, and the session goes on to a clean close."""
    link = charged_link(5)
    real = link.ev.receive
    link.ev.receive = lambda data, now, wall=None: [a for a in real(data, now, wall)  # type: ignore[method-assign]
                                         if type(a).__name__ == "Persist"]
    link.charge(1)
    assert link.ev.pending is not None and link.cs.nonce == 5
    lost = link.ev.pending
    link.ev = link.setup.vehicle(list(link.ev_store))
    assert link.ev.pending == lost
    link.run("ev", link.ev.reestablish(link.now))
    assert link.cs.nonce == link.ev.nonce == 6
    link.run("ev", link.ev.close(link.now))
    assert link.cs.phase is link.ev.phase is Phase.CLOSED


def test_a_job_record_keeps_the_energy_it_settles_and_reads_older_ones() -> None:
    import cbor2

    from agent.channel.sessions import JobRecord

    job = JobRecord(state="settled", close="cooperative", nonce=8, t_ev=4200, wh=14)
    assert JobRecord.decode(cbor2.loads(job.encode())) == job
    older = cbor2.loads(job.encode())
    del older[8]   # written before the field existed
    assert JobRecord.decode(older).wh == 0
