"""The verifier: every removal, duplication, move, edit or foreign key in a stream shows."""

import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent import dcbor
from agent.envelope import Sealer, open_envelope, seal_head
from agent.errors import MalformedEnvelope
from agent.fleet_keys import FleetRegistry
from agent.keys import IdentityKey, SettlementKey, provisioning_record
from agent.readings import Reading
from agent.verify import Verifier, verify_capture

KEY = IdentityKey(bytes(range(32)))
OTHER = IdentityKey(bytes(range(1, 33)))


def make_registry(*keys: tuple[str, IdentityKey]) -> FleetRegistry:
    registry = FleetRegistry()
    for device, key in keys:
        registry.add_record(provisioning_record(device, key, SettlementKey.generate(), 1))
    return registry


REGISTRY = make_registry(("dev-a", KEY), ("dev-b", OTHER))


def stream(n: int, key: IdentityKey = KEY, device: str = "dev-a", start: int = 0):
    sealer = Sealer(key, device, bytes(16), next_seq=start)
    return [sealer.seal_readings([Reading("Vehicle.Speed", i, "km/h", i)]) for i in range(n)]


def check(envelopes: list[bytes]):
    verifier = Verifier(REGISTRY)
    for data in envelopes:
        verifier.add(data)
    return verifier.report()


def test_clean_stream_is_ok():
    report = check([e.data for e in stream(20)])
    assert report.ok
    device = report.devices["dev-a"]
    assert (device.envelopes, device.readings, device.first_seq, device.last_seq) == (20, 20, 0, 19)


@settings(max_examples=60)
@given(st.integers(min_value=1, max_value=18))
def test_removed_envelope_is_a_gap(index):
    data = [e.data for e in stream(20)]
    del data[index]
    report = check(data)
    assert not report.ok
    assert report.devices["dev-a"].gaps == 1
    assert report.devices["dev-a"].gap_ranges == [(index, index)]


@settings(max_examples=60)
@given(st.integers(min_value=0, max_value=19), st.integers(min_value=0, max_value=20))
def test_duplicated_envelope_is_reported_and_removed(index, where):
    data = [e.data for e in stream(20)]
    data.insert(where, data[index])
    report = check(data)
    device = report.devices["dev-a"]
    assert device.duplicates == 1 and device.envelopes == 20
    # A copy arriving after the original (QoS 1 redelivery) is removed and harmless; one
    # arriving before it means the original came out of order, which fails.
    assert report.ok == (where >= index)


@settings(max_examples=60)
@given(st.integers(min_value=0, max_value=19), st.integers(min_value=0, max_value=19))
def test_moved_envelope_is_a_reorder(src, dst):
    data = [e.data for e in stream(20)]
    if src == dst or abs(src - dst) == 0:
        return
    item = data.pop(src)
    data.insert(dst, item)
    if data == [e.data for e in stream(20)]:
        return
    report = check(data)
    assert report.devices["dev-a"].reorders >= 1
    assert not report.ok


def test_first_envelope_removed_is_not_a_gap_but_capture_start():
    report = check([e.data for e in stream(5)][1:])
    assert report.ok and report.devices["dev-a"].first_seq == 1


def test_forked_chain_and_reused_seq():
    a = stream(3)
    fork = Sealer(KEY, "dev-a", bytes(16), next_seq=2, prev_hash=bytes(32)).seal_readings([])
    report = check([a[0].data, a[1].data, fork.data])
    assert report.devices["dev-a"].broken_links == 1 and not report.ok
    report = check([e.data for e in a] + [fork.data])
    assert report.devices["dev-a"].seq_reused == 1 and not report.ok


def test_declared_drop_accounts_for_the_gap():
    sealer = Sealer(KEY, "dev-a", bytes(16))
    sent = [sealer.seal_readings([Reading("Vehicle.Speed", i, "km/h", i)]) for i in range(10)]
    drop = sealer.seal_drop(3, 6, sent[6].hash, 4, 400, "spool-full")
    kept = [e.data for e in sent if not 3 <= e.seq <= 6] + [drop.data]
    report = check(kept)
    assert report.ok, report.format()
    assert report.devices["dev-a"].dropped_declared == 4
    # Without the drop envelope the same stream has a gap.
    assert check(kept[:-1]).devices["dev-a"].gaps == 4
    # A drop that lies about the last hash does not cover the gap: the link breaks.
    liar = Sealer(KEY, "dev-a", bytes(16), next_seq=11, prev_hash=drop.hash)
    bad = liar.seal_drop(3, 6, bytes(32), 4, 400, "spool-full")
    assert not check(kept[:-1] + [bad.data]).ok


