"""Session messages (agent/channel/offers.py): round trips, signatures bound to type and
signer, and hostile bytes raise only our errors (hypothesis). The control socket's request
parser likewise."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent import dcbor
from agent.channel import control, offers
from agent.channel.messages import Tariff, sign_tariff
from agent.errors import BadSignature, EdgeAgentError, MalformedEnvelope, UnknownKey
from agent.keys import IdentityKey

STATION, VEHICLE = IdentityKey.generate(), IdentityKey.generate()
TARIFF = Tariff(300_000, 250_000, ((0, 200_000), (420, 300_000)))


def offer() -> offers.Offer:
    return offers.Offer("cs-1", 1, STATION.public, b"\x11" * 20, TARIFF,
                        sign_tariff(TARIFF, STATION), 31337, b"\x22" * 20, 3600, 100, 10,
                        20_000_000, "available", 1_700_000_000)


def messages() -> list[offers.Message]:
    rid = os.urandom(16)
    return [offer(),
            offers.Request(rid, "cs-1", 1, "ev-1", VEHICLE.public, b"\x33" * 20,
                           os.urandom(16), 5000, 400_000, 1_700_000_000),
            offers.Accept(rid, "cs-1", 1, "ev-1", os.urandom(16), os.urandom(32), 1),
            offers.Refusal(rid, "cs-1", 1, "ev-1", "not-plugged-in", "state A", 1),
            offers.Command(rid, "ev-1", "start", "cs-1", 1, None, None, 1)]


@pytest.mark.parametrize("message", messages(), ids=lambda m: m.TYPE.name)
def test_round_trip_and_signature(message: offers.Message) -> None:
    signer = VEHICLE if isinstance(message, offers.Request | offers.Command) else STATION
    data = offers.encode(message, signer)
    assert offers.open_as(data, type(message), signer.public) == message
    with pytest.raises(UnknownKey):
        offers.open_as(data, type(message), IdentityKey.generate().public)
    tampered = bytearray(data)
    tampered[-5] ^= 1
    with pytest.raises(BadSignature):
        offers.open_as(bytes(tampered), type(message), signer.public)


def test_an_offer_names_its_eichrecht_meter_key_only_when_it_has_one() -> None:
    import dataclasses

    signed = dataclasses.replace(offer(), meter_key="3059" + "ab" * 40)
    assert offers.open_as(offers.encode(signed, STATION), offers.Offer) == signed
    assert 14 not in offer().to_body() and signed.to_body()[14] == signed.meter_key
    for bad in ("", 7, "x" * 513):   # present means a key: never empty, a string, bounded
        body = {**offer().to_body(), 14: bad}
        with pytest.raises(MalformedEnvelope):
            offers.Offer.from_body(body)


def test_self_signed_offer_and_request_carry_their_key() -> None:
    assert offers.open_as(offers.encode(offer(), STATION), offers.Offer) == offer()
    # signed by another key than the one in the body: refused
    with pytest.raises(UnknownKey):
        offers.open_as(offers.encode(offer(), VEHICLE), offers.Offer)
    # an ACCEPT has no key of its own: its signer must be named
    accept = messages()[2]
    with pytest.raises(MalformedEnvelope):
        offers.open_as(offers.encode(accept, STATION), offers.Accept)


def test_a_signature_is_bound_to_its_message_type() -> None:
    """The same body signed as a REFUSAL does not pass as an ACCEPT (domain separation)."""
    refusal = offers.encode(messages()[3], STATION)
    item = dcbor.loads(refusal)
    item[0] = int(offers.MsgType.ACCEPT)
    with pytest.raises(EdgeAgentError):
        offers.open_as(dcbor.dumps(item), offers.Accept, STATION.public)


def test_unknown_refusal_reason_and_bad_ids_are_malformed() -> None:
    bad = offers.Refusal(os.urandom(16), "cs-1", 1, "ev-1", "because", "", 1)
    with pytest.raises(MalformedEnvelope):
        offers.decode(offers.encode(bad, STATION))
    evil = offers.Command(os.urandom(16), "ev-1/#", "stop", None, None, None, None, 1)
    with pytest.raises(MalformedEnvelope):
        offers.decode(offers.encode(evil, STATION))


def test_salt_needs_both_halves() -> None:
    a, b = os.urandom(16), os.urandom(16)
    assert offers.channel_salt(a, b) != offers.channel_salt(b, a)
    assert len(offers.channel_salt(a, b)) == 32


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes_raise_only_our_errors(data: bytes) -> None:
    try:
        offers.decode(data)
    except EdgeAgentError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([offers.encode(m, STATION) for m in messages()]),
       st.integers(min_value=0, max_value=10_000), st.integers(min_value=1, max_value=255))
def test_mutated_messages_raise_only_our_errors(data: bytes, position: int, flip: int) -> None:
    mutated = bytearray(data)
    mutated[position % len(mutated)] ^= flip
    try:
        signed = offers.decode(bytes(mutated))
        offers.verify(signed, STATION.public)
    except EdgeAgentError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=300),
                 st.dictionaries(st.text(max_size=10), st.one_of(
                     st.integers(), st.text(max_size=20), st.none(), st.booleans()),
                     max_size=5).map(lambda d: __import__("json").dumps(d).encode())))
def test_control_requests_raise_only_value_errors(line: bytes) -> None:
    try:
        request = control.parse(line)
    except ValueError:
        return
    assert request["op"] in ("start", "stop", "status")
