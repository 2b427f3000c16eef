"""The contract attacks of issue 14, each played on eth-tester AND on anvil (a real node).

An adversary's transaction "lands first" in two ways: in an earlier block than the honest
one, whose calldata was made before (what a transaction waiting in the mempool is), and on
anvil also in the same block, ahead of it (automine off, a higher priority fee: the order a
block builder picks). The honest call must succeed either way.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import vyper
from web3 import Web3

from agent.channel.state import MAX_NONCE, ChannelState, derive_channel_id
from agent.errors import SettlementError
from agent.keys import SettlementKey
from agent.settlement.chain import deploy_contracts
from agent.settlement.model import ChannelRecord, TxResult
from agent.settlement.rpc import Sender
from agent.settlement.txsign import Tx, tx_hash

from .conftest import TOKENS, Parties, new_salt

WINDOW = 100
GAS = 600_000


def rejected(why: str):  # type: ignore[no-untyped-def]
    return pytest.raises(SettlementError, match=f"rejected by the contract: {why}")


def open_funded(p: Parties, dep_ev: int = 10_000, dep_cs: int = 0,
                window: int = WINDOW) -> tuple[bytes, ChannelRecord]:
    salt = new_salt()
    p.raw(p.ev)("open", p.ev.address, p.cs.address, salt, window, dep_ev)
    cid = derive_channel_id(p.chain.chain_id, p.address, p.ev.address, p.cs.address, salt)
    record = ChannelRecord(p.ev.address, p.cs.address, dep_ev, dep_cs, window)
    if dep_cs:
        p.raw(p.cs)("deposit", cid, record, dep_cs)
    return cid, record


def calldata(p: Parties, fn: str, *args: object) -> bytes:
    """What a party signs into its transaction now (it waits in the mempool meanwhile)."""
    from .conftest import _abi

    raw = p.raw(p.ev)
    return bytes.fromhex(raw.abi.encode_abi(fn, args=[_abi(a) for a in args])[2:])


def send(p: Parties, key: SettlementKey, data: bytes, gas: int = GAS) -> TxResult:
    return Sender(p.chain.w3, key).transact(p.address, data, "call", gas=gas)


def paying(p: Parties, cid: bytes, nonce: int, t_ev: int, t_cs: int = 0,
           final: bool = False) -> tuple[ChannelState, bytes, bytes]:
    state = p.state(cid, nonce, t_ev, t_cs, wh=nonce, final=final)
    return (state, *p.sigs(state))


def in_one_block(p: Parties, txs: list[tuple[SettlementKey, bytes, int]]) -> list[dict]:  # type: ignore[type-arg]
    """anvil only: mine ``(key, calldata, priority fee)`` transactions in one block; returns
    their receipts in the order given."""
    w3 = p.chain.w3
    w3.provider.make_request("evm_setAutomine", [False])
    try:
        hashes = []
        base = w3.eth.get_block("latest")["baseFeePerGas"]
        for key, data, tip in txs:
            nonce = w3.eth.get_transaction_count(Web3.to_checksum_address(key.address),
                                                 "pending")
            raw = Tx(p.chain.chain_id, nonce, tip, 2 * base + tip, GAS, p.address, 0,
                     data).sign(key)
            w3.eth.send_raw_transaction(raw)
            hashes.append(tx_hash(raw))
        w3.provider.make_request("evm_mine", [])
    finally:
        w3.provider.make_request("evm_setAutomine", [True])
    return [dict(w3.eth.get_transaction_receipt(h)) for h in hashes]


# --- 1. front-running a challenge ------------------------------------------------------

def test_a_higher_nonce_wins_whatever_landed_before_it(on_both: Parties) -> None:
    """The review's attack: the vehicle closes on nonce 10 of 40 and lands nonce 11 just
    ahead of the station's challenge with 40. The challenge names no earlier state, so it
    succeeds; the vehicle's later intermediate states are stale; the station is paid for 40."""
    p = on_both
    cid, record = open_funded(p, 10_000)
    p.raw(p.ev)("close", cid, record, *paying(p, cid, 10, 1_000))
    honest = calldata(p, "challenge", cid, record, *paying(p, cid, 40, 4_000))
    p.raw(p.ev)("challenge", cid, record, *paying(p, cid, 11, 1_100))   # lands first
    send(p, p.cs, honest)
    with rejected("stale"):
        p.raw(p.ev)("challenge", cid, record, *paying(p, cid, 12, 1_200))
    p.chain.advance_time(WINDOW + 1)
    before = p.balance(p.cs)
    p.raw(p.other)("settle", cid, record)
    assert p.balance(p.cs) - before == 4_000
    assert p.balance(p.ev) == TOKENS - 4_000