def test_unknown_revoked_and_mismatched_keys():
    stranger = IdentityKey(os.urandom(32))
    report = check([e.data for e in stream(2, key=stranger)])
    assert report.failures["unknown-key"] == 2 and not report.ok
    registry = make_registry(("dev-a", KEY))
    registry.revoke(KEY.kid)
    verifier = Verifier(registry)
    verifier.add(stream(1)[0].data)
    assert verifier.report().failures["revoked-key"] == 1
    # dev-b's key signing envelopes that claim to be dev-a
    report = check([e.data for e in stream(2, key=OTHER, device="dev-a")])
    assert report.devices["dev-a"].device_mismatch == 2 and not report.ok


@settings(max_examples=100)
@given(st.data())
def test_flipped_bit_in_capture_is_reported(data):
    envelopes = stream(5)
    capture = bytearray(b"".join(e.data for e in envelopes))
    bit = data.draw(st.integers(min_value=0, max_value=len(capture) * 8 - 1))
    capture[bit // 8] ^= 1 << (bit % 8)
    report = verify_capture(bytes(capture), REGISTRY)
    assert not report.ok


def test_capture_resyncs_after_damage():
    envelopes = stream(6)
    capture = b"".join(e.data for e in envelopes[:3]) + b"\xff\x00garbage" + \
        b"".join(e.data for e in envelopes[3:])
    report = verify_capture(capture, REGISTRY)
    assert report.failures["malformed-cbor"] >= 1
    assert report.devices["dev-a"].envelopes == 6  # nothing after the damage is lost


@pytest.mark.parametrize("count", [0, 1])
def test_report_formats(count):
    report = check([e.data for e in stream(count)])
    text = report.format()
    assert "envelopes" in text and report.to_json().startswith("{")


def test_drop_range_that_overlaps_delivered_envelopes_is_not_a_gap():
    """Seqs 3..6 declared dropped, but 3 and 5 did reach the broker (sent before a crash,
    PUBACK lost): nothing is missing, nothing is a gap; the link after the range checks."""
    sealer = Sealer(KEY, "dev-a", bytes(16))
    sent = [sealer.seal_readings([Reading("Vehicle.Speed", i, "km/h", i)]) for i in range(10)]
    drop = sealer.seal_drop(3, 6, sent[6].hash, 4, 400, "spool-full")
    delivered = [e.data for e in sent if e.seq not in (4, 6)] + [drop.data]
    report = check(delivered)
    assert report.ok, report.format()
    # the envelope after the range must still link to the declared last hash
    forged = Sealer(KEY, "dev-a", bytes(16), next_seq=7, prev_hash=bytes(32)).seal_readings([])
    bad = [e.data for e in sent[:4]] + [sent[5].data, forged.data, sent[8].data, sent[9].data,
                                        drop.data]
    device = check(bad).devices["dev-a"]
    # 7 does not link to the declared hash, and 8 does not link to the forged 7
    assert device.broken_links == 2 and device.reorders == 0 and device.gaps == 0


def test_gap_beside_a_declared_drop_is_still_a_gap():
    sealer = Sealer(KEY, "dev-a", bytes(16))
    sent = [sealer.seal_readings([Reading("Vehicle.Speed", i, "km/h", i)]) for i in range(10)]
    drop = sealer.seal_drop(3, 5, sent[5].hash, 3, 300, "spool-full")
    kept = [e.data for e in sent if not 2 <= e.seq <= 6] + [drop.data]
    device = check(kept).devices["dev-a"]
    assert device.gap_ranges == [(2, 2), (6, 6)] and device.gaps == 2


# --- tightening (issue 19): specific reasons, empty unprotected header, zero envelopes ------

def _sign1(protected: dict, unprotected: dict, payload: bytes, key: IdentityKey = KEY) -> bytes:
    prot = dcbor.dumps(protected)
    sig = key.sign(dcbor.dumps(["Signature1", prot, b"", payload]))
    return dcbor.dumps(dcbor.Tag(18, [prot, unprotected, payload, sig]))


PAYLOAD = dcbor.dumps({1: "dev-a", 2: bytes(16), 3: 0, 4: bytes(32), 5: "telemetry", 6: []})


@pytest.mark.parametrize(("data", "reason"), [
    (_sign1({1: -7, 4: KEY.kid}, {}, PAYLOAD), "wrong-alg"),
    (dcbor.dumps(dcbor.Tag(98, [b"", {}, PAYLOAD, b""])), "wrong-tag"),
    (_sign1({1: -8, 4: KEY.kid}, {}, b"\xa2\x01\x00\x01\x01"), "duplicate-map-key"),
    (_sign1({1: -8, 4: KEY.kid}, {99: "unsigned"}, PAYLOAD), "unprotected-header"),
    (_sign1({1: -8}, {4: KEY.kid}, PAYLOAD), "unprotected-header"),
    (_sign1({1: -8, 4: KEY.kid, 33: 1}, {}, PAYLOAD), "protected-header"),
    (_sign1({1: -8, 4: KEY.kid}, {}, dcbor.dumps({1: "dev-a"})), "payload-schema"),
    (b"\xd2\x84\x41", "malformed-cbor"),
    # seq is a uint: CBOR true is not seq 1 (nor false seq 0)
    (_sign1({1: -8, 4: KEY.kid}, {}, dcbor.dumps(
        {1: "dev-a", 2: bytes(16), 3: True, 4: bytes(32), 5: "telemetry", 6: []})),
     "payload-schema"),
    # a drop declares envelopes before its own seq, a run of last - first + 1 of them
    (_sign1({1: -8, 4: KEY.kid}, {}, dcbor.dumps(
        {1: "dev-a", 2: bytes(16), 3: 1, 4: bytes(32), 5: "drop", 6: {
            "first": 1, "last": 9, "count": 9, "bytes": 900, "last_hash": bytes(32),
            "reason": "spool-full"}})), "drop-body"),
    (_sign1({1: -8, 4: KEY.kid}, {}, dcbor.dumps(
        {1: "dev-a", 2: bytes(16), 3: 20, 4: bytes(32), 5: "drop", 6: {
            "first": 1, "last": 9, "count": 3, "bytes": 900, "last_hash": bytes(32),
            "reason": "spool-full"}})), "drop-body"),
    # "det": {} would be a second encoding of the event without details
    (_sign1({1: -8, 4: KEY.kid}, {}, dcbor.dumps(
        {1: "dev-a", 2: bytes(16), 3: 0, 4: bytes(32), 5: "event", 6: [
            {"code": "door-open", "msg": "", "ts": 1, "src": "s", "det": {}}]})), "event-body"),
    # bstr .size 64
    (_sign1({1: -8, 4: KEY.kid}, {}, PAYLOAD)[:-66] + b"\x58\x3f" + bytes(63), "cose-structure"),
])
def test_json_report_names_the_specific_reason(data, reason):
    good = [e.data for e in stream(2)]
    report = check(good + [data])
    assert not report.ok
    assert json.loads(report.to_json())["failures"] == {reason: 1}


def test_unsigned_bytes_cannot_change_a_verdict():
    """The unprotected header is outside the signature but inside the hash that ``prev``
    links: an envelope that carries anything there is refused, so a relay cannot re-hash
    an envelope (and fake or break a chain link) without the device's key."""
    sealed = stream(1)[0]
    parts = dcbor.loads(sealed.data)
    assert isinstance(parts, dcbor.Tag)
    protected, _, payload, signature = parts.value
    padded = dcbor.dumps(dcbor.Tag(18, [protected, {"x": 1}, payload, signature]))
    with pytest.raises(MalformedEnvelope) as info:
        open_envelope(padded, REGISTRY.lookup)
    assert info.value.reason == "unprotected-header"


def test_zero_envelopes_checked_is_a_failure():
    report = verify_capture(b"", REGISTRY)
    assert not report.ok and "no envelope was checked" in report.format()
    assert json.loads(report.to_json())["ok"] is False
    assert json.loads(report.to_json())["failures"] == {"no-envelopes": 1}


# --- chain heads (issue 15.3): a truncated tail shows -------------------------------------

def test_truncated_tail_is_reported_from_the_signed_head():
    sent = stream(10)
    head = seal_head(KEY, "dev-a", 9, sent[9].hash, 1)
    report = check([e.data for e in sent[:5]] + [head])
    device = report.devices["dev-a"]
    assert not report.ok and (device.head_seq, device.last_seq, device.missing_tail) == (9, 4, 5)
    assert "device says seq 9, last seen 4" in report.format()
    # the whole stream with the same head verifies
    assert check([e.data for e in sent] + [head]).ok


def test_head_naming_another_hash_is_a_mismatch_and_forged_heads_fail():
    sent = stream(3)
    wrong = seal_head(KEY, "dev-a", 2, bytes(32), 1)
    report = check([e.data for e in sent] + [wrong])
    assert report.devices["dev-a"].head_mismatch == 1 and not report.ok
    forged = seal_head(OTHER, "dev-a", 50, bytes(32), 1)  # dev-b's key speaking for dev-a
    report = check([e.data for e in sent] + [forged])
    assert report.failures["head-device-mismatch"] == 1 and not report.ok
    stranger = seal_head(IdentityKey(os.urandom(32)), "dev-a", 50, bytes(32), 1)
    assert check([e.data for e in sent] + [stranger]).failures["head-unknown-key"] == 1
