"""EIP-1559 transactions signed through SettlementKey.sign_digest: an independent decoder
(eth-account) recovers the right sender and fields."""

from __future__ import annotations

import pytest
from eth_account import Account
from eth_account.typed_transactions import TypedTransaction
from hexbytes import HexBytes

from agent.keys import SettlementKey
from agent.settlement.txsign import Tx, contract_address, tx_hash


@pytest.mark.parametrize("to", [b"\x11" * 20, None], ids=["call", "create"])
def test_signed_transaction_recovers_the_sender(to: bytes | None) -> None:
    key = SettlementKey.generate()
    tx = Tx(chain_id=31337, nonce=7, max_priority_fee=10**9, max_fee=3 * 10**9, gas=90_000,
            to=to, value=5, data=b"\x01\x02")
    raw = tx.sign(key)
    assert bytes.fromhex(Account.recover_transaction(raw)[2:].lower()) == key.address
    decoded = TypedTransaction.from_bytes(HexBytes(raw)).as_dict()
    assert decoded["nonce"] == 7 and decoded["chainId"] == 31337 and decoded["gas"] == 90_000
    assert decoded["data"] == b"\x01\x02"
    assert len(tx_hash(raw)) == 32


def test_contract_address_known_answer() -> None:
    # The first contract deployed by anvil's well-known dev account 0 (nonce 0).
    sender = bytes.fromhex("f39fd6e51aad88f6f4ce6ab8827279cfffb92266")
    assert contract_address(sender, 0).hex() == "5fbdb2315678afecb367f032d93f642f64180aa3"