@pytest.mark.anvil
def test_a_higher_nonce_wins_behind_a_front_runner_in_the_same_block(on_anvil: Parties) -> None:
    """anvil only: eth-tester mines every transaction in a block of its own."""
    p = on_anvil
    cid, record = open_funded(p, 10_000)
    p.raw(p.ev)("close", cid, record, *paying(p, cid, 10, 1_000))
    cheat = calldata(p, "challenge", cid, record, *paying(p, cid, 11, 1_100))
    honest = calldata(p, "challenge", cid, record, *paying(p, cid, 40, 4_000))
    first, second = in_one_block(p, [(p.ev, cheat, 50 * 10**9), (p.cs, honest, 10**9)])
    assert first["blockNumber"] == second["blockNumber"]
    assert first["transactionIndex"] < second["transactionIndex"]
    assert (first["status"], second["status"]) == (1, 1)
    assert p.client(p.cs).record(cid).nonce == 40


def test_close_or_challenge_beats_a_stale_close_that_landed_first(on_both: Parties) -> None:
    p = on_both
    cid, record = open_funded(p, 10_000)
    p.raw(p.ev)("close", cid, record, *paying(p, cid, 10, 1_000))
    station = p.client(p.cs)
    assert station.close_or_challenge(*paying(p, cid, 40, 4_000)) is not None
    assert station.record(cid).nonce == 40
    assert station.close_or_challenge(*paying(p, cid, 40, 4_000)) is None   # nothing to do


# --- 3. griefing settlement with a hostile token --------------------------------------

def hostile_setup(p: Parties) -> tuple[Parties, object, bytes]:
    """A channel contract over the hostile token (tests/agent/settlement/blocking_token.vy)."""
    w3 = p.chain.w3
    out = vyper.compile_code((Path(__file__).parent / "blocking_token.vy").read_text(),
                             output_formats=["abi", "bytecode"])
    deployer = p.other
    token_addr, _ = Sender(w3, deployer).deploy(bytes.fromhex(out["bytecode"][2:]), "token")
    channel = deploy_contracts(w3, deployer, token=token_addr, min_window_s=1).channel
    token = w3.eth.contract(address=Web3.to_checksum_address(token_addr), abi=out["abi"])
    for key in (p.ev, p.cs):
        token_call(w3, token, key, "mint", key.address, 1000)
        token_call(w3, token, key, "approve", channel, 2**256 - 1)
    return Parties(p.chain, p.ev, p.cs, p.other, contract=channel), token, token_addr


def token_call(w3: Web3, token: object, key: SettlementKey, fn: str, *args: object) -> None:
    args = tuple(Web3.to_checksum_address(a) if isinstance(a, bytes) else a for a in args)
    data = token.encode_abi(fn, args=list(args))  # type: ignore[attr-defined]
    Sender(w3, key).transact(bytes.fromhex(token.address[2:]), bytes.fromhex(data[2:]), fn)  # type: ignore[attr-defined]


