"""Channel message codec and tariff: round trips, hostile bytes, signature domains."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent import dcbor
from agent.channel import messages as m
from agent.channel.messages import Domain, MsgType, Tariff, sign_tariff
from agent.channel.records import decode_record
from agent.errors import BadSignature, EdgeAgentError, MalformedEnvelope, UnknownKey
from agent.keys import IdentityKey

DOMAIN = Domain(31337, b"\x11" * 20, b"\x22" * 32)
KEY = IdentityKey.generate()


def test_encode_decode_authenticate() -> None:
    data = m.encode(DOMAIN, MsgType.ACK, {0: 7, 1: b"\x01" * 65}, KEY)
    wire = m.decode(data)
    assert (wire.msg_type, wire.channel_id, wire.kid) == (MsgType.ACK, DOMAIN.channel_id, KEY.kid)
    m.authenticate(wire, DOMAIN, KEY.public)
    # Another chain, contract or channel in the verifier's domain: the signature fails.
    for other in (Domain(1, DOMAIN.contract, DOMAIN.channel_id),
                  Domain(DOMAIN.chain_id, b"\x12" * 20, DOMAIN.channel_id),
                  Domain(DOMAIN.chain_id, DOMAIN.contract, b"\x23" * 32)):
        with pytest.raises(BadSignature) as info:
            m.authenticate(wire, other, KEY.public)
        assert info.value.reason == "bad-signature"
    with pytest.raises(UnknownKey):
        m.authenticate(wire, DOMAIN, IdentityKey.generate().public)


BODY_VALUES = st.one_of(st.integers(0, 2**64 - 1), st.binary(max_size=70), st.none(),
                        st.booleans(), st.text(max_size=20))


@given(msg_type=st.sampled_from(list(MsgType)),
       body=st.dictionaries(st.integers(0, 30), BODY_VALUES, max_size=8),
       chain_id=st.integers(0, 2**64 - 1))
@settings(max_examples=200, deadline=None)
def test_spliced_encoding_equals_the_plain_one(msg_type: MsgType, body: dict,
                                               chain_id: int) -> None:
    """encode/decode splice the to-be-signed bytes and the wire form from cached prefixes
    and the body's bytes; both must be exactly the plain deterministic encodings."""
    domain = Domain(chain_id, DOMAIN.contract, DOMAIN.channel_id)
    data = m.encode(domain, msg_type, body, KEY)
    tbs = m.to_be_signed(domain, msg_type, body)
    sig = KEY.sign(tbs)
    assert data == dcbor.dumps([int(msg_type), domain.channel_id, KEY.kid, body, sig])
    wire = m.decode(data)
    assert wire.body == body and wire.body_bytes == dcbor.dumps(body)
    m.authenticate(wire, domain, KEY.public)


def test_tariff_signature_and_id() -> None:
    tariff = Tariff(300, 100, ((0, 250), (420, 300)))
    sig = sign_tariff(tariff, KEY)
    m.check_tariff(tariff, sig, KEY.public)
    changed = Tariff(301, 100, ((0, 250), (420, 300)))
    assert changed.tariff_id() != tariff.tariff_id()
    with pytest.raises(BadSignature) as info:
        m.check_tariff(changed, sig, KEY.public)
    assert info.value.reason == "bad-tariff-signature"
    assert Tariff.from_cbor_item(dcbor.loads(dcbor.dumps(tariff.to_cbor_item()))) == tariff


@pytest.mark.parametrize("bad", [
    dict(price_per_kwh=-1), dict(price_per_kwh=True), dict(tou=((60, 1), (0, 2))),
    dict(tou=((1440, 1),)), dict(tou=((0, 1), (0, 2)))])
def test_tariff_validation(bad: dict) -> None:
    with pytest.raises(ValueError):
        Tariff(**({"price_per_kwh": 1} | bad))


@given(st.integers(0, 2 * 86_400), st.integers(0, 3 * 86_400))
def test_tou_price_range_contains_every_price_in_between(start: int, length: int) -> None:
    tariff = Tariff(100, tou=((0, 100), (360, 200), (1200, 50)))
    low, high = tariff.price_range(start, start + length)
    for t in range(start, start + length + 1, max(1, length // 50)):
        assert low <= tariff.price_at(t) <= high


@settings(max_examples=500)
@given(st.binary(max_size=300))
def test_random_bytes_raise_only_our_errors(data: bytes) -> None:
    for decoder in (m.decode, decode_record):
        try:
            decoder(data)
        except EdgeAgentError:
            pass


@settings(max_examples=300)
@given(st.lists(st.one_of(st.integers(0, 2**70), st.binary(max_size=40), st.none(),
                          st.dictionaries(st.integers(0, 20), st.integers(0, 99), max_size=4)),
                max_size=6))
def test_well_formed_cbor_of_the_wrong_shape_is_malformed(items: list) -> None:
    import cbor2

    data = cbor2.dumps(items, canonical=True)  # bignums too, which dcbor.dumps refuses
    try:
        wire = m.decode(data)
    except MalformedEnvelope:
        return
    assert isinstance(wire.body, dict)  # only a well-shaped 5-array gets through


def _strict_or_error(data: bytes) -> object:
    try:
        return ("ok", dcbor.loads(data, max_bytes=m.MAX_MESSAGE_BYTES, max_depth=6,
                                  max_items=m.MAX_ITEMS))
    except EdgeAgentError as exc:
        return ("error", exc.reason)


def _fast_or_error(data: bytes) -> object:
    try:
        return ("ok", m.loads_strict(data))
    except EdgeAgentError as exc:
        return ("error", exc.reason)


PLAIN = st.recursive(
    st.one_of(st.integers(-(2**64), 2**64 - 1), st.binary(max_size=20), st.text(max_size=8),
              st.booleans(), st.none()),
    lambda inner: st.lists(inner, max_size=5)
    | st.dictionaries(st.integers(-30, 300), inner, max_size=5), max_leaves=30)


@settings(max_examples=500)
@given(PLAIN, st.integers(0, 400), st.integers(0, 255))
def test_fast_path_agrees_with_the_strict_decoder(item: object, pos: int, byte: int) -> None:
    """loads_strict takes cbor2's fast path only when the result is what the strict
    decoder says; on mutated and non-canonical input both agree too (value or reason)."""
    import cbor2

    # cbor2's canonical and plain encodings (mixed key types and bignums included, which
    # dcbor.dumps refuses to produce)
    for data in (cbor2.dumps(item, canonical=True), cbor2.dumps(item)):
        assert _fast_or_error(data) == _strict_or_error(data)
        mutated = bytearray(data)
        mutated[pos % len(mutated)] = byte
        assert _fast_or_error(bytes(mutated)) == _strict_or_error(bytes(mutated))


def test_fast_path_rejects_what_cbor2_would_take() -> None:
    pay = dcbor.dumps([4, b"\x00" * 32, b"\x01" * 8, {0: 1, 24: 2}, b"\x02" * 64])
    assert m.loads_strict(pay) == dcbor.loads(pay)
    cases = {
        "duplicate-map-key": bytes.fromhex("a2000100 02".replace(" ", "")),
        "non-deterministic-cbor": bytes.fromhex("a2 20 01 18 18 02".replace(" ", "")),
        "malformed-cbor": bytes.fromhex("f0"),  # simple value 16: cbor2 accepts it
    }
    for reason, data in cases.items():
        with pytest.raises(EdgeAgentError) as info:
            m.loads_strict(data)
        assert info.value.reason == reason, (reason, data.hex())
