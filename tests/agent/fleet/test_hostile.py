"""Hostile input to the fleet-side decoders: chain heads / commit marks, status payloads,
logbook bundles. Random or mutated bytes raise only our own errors (or are reported)."""

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.chain_head import head_from_status
from agent.envelope import COMMIT_CONTENT_TYPE, open_head, seal_head
from agent.errors import EdgeAgentError
from agent.fleet.logbook import verify_bundle
from agent.fleet_commit import CommitFollower, seal_commit_batch
from agent.keys import IdentityKey

KEY = IdentityKey(bytes([4]) * 32)
HEAD = seal_head(KEY, "dev-a", 41, bytes(range(32)), 7)
MARK = seal_head(KEY, "dev-a", 41, bytes(range(32)), 7, COMMIT_CONTENT_TYPE)


def lookup(kid: bytes) -> bytes:
    return KEY.public


@settings(max_examples=300)
@given(st.binary(max_size=400))
def test_random_bytes_as_a_head_raise_only_our_errors(data):
    try:
        open_head(data, lookup)
    except EdgeAgentError:
        return
    raise AssertionError("random bytes opened as a signed head")


@settings(max_examples=300)
@given(st.data())
def test_any_flipped_bit_of_a_head_or_mark_is_refused(data):
    original = data.draw(st.sampled_from([HEAD, MARK]))
    content = COMMIT_CONTENT_TYPE if original is MARK else "application/evedge-head+cbor"
    bit = data.draw(st.integers(0, len(original) * 8 - 1))
    damaged = bytearray(original)
    damaged[bit // 8] ^= 1 << (bit % 8)
    try:
        open_head(bytes(damaged), lookup, content)
    except EdgeAgentError:
        return
    raise AssertionError(f"bit {bit} flipped and the head still opened")


def test_a_head_is_not_a_mark_and_foreign_marks_are_counted():
    follower = CommitFollower("dev-a", [KEY.public])
    assert follower.check(HEAD) is None  # a device's head is not the fleet's commit mark
    assert follower.check(MARK).seq == 41
    other = CommitFollower("dev-a", [IdentityKey(bytes([5]) * 32).public])
    assert other.check(MARK) is None and other.counters["mark_refused_unknown-key"] == 1
    assert CommitFollower("dev-b", [KEY.public]).check(MARK) is None


@settings(max_examples=200)
@given(st.binary(max_size=300))
def test_status_payloads_never_raise(data):
    head = head_from_status(data)
    assert head is None or isinstance(head, bytes)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=600))
def test_random_logbook_bundles_are_reported_not_raised(data):
    report = verify_bundle(data)
    assert not report.ok and report.failures


_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.binary(max_size=40)
    | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=4),
    max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(st.fixed_dictionaries({"keys": _values, "revoked": _values, "chains": _values,
                              "anchors": _values}))
def test_structured_hostile_bundles_are_reported_not_raised(parts):
    from agent import dcbor

    bundle = dcbor.dumps({"type": "evedge-logbook", "v": 1, "vin": "X", "made_ns": 1, **parts})
    report = verify_bundle(bundle)
    assert not report.ok


# --- batched commit marks: one signature over many devices' heads -------------------------

HEADS = [(f"dev-{c}", 40 + i, bytes([i]) * 32) for i, c in enumerate("abcde")]
BATCH = dict(seal_commit_batch(KEY, HEADS, 99))


def test_a_batch_mark_gives_each_device_its_own_head_only():
    for device, seq, digest in HEADS:
        follower = CommitFollower(device, [KEY.public])
        mark = follower.check(BATCH[device])
        assert (mark.device, mark.seq, mark.hash, mark.ts_ns) == (device, seq, digest, 99)
        others = [d for d in BATCH if d != device]
        assert all(follower.check(BATCH[d]) is None for d in others)
        assert follower.counters["mark_refused_other-device"] == len(others)
    stranger = CommitFollower("dev-a", [IdentityKey(bytes([5]) * 32).public])
    assert stranger.check(BATCH["dev-a"]) is None
    assert stranger.counters["mark_refused_unknown-key"] == 1


def test_a_batch_mark_with_another_head_or_path_is_refused():
    from agent import dcbor

    root_mark, index, path, device, seq, digest = dcbor.loads(BATCH["dev-c"])
    for forged in ([root_mark, index, path, device, seq + 1, digest],   # a higher seq
                   [root_mark, index, path, device, seq, bytes(32)],    # another hash
                   [root_mark, index + 1, path, device, seq, digest],   # another leaf
                   [root_mark, index, path[:-1], device, seq, digest]):
        follower = CommitFollower("dev-c", [KEY.public])
        assert follower.check(dcbor.dumps(forged)) is None
        assert follower.counters["mark_refused_mark-path"] == 1, follower.counters


@settings(max_examples=400)
@given(st.data())
def test_mangled_batch_marks_are_counted_never_raised(data):
    original = bytearray(BATCH[data.draw(st.sampled_from(sorted(BATCH)))])
    for _ in range(data.draw(st.integers(1, 3))):
        original[data.draw(st.integers(0, len(original) - 1))] = data.draw(st.integers(0, 255))
    follower = CommitFollower("dev-a", [KEY.public])
    mark = follower.check(bytes(original))
    assert mark is None or (mark.device, mark.seq) == ("dev-a", 40)
    assert mark is not None or sum(follower.counters.values()) == 1