def test_a_token_that_burns_all_gas_cannot_block_settlement(on_both: Parties) -> None:
    p, token, _ = hostile_setup(on_both)
    w3 = p.chain.w3

    def balance(key: SettlementKey) -> int:
        return token.functions.balanceOf(Web3.to_checksum_address(key.address)).call()  # type: ignore[attr-defined]

    def credit(key: SettlementKey) -> int:
        return p.client(key).contract.functions.credit(
            Web3.to_checksum_address(key.address)).call()

    cid, record = open_funded(p, 600, 400)
    p.raw(p.ev)("close", cid, record, *paying(p, cid, 4, 100))
    for key in (p.ev, p.cs):   # every payout now burns all the gas it is given
        token_call(w3, token, key, "set_mode", key.address, 3)
    p.chain.advance_time(WINDOW + 1)
    tx = p.client(p.other).settle(cid)            # the node's estimate: a bounded amount
    assert tx.gas_used < 400_000
    assert (credit(p.ev), credit(p.cs)) == (500, 500)
    assert (balance(p.ev), balance(p.cs)) == (400, 600)
    with rejected("record"):                      # nothing settles twice
        p.raw(p.other)("settle", cid, record)
    with rejected("transfer"):                    # still burning: the credit stays
        p.raw(p.ev)("withdraw")
    assert credit(p.ev) == 500
    for key in (p.ev, p.cs):
        token_call(w3, token, key, "set_mode", key.address, 0)
        p.raw(key)("withdraw")
    assert (balance(p.ev), balance(p.cs)) == (900, 1100)
    assert (credit(p.ev), credit(p.cs)) == (0, 0)
    with rejected("nothing to withdraw"):
        p.raw(p.ev)("withdraw")


def test_a_caller_with_too_little_gas_cannot_turn_a_payout_into_a_credit(
        on_both: Parties) -> None:
    """The stipend needs a gas floor: below it settle reverts ("gas") instead of crediting
    a payout that would have succeeded."""
    p = on_both
    cid, record = open_funded(p, 1000)
    p.raw(p.ev)("close", cid, record, *paying(p, cid, 2, 300))
    p.chain.advance_time(WINDOW + 1)
    with pytest.raises(SettlementError) as err:
        send(p, p.other, calldata(p, "settle", cid, record), gas=120_000)
    assert err.value.reason == "reverted"
    assert p.client(p.ev).contract.functions.credit(
        Web3.to_checksum_address(p.ev.address)).call() == 0
    p.raw(p.other)("settle", cid, record)
    assert p.balance(p.ev) == TOKENS - 300


# --- 4. a dust deposit ahead of a close -------------------------------------------------

@pytest.mark.parametrize("call", ["coopClose", "close"])
def test_a_dust_deposit_cannot_block_a_close(on_both: Parties, call: str) -> None:
    p = on_both
    cid, record = open_funded(p, 1000, 500)
    honest = calldata(p, call, cid, record, *paying(p, cid, 7, 300, 100, final=call == "coopClose"))
    p.raw(p.ev)("deposit", cid, record, 1)        # lands first
    send(p, p.cs, honest)
    if call == "close":
        with rejected("not open"):                # and none once a close is under way
            p.raw(p.ev)("deposit", cid, record, 1)
        p.chain.advance_time(WINDOW + 1)
        p.raw(p.other)("settle", cid, record)
    assert p.balance(p.ev) == TOKENS - 1000 - 1 + (1001 - 300 + 100)   # the dust comes back
    assert p.balance(p.cs) == TOKENS - 500 + (500 + 300 - 100)


# --- the 64-bit nonce bound -------------------------------------------------------------

def test_dispute_states_carry_a_nonce_the_contract_can_store(on_both: Parties) -> None:
    p = on_both
    cid, record = open_funded(p, 1000)
    with rejected("nonce"):
        p.raw(p.ev)("close", cid, record, *paying(p, cid, MAX_NONCE + 1, 10))
    p.raw(p.ev)("close", cid, record, *paying(p, cid, MAX_NONCE, 10))
    assert p.client(p.ev).record(cid).nonce == MAX_NONCE
