"""Readings: whatever the type accepts can be sealed and verified (issue 16).

The rule is checked where the Reading is built: a value the envelope verifier would refuse
(a CBOR bignum, a lone surrogate, an infinite float) is refused by the constructor, so the
sealer never produces an envelope that fails verification. The property tests feed the
constructor anything (including values just outside the limits) and seal + open every
reading it accepts.
"""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent import dcbor
from agent.envelope import Sealer, open_envelope
from agent.errors import UnknownKey
from agent.keys import IdentityKey
from agent.readings import (
    CBOR_INT_MAX,
    CBOR_INT_MIN,
    MAX_TEXT_VALUE_LEN,
    Event,
    Reading,
    TimeStatus,
)

KEY = IdentityKey(bytes(range(32)))


def lookup(kid: bytes) -> bytes:
    if kid != KEY.kid:
        raise UnknownKey("unknown", kid=kid)
    return KEY.public


# Deliberately wider than what the type accepts: bignums, NaN/inf, surrogates, long text.
any_text = st.text(max_size=80) | st.text(alphabet=st.characters(min_codepoint=0xD800,
                                                                   max_codepoint=0xDFFF),
                                          min_size=1, max_size=3)
any_value = (st.integers(min_value=-(2**70), max_value=2**70) | st.floats() | any_text
             | st.binary(max_size=40) | st.booleans()
             | st.text(min_size=MAX_TEXT_VALUE_LEN - 2, max_size=MAX_TEXT_VALUE_LEN + 2))


def maybe_reading(**kw: object) -> Reading | None:
    try:
        return Reading(**kw)  # type: ignore[arg-type]
    except ValueError:
        return None


candidates = st.builds(
    maybe_reading, name=any_text, value=any_value, unit=any_text,
    ts_ns=st.integers(min_value=-5, max_value=2**65),
    time_status=st.sampled_from(list(TimeStatus)), source=any_text,
    flags=st.lists(any_text, max_size=3).map(tuple), meter=any_text)


@settings(max_examples=300, deadline=None)
@given(st.lists(candidates, min_size=1, max_size=8))
def test_every_accepted_reading_round_trips_seal_verify(batch: list[Reading | None]) -> None:
    accepted = [r for r in batch if r is not None]
    sealed = Sealer(KEY, "dev", bytes(16)).seal_readings(accepted)
    opened = open_envelope(sealed.data, lookup)  # raises if the verifier refuses anything
    assert opened.readings == tuple(accepted)


def maybe_event(**kw: object) -> Event | None:
    try:
        return Event(**kw)  # type: ignore[arg-type]
    except ValueError:
        return None


events = st.builds(maybe_event, code=any_text, message=any_text,
                   ts_ns=st.integers(min_value=-5, max_value=2**65), source=any_text,
                   details=st.lists(st.tuples(any_text, st.integers(-(2**70), 2**70) | any_text),
                                    max_size=3).map(tuple))


@settings(max_examples=200, deadline=None)
@given(st.lists(events, min_size=1, max_size=5))
def test_every_accepted_event_round_trips_seal_verify(batch: list[Event | None]) -> None:
    accepted = [e for e in batch if e is not None]
    opened = open_envelope(Sealer(KEY, "dev", bytes(16)).seal_events(accepted).data, lookup)
    assert [(e.code, e.message, e.ts_ns, e.source, dict(e.details)) for e in opened.events] == \
        [(e.code, e.message, e.ts_ns, e.source, dict(e.details)) for e in accepted]


@pytest.mark.parametrize("value", [CBOR_INT_MAX + 1, CBOR_INT_MIN - 1, math.inf, math.nan,
                                   "\ud800", 10**30])
def test_unsealable_values_are_refused_where_the_reading_is_built(value: object) -> None:
    with pytest.raises(ValueError):
        Reading("1-0:1.8.0", value, "Wh", 1)  # type: ignore[arg-type]


def test_the_edges_of_the_cbor_range_are_accepted_and_verify() -> None:
    batch = [Reading("1-0:1.8.0", CBOR_INT_MAX, "Wh", CBOR_INT_MAX),
             Reading("1-0:1.8.0", CBOR_INT_MIN, "Wh", 0)]
    assert open_envelope(Sealer(KEY, "d", bytes(16)).seal_readings(batch).data,
                         lookup).readings == tuple(batch)


def test_meter_identity_is_optional_and_encoded_only_when_set() -> None:
    plain = Reading("1-0:1.8.0", 5, "Wh", 1, source="meters")
    assert plain.to_cbor_item() == ["1-0:1.8.0", 5, "Wh", 1, "S", "meters"]
    named = Reading("1-0:1.8.0", 5, "Wh", 1, source="meters", meter="2/B23-0042")
    assert named.to_cbor_item() == ["1-0:1.8.0", 5, "Wh", 1, "S", "meters", [], "2/B23-0042"]
    flagged = Reading("1-0:1.8.0", 5, "Wh", 1, flags=("implausible",), meter="1")
    assert flagged.to_cbor_item()[6:] == [["implausible"], "1"]
    for reading in (plain, named, flagged):
        assert Reading.from_cbor_item(dcbor.loads(dcbor.dumps(reading.to_cbor_item()))) == reading


@pytest.mark.parametrize("item", [
    ["n", 1, "Wh", 1, "S", "s", []],            # empty flags as the last item: two encodings
    ["n", 1, "Wh", 1, "S", "s", [], ""],        # empty meter
    ["n", 1, "Wh", 1, "S", "s", [], 7],         # meter not text
    ["n", 1, "Wh", 1, "S", "s", [3], "1"],      # flag not text
    ["n", [1], "Wh", 1, "S", "s"],              # value of a foreign type
    ["n", 1, "Wh", 1, "S", "s", [], "1", "x"],  # too long
])
def test_non_canonical_or_foreign_reading_items_are_refused(item: list[object]) -> None:
    with pytest.raises(ValueError):
        Reading.from_cbor_item(item)
