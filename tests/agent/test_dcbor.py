"""Deterministic CBOR: round trips, one encoding per value, a distinct error per deviation."""

import math
import struct

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent import dcbor
from agent.errors import (
    DecodeError,
    DuplicateMapKey,
    MalformedCBOR,
    NonDeterministicCBOR,
    OversizeInput,
)

scalars = (st.integers(min_value=-(2**64), max_value=2**64 - 1) | st.binary(max_size=40)
           | st.text(max_size=40) | st.booleans() | st.none()
           | st.floats(allow_nan=False, allow_infinity=True))
# Maps use keys of one major type, the rule every map in the project follows.
values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.integers(min_value=0, max_value=2**32), children, max_size=5)
    | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=20,
)


@given(values)
def test_round_trip_and_unique_encoding(value):
    encoded = dcbor.dumps(value)
    decoded = dcbor.loads(encoded)
    assert decoded == value or (isinstance(value, float) and math.isnan(value))
    # Re-encoding what we decoded gives the same bytes: one encoding per value.
    assert dcbor.dumps(decoded) == encoded


@pytest.mark.parametrize("hexdata,error", [
    ("1817", NonDeterministicCBOR),            # 23 in a two-byte head
    ("190017", NonDeterministicCBOR),          # 23 in a three-byte head
    ("5f4101ff", NonDeterministicCBOR),        # indefinite byte string
    ("9f01ff", NonDeterministicCBOR),          # indefinite array
    ("a2020101 03", NonDeterministicCBOR),     # keys 2, 1: not sorted
    ("a20101 0102", DuplicateMapKey),          # key 1 twice
    ("fa3fc00000", NonDeterministicCBOR),      # 1.5 as float32 fits float16
    ("fb3ff8000000000000", NonDeterministicCBOR),  # 1.5 as float64
    ("f97e01", NonDeterministicCBOR),          # a NaN with payload
    ("0102", MalformedCBOR),                   # trailing bytes
    ("1a0000", MalformedCBOR),                 # truncated head
    ("62c328", MalformedCBOR),                 # invalid UTF-8
    ("1c", MalformedCBOR),                     # reserved additional info
    ("ff", MalformedCBOR),                     # break outside indefinite
    ("f0", MalformedCBOR),                     # unassigned simple value
    ("a1810101", MalformedCBOR),               # array as a map key
])
def test_each_deviation_has_its_error(hexdata, error):
    with pytest.raises(error):
        dcbor.loads(bytes.fromhex(hexdata.replace(" ", "")))


def test_rfc8949_bytewise_key_order_not_length_first():
    # RFC 8949 s4.2.1 orders keys by their encoded bytes: 24 (0x1818) before -1 (0x20).
    # RFC 7049 length-first order (what cbor2 canonical does) would put -1 first.
    assert dcbor.loads(bytes.fromhex("a2181801 2002")) == {24: 1, -1: 2}
    with pytest.raises(NonDeterministicCBOR):
        dcbor.loads(bytes.fromhex("a2200218 1801".replace(" ", "")))


def test_limits():
    deep = b"\x81" * 40 + b"\x00"
    with pytest.raises(OversizeInput):
        dcbor.loads(deep)
    with pytest.raises(OversizeInput):
        dcbor.loads(dcbor.dumps(b"x" * 100), max_bytes=50)
    # A huge declared length must not allocate or hang: it is just truncated input.
    with pytest.raises((MalformedCBOR, OversizeInput)):
        dcbor.loads(b"\x9b" + (2**63).to_bytes(8, "big"))
    with pytest.raises(OversizeInput):
        dcbor.loads(dcbor.dumps(list(range(50))), max_items=10)


def test_cbor2_lenient_encodings_are_rejected():
    # cbor2 itself happily emits a float64 for 1.0 and accepts duplicate keys.
    assert cbor2.loads(bytes.fromhex("a201010102")) == {1: 2}
    with pytest.raises(DuplicateMapKey):
        dcbor.loads(bytes.fromhex("a201010102"))
    with pytest.raises(NonDeterministicCBOR):
        dcbor.loads(b"\xfb" + struct.pack(">d", 1.0))


@settings(max_examples=3000)
@given(st.binary(max_size=64))
def test_random_bytes_raise_only_our_errors(data):
    try:
        dcbor.loads(data)
    except DecodeError:
        pass


# Anything, including what breaks the project's rules: mixed key types, bignums, sets.
anything = st.recursive(
    st.integers() | st.binary(max_size=8) | st.text(max_size=8) | st.booleans() | st.none()
    | st.floats(allow_nan=False) | st.frozensets(st.integers(), max_size=3),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.integers() | st.text(max_size=4) | st.binary(max_size=4), children,
                      max_size=4),
    max_leaves=12,
)


@given(anything)
@settings(max_examples=300)
def test_dumps_never_produces_what_loads_refuses(value):
    """dumps enforces its own rule: it either refuses the value (ValueError) or produces
    bytes that the strict decoder accepts and gives back unchanged."""
    try:
        encoded = dcbor.dumps(value)
    except ValueError:
        return
    assert dcbor.loads(encoded) == value


@pytest.mark.parametrize("value", [
    {1: "a", "b": 2},            # keys of two major types: cbor2's order is not RFC 8949's
    {-1: 0, 24: 1},              # negative and unsigned keys: the same trap
    2**64,                       # a bignum tag, which loads returns as a Tag
    [-(2**64) - 1],
    {frozenset(): 1},
    {1, 2},
])
def test_dumps_refuses_values_outside_the_rule(value):
    with pytest.raises(ValueError):
        dcbor.dumps(value)
