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
    # the strict decoder itself: this property is what makes loads' fast path exact
    assert dcbor.strict_loads(encoded) == value


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


# ----------------------------------------------------------------------------- fast path
# dcbor.loads tries cbor2's C decoder first and keeps its result only when dumps gives the
# input back; these tests prove it equal to the strict decoder, which decides otherwise.

def _shape(value):
    """A comparable form that keeps types (1 vs True vs 1.0) and treats NaN as equal."""
    if isinstance(value, float):
        return ("float", "nan" if math.isnan(value) else struct.pack(">d", value))
    if isinstance(value, list):
        return ("list", [_shape(v) for v in value])
    if isinstance(value, dict):
        return ("map", [(_shape(k), _shape(v)) for k, v in value.items()])
    if isinstance(value, dcbor.Tag):
        return ("tag", value.tag, _shape(value.value))
    return (type(value).__name__, value)


def _outcome(decode, data):
    try:
        return ("ok", _shape(decode(data)))
    except DecodeError as exc:
        return ("error", type(exc).__name__, exc.reason)


wide_scalars = (st.integers(min_value=-(2**64), max_value=2**64 - 1)
                | st.sampled_from([0, 23, 24, 255, 256, 65535, 65536, 2**32 - 1, 2**32,
                                   2**64 - 1, -(2**64), -1, -24, -25])
                | st.binary(max_size=40) | st.text(max_size=40) | st.booleans() | st.none()
                | st.floats(width=16) | st.floats(width=32) | st.floats()
                | st.sampled_from([float("nan"), -0.0, 5e-324, 6e-08, 65504.0, 1e300]))
wide_values = st.recursive(
    wide_scalars,
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.integers(min_value=-(2**64), max_value=2**64 - 1), children,
                      max_size=5)
    | st.dictionaries(st.text(max_size=10) | st.binary(max_size=4), children, max_size=5)
    | st.builds(dcbor.Tag, st.integers(min_value=0, max_value=2**64 - 1), children),
    max_leaves=25,
)


def _cbor2(value):
    """The value with our Tag as cbor2's, for encoding with cbor2 directly."""
    if isinstance(value, list):
        return [_cbor2(v) for v in value]
    if isinstance(value, dict):
        return {k: _cbor2(v) for k, v in value.items()}
    if isinstance(value, dcbor.Tag):
        return cbor2.CBORTag(value.tag, _cbor2(value.value))
    return value


def _valid(value):
    try:
        return dcbor.dumps(value)
    except ValueError:  # mixed key types, the rule of dumps: cbor2's canonical order
        return cbor2.dumps(_cbor2(value), canonical=True)


