"""Hostile input to the fleet-side decoders: chain heads / commit marks, status payloads,
logbook bundles. Random or mutated bytes raise only our own errors (or are reported)."""

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.chain_head import head_from_status
from agent.envelope import COMMIT_CONTENT_TYPE, open_head, seal_head
from agent.errors import EdgeAgentError
from agent.fleet.logbook import verify_bundle
from agent.fleet_commit import CommitFollower
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
