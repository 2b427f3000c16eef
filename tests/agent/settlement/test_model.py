"""SignedState's CBOR form and ChannelRecord's hash (the contract's storage key)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent import dcbor
from agent.channel.state import ChannelState
from agent.errors import DecodeError, MalformedEnvelope, RemoteProtocolError
from agent.settlement.model import ChannelRecord, SignedState


def test_signed_state_round_trip() -> None:
    state = ChannelState(1, b"\x01" * 20, b"\x02" * 32, 5, 10, 3, 70, True)
    signed = SignedState(state, b"\x03" * 65, b"\x04" * 65)
    assert SignedState.decode(signed.encode()) == signed


@pytest.mark.parametrize("item", [
    {1: 0, 2: b"", 3: b""}, {1: 0}, [1, 2, 3],
    {1: ChannelState(1, b"\x01" * 20, b"\x02" * 32, 5, 10, 3, 70).to_cbor_item(),
     2: b"\x03" * 64, 3: b"\x04" * 65},
])
def test_malformed_signed_states_raise_our_errors(item: object) -> None:
    with pytest.raises(MalformedEnvelope):
        SignedState.decode(dcbor.dumps(item))


@given(st.binary(max_size=300))
def test_random_bytes_raise_only_our_errors(data: bytes) -> None:
    try:
        SignedState.decode(data)
    except (DecodeError, RemoteProtocolError):
        pass


def test_terms_hash_and_packed_slots_match_the_contract_layout() -> None:
    from eth_abi import encode
    from eth_hash.auto import keccak

    from agent.settlement.model import unpack_closing, unpack_deposits

    r = ChannelRecord(b"\x01" * 20, b"\x02" * 20, 5, 6, 7, 8, 9, 10, 11)
    words = encode(["(address,address,uint256)"], [("0x" + "01" * 20, "0x" + "02" * 20, 7)])
    assert r.terms_hash() == keccak(words)
    assert r.terms_tuple() == ("0x" + "01" * 20, "0x" + "02" * 20, 7)
    assert unpack_deposits(r.packed_deposits()) == (5, 6)
    assert unpack_closing(r.packed_closing()) == (8, 9, 5 - 10 + 11)
    assert ChannelRecord(b"\x01" * 20, b"\x02" * 20, 5, 6, 7).packed_closing() == 0