def _mutate(data, draw):
    data = bytearray(data)
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        pos = draw(st.integers(min_value=0, max_value=max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(min_value=0, max_value=7))
        elif op == "insert":
            data.insert(pos, draw(st.integers(min_value=0, max_value=255)))
        elif op == "delete" and data:
            del data[pos]
        elif op == "truncate":
            del data[pos:]
    return bytes(data)


def _non_canonical(value, draw):
    """Encodings of the same value that RFC 8949 s4.2 forbids: cbor2's default (unsorted
    maps, float64 everywhere), long heads, indefinite lengths, semantic tags."""
    how = draw(st.sampled_from(["default", "long-head", "indefinite", "semantic"]))
    plain = _cbor2(value)
    if how == "default":
        return cbor2.dumps(plain)
    if how == "long-head":
        n = draw(st.integers(min_value=0, max_value=23))
        return draw(st.sampled_from([b"\x18" + bytes([n]), b"\x19" + n.to_bytes(2, "big"),
                                     b"\x81\x1a" + n.to_bytes(4, "big")]))
    if how == "indefinite":
        items = draw(st.lists(st.integers(min_value=0, max_value=23), max_size=3))
        return b"\x9f" + bytes(items) + b"\xff"
    import datetime
    import decimal
    import fractions
    import uuid
    semantic = draw(st.sampled_from([
        datetime.datetime(2026, 5, 1, tzinfo=datetime.UTC), decimal.Decimal("1.5"),
        fractions.Fraction(1, 3), uuid.UUID(int=7), {1, 2}, 2**64, -(2**64) - 1, 2**65,
        cbor2.CBORSimpleValue(16), cbor2.undefined]))
    return cbor2.dumps([plain, semantic] if draw(st.booleans()) else semantic)


@st.composite
def cbor_inputs(draw):
    value = draw(wide_values)
    kind = draw(st.sampled_from(["valid", "mutated", "non-canonical", "random"]))
    if kind == "valid":
        return _valid(value)
    if kind == "mutated":
        return _mutate(_valid(value), draw)
    if kind == "non-canonical":
        return _non_canonical(value, draw)
    return draw(st.binary(max_size=64))


@settings(max_examples=2000)
@given(cbor_inputs())
def test_fast_path_equals_strict(data):
    """Whatever the input, loads (fast path first) and the strict decoder alone give the
    same value of the same types, or the same error with the same reason; and when the fast
    path itself answers, the strict decoder accepts the input and agrees."""
    fast = dcbor.fast_loads(data)
    if fast is not dcbor.MISS:
        assert _outcome(dcbor.strict_loads, data) == ("ok", _shape(fast))
    assert _outcome(dcbor.loads, data) == _outcome(dcbor.strict_loads, data)


@settings(max_examples=500)
@given(values)
def test_fast_path_takes_every_value_of_the_rule(value):
    """Not dead code: every value dumps encodes comes back through the fast path, but for
    the floats of magnitude 2**15..65504, which cbor2 cannot write canonically."""
    def big_float(v):
        if isinstance(v, float):
            return 32768.0 <= abs(v) <= 65504.0
        if isinstance(v, list):
            return any(map(big_float, v))
        return isinstance(v, dict) and any(map(big_float, v.values()))

    assert (dcbor.fast_loads(dcbor.dumps(value)) is dcbor.MISS) == big_float(value)


def test_float16_values_cbor2_writes_as_float32():
    """cbor2 5.9's canonical encoder writes the float16 values with the top exponent as
    float32, which RFC 8949 s4.2.1 forbids: dumps writes them as float16 itself (a reading
    of 40000.0 W would otherwise seal into an envelope every verifier refuses)."""
    halves = [struct.unpack(">e", bits.to_bytes(2, "big"))[0] for bits in range(0x10000)]
    halves = [h for h in halves if not math.isnan(h)]
    assert any(len(cbor2.dumps(h, canonical=True)) == 5 for h in halves)  # the cbor2 bug
    for value in halves:
        encoded = dcbor.dumps([value, {1: value}, dcbor.Tag(7, value)])
        assert encoded.count(b"\xf9") >= 3
        assert _shape(dcbor.strict_loads(encoded)) == \
            _shape([value, {1: value}, dcbor.Tag(7, value)])
    with pytest.raises(NonDeterministicCBOR):
        dcbor.loads(bytes.fromhex("fa47000000"))  # 32768.0 as float32


@pytest.mark.parametrize("hexdata", [
    "a2181801 2002",            # bytewise order (24 before -1): cbor2's canonical differs
    "a2200218 1801",            # length-first order: refused by the strict decoder
    "f0",                       # simple(16): cbor2 makes a CBORSimpleValue
    "c249010000000000000000",   # 2**64 as a bignum tag: the strict decoder keeps the tag
    "a2f501 0102",              # true and 1 as keys: equal in Python, distinct in CBOR
    "818181818181818181818181818181818100",  # deeper than the limit
])
def test_fast_path_leaves_the_hard_cases_to_the_strict_decoder(hexdata):
    data = bytes.fromhex(hexdata.replace(" ", ""))
    assert dcbor.fast_loads(data, max_depth=16) is dcbor.MISS
    assert _outcome(dcbor.loads, data) == _outcome(dcbor.strict_loads, data)


def test_fast_path_keeps_the_limits():
    data = dcbor.dumps(list(range(50)))
    assert dcbor.fast_loads(data, max_items=10) is dcbor.MISS
    with pytest.raises(OversizeInput):
        dcbor.loads(data, max_items=10)
    assert dcbor.loads(data, max_items=51) == list(range(50))
    with pytest.raises(OversizeInput):
        dcbor.loads(data, max_items=50)
