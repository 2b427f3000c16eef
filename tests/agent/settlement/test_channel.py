"""The channel contract on eth-tester + py-evm (DESIGN s6): every rule, every attack.

Calls go through ``Raw`` (exact arguments, no client-side checks) so that each rejection
shown here is the contract's own; the revert string names the rule that fired.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import vyper
from web3 import Web3

from agent.channel.state import SECP256K1_N, derive_channel_id, eth_address
from agent.errors import SettlementError
from agent.keys import SettlementKey
from agent.settlement.chain import InProcessChain, deploy_contracts
from agent.settlement.model import ChannelRecord
from agent.settlement.rpc import Sender

from .conftest import TOKENS, Parties, new_salt

WINDOW = 100


def rejected(why: str):
    return pytest.raises(SettlementError, match=f"rejected by the contract: {why}")


def open_funded(p: Parties, dep_ev: int = 1000, dep_cs: int = 500,
                window: int = WINDOW) -> tuple[bytes, ChannelRecord]:
    salt = new_salt()
    p.raw(p.ev)("open", p.ev.address, p.cs.address, salt, window, dep_ev)
    channel_id = derive_channel_id(p.chain.chain_id, p.address, p.ev.address, p.cs.address,
                                   salt)
    record = ChannelRecord(p.ev.address, p.cs.address, dep_ev, 0, window)
    if dep_cs:
        p.raw(p.cs)("deposit", channel_id, record, dep_cs)
        record = ChannelRecord(p.ev.address, p.cs.address, dep_ev, dep_cs, window)
    return channel_id, record


def stored(p: Parties, channel_id: bytes) -> tuple[bytes, int, int]:
    """The channel's three storage slots: Terms hash, packed deposits, packed closing."""
    return tuple(p.client(p.ev).contract.functions.read(channel_id).call())  # type: ignore[return-value]


def slots(record: ChannelRecord) -> tuple[bytes, int, int]:
    return record.terms_hash(), record.packed_deposits(), record.packed_closing()


SETTLED_SLOTS = ((1).to_bytes(32, "big"), 0, 0)


def closing(record: ChannelRecord, deadline: int, nonce: int, t_ev: int,
            t_cs: int = 0) -> ChannelRecord:
    return ChannelRecord(record.ev, record.cs, record.dep_ev, record.dep_cs, record.window,
                         deadline, nonce, t_ev, t_cs)


def malleate(sig: bytes) -> bytes:
    """The high-s twin (n - s, flipped v) of a valid signature: ecrecover accepts it."""
    s = int.from_bytes(sig[32:64], "big")
    return sig[:32] + (SECP256K1_N - s).to_bytes(32, "big") + bytes([55 - sig[64]])


# --- open and deposit ----------------------------------------------------------------------

def test_open_and_deposits_store_the_record_hash_and_move_tokens(parties: Parties) -> None:
    p = parties
    channel_id, record = open_funded(p, 1000, 500)
    assert stored(p, channel_id) == slots(record)
    assert p.balance(p.ev) == TOKENS - 1000 and p.balance(p.cs) == TOKENS - 500
    assert p.balance(p.chain.contract) == 1500
    view = p.client(p.cs).view(channel_id)
    assert view.status.value == "open" and view.record == record


def test_open_by_the_station_credits_its_side(parties: Parties) -> None:
    p = parties
    salt = new_salt()
    p.raw(p.cs)("open", p.ev.address, p.cs.address, salt, WINDOW, 70)
    cid = derive_channel_id(p.chain.chain_id, p.chain.contract, p.ev.address, p.cs.address, salt)
    assert stored(p, cid) == slots(ChannelRecord(p.ev.address, p.cs.address, 0, 70, WINDOW))


@pytest.mark.parametrize("case", ["outsider", "same-party", "zero-address", "window-low",
                                  "window-high"])
def test_open_rejects_bad_parameters(parties: Parties, case: str) -> None:
    p = parties
    ev, cs, who, window = p.ev.address, p.cs.address, p.ev, WINDOW
    why = {"outsider": "not a party", "same-party": "parties", "zero-address": "parties",
           "window-low": "window", "window-high": "window"}[case]
    if case == "outsider":
        who = p.other
    elif case == "same-party":
        cs = ev
    elif case == "zero-address":
        cs = bytes(20)
    elif case == "window-low":
        window = 0
    else:
        window = 30 * 24 * 3600 + 1
    with rejected(why):
        p.raw(who)("open", ev, cs, new_salt(), window, 10)


def test_a_channel_id_is_used_once_even_after_settlement(parties: Parties) -> None:
    p = parties
    salt = new_salt()
    p.raw(p.ev)("open", p.ev.address, p.cs.address, salt, WINDOW, 10)
    with rejected("channel id used"):
        p.raw(p.cs)("open", p.ev.address, p.cs.address, salt, WINDOW, 10)
    cid = derive_channel_id(p.chain.chain_id, p.chain.contract, p.ev.address, p.cs.address, salt)
    record = ChannelRecord(p.ev.address, p.cs.address, 10, 0, WINDOW)
    final = p.state(cid, 1, 4, final=True)
    p.raw(p.other)("coopClose", cid, record, final, *p.sigs(final))
    with rejected("channel id used"):  # old signed states can never be replayed on it
        p.raw(p.ev)("open", p.ev.address, p.cs.address, salt, WINDOW, 10)


def test_deposit_rules(parties: Parties) -> None:
    p = parties
    cid, record = open_funded(p, 100, 0)
    with rejected("not a party"):
        p.raw(p.other)("deposit", cid, record, 5)
    forged = ChannelRecord(p.ev.address, p.cs.address, 100, 0, WINDOW + 1)
    with rejected("record"):
        p.raw(p.ev)("deposit", cid, forged, 5)
    p.raw(p.ev)("deposit", cid, record, 5)       # top-up of the opener's own side
    record = ChannelRecord(p.ev.address, p.cs.address, 105, 0, WINDOW)
    assert stored(p, cid) == slots(record)
    with rejected(""):                           # more than the depositor holds: the token reverts
        p.raw(p.cs)("deposit", cid, record, TOKENS + 1)
    tx = p.raw(p.ev)("close", cid, record, p.state(cid, 0, 0), b"", b"")
    with rejected("not open"):
        p.raw(p.cs)("deposit", cid, closing(record, tx.block_timestamp + WINDOW, 0, 0), 5)


# --- cooperative close ---------------------------------------------------------------------

def test_cooperative_close_settles_at_once_and_only_once(parties: Parties) -> None:
    p = parties
    cid, record = open_funded(p, 1000, 500)
    final = p.state(cid, 7, t_ev=300, t_cs=100, wh=4200, final=True)
    sigs = p.sigs(final)
    p.raw(p.other)("coopClose", cid, record, final, *sigs)     # anyone may submit it
    assert p.balance(p.ev) == TOKENS - 1000 + 800
    assert p.balance(p.cs) == TOKENS - 500 + 700
    assert p.balance(p.chain.contract) == 0
    assert stored(p, cid) == SETTLED_SLOTS
    with rejected("record"):
        p.raw(p.ev)("coopClose", cid, record, final, *sigs)
    with rejected("record"):
        p.raw(p.ev)("settle", cid, record)
    with rejected("record"):
        p.raw(p.ev)("close", cid, record, final, *sigs)


def test_cooperative_close_needs_a_final_state(parties: Parties) -> None:
    p = parties
    cid, record = open_funded(p)
    state = p.state(cid, 3, 10)
    with rejected("not final"):
        p.raw(p.ev)("coopClose", cid, record, state, *p.sigs(state))


# --- signatures: every DESIGN s6 attack ---------------------------------------------------

@pytest.mark.parametrize("attack,why", [
    ("high-s ev", "sig range"), ("high-s cs", "sig range"), ("v=0", "sig v"), ("v=29", "sig v"),
    ("signed by ev only", "signer"), ("swapped", "signer"), ("outsider", "signer"),
    ("short", "sig length"), ("zero-r", "sig range"),
])
def test_bad_signatures_are_rejected(parties: Parties, attack: str, why: str) -> None:
    p = parties
    cid, record = open_funded(p)
    final = p.state(cid, 2, 50, final=True)
    sig_ev, sig_cs = p.sigs(final)
    if attack == "high-s ev":
        sig_ev = malleate(sig_ev)
    elif attack == "high-s cs":
        sig_cs = malleate(sig_cs)
    elif attack == "v=0":
        sig_ev = sig_ev[:64] + bytes([sig_ev[64] - 27])
    elif attack == "v=29":
        sig_cs = sig_cs[:64] + b"\x1d"
    elif attack == "signed by ev only":
        sig_cs = sig_ev
    elif attack == "swapped":
        sig_ev, sig_cs = sig_cs, sig_ev
    elif attack == "outsider":
        sig_cs = p.other.sign_digest(final.digest())
    elif attack == "short":
        sig_ev = sig_ev[:64]
    else:
        sig_cs = bytes(32) + sig_cs[32:]
    with rejected(why):
        p.raw(p.ev)("coopClose", cid, record, final, sig_ev, sig_cs)
    p.raw(p.ev)("coopClose", cid, record, final, *p.sigs(final))  # the honest one passes


def test_malleated_signature_would_recover_the_same_key(parties: Parties) -> None:
    """Why the high-s check matters: the EVM's ecrecover accepts the twin."""
    from coincurve import PublicKey

    p = parties
    digest = p.state(bytes(32), 1, 1).digest()
    twin = malleate(p.ev.sign_digest(digest))
    public = PublicKey.from_signature_and_message(twin[:64] + bytes([twin[64] - 27]), digest,
                                                  hasher=None)
    assert eth_address(public) == p.ev.address


@pytest.mark.parametrize("foreign", ["chain", "contract", "channel"])
def test_states_of_a_foreign_chain_contract_or_channel_are_rejected(parties: Parties,
                                                                      foreign: str) -> None:
    p = parties
    cid, record = open_funded(p)
    other_cid, _ = open_funded(p)
    state = p.state(cid, 2, 50, final=True)
    if foreign == "chain":
        signed = type(state)(state.chain_id + 1, state.contract, cid, 2, 50, 0, 0, True)
    elif foreign == "contract":
        signed = type(state)(state.chain_id, b"\x42" * 20, cid, 2, 50, 0, 0, True)
    else:
        signed = p.state(other_cid, 2, 50, final=True)
    with rejected("signer"):
        p.raw(p.ev)("coopClose", cid, record, state, *p.sigs(signed))


# --- balances ------------------------------------------------------------------------------

@pytest.mark.parametrize("t_ev,t_cs,ok", [
    (1000, 0, True), (1001, 0, False), (0, 500, True), (0, 501, False),
    (1600, 600, True), (1601, 600, False), (2**256 - 1, 2**256 - 1, True),
    (2**256 - 1, 0, False), (0, 2**256 - 1, False),
])
def test_balances_must_stay_within_the_deposits(parties: Parties, t_ev: int, t_cs: int,
                                                ok: bool) -> None:
    p = parties
    cid, record = open_funded(p, 1000, 500)
    final = p.state(cid, 1, t_ev, t_cs, final=True)
    if ok:
        p.raw(p.ev)("coopClose", cid, record, final, *p.sigs(final))
        assert p.balance(p.ev) + p.balance(p.cs) == 2 * TOKENS
    else:
        with rejected("balance"):
            p.raw(p.ev)("coopClose", cid, record, final, *p.sigs(final))


# --- unilateral close, challenge, settle ---------------------------------------------------

def test_unilateral_close_challenge_and_settle(parties: Parties) -> None:
    p = parties
    cid, record = open_funded(p, 1000, 500)
    old, new = p.state(cid, 3, 100), p.state(cid, 9, 400, 50)
    with rejected("not a party"):
        p.raw(p.other)("close", cid, record, old, *p.sigs(old))
    with rejected("window"):
        p.raw(p.ev)("settle", cid, record)
    tx = p.raw(p.ev)("close", cid, record, old, *p.sigs(old))      # the EV closes stale
    deadline = tx.block_timestamp + WINDOW
    rec = closing(record, deadline, 3, 100)
    assert stored(p, cid) == slots(rec)
    with rejected("not open"):
        p.raw(p.cs)("close", cid, rec, new, *p.sigs(new))
    with rejected("stale"):
        p.raw(p.other)("challenge", cid, rec, old, *p.sigs(old))
    with rejected("window"):
        p.raw(p.other)("settle", cid, rec)
    p.raw(p.other)("challenge", cid, rec, new, *p.sigs(new))          # a watchtower
    rec = closing(record, deadline, 9, 400, 50)
    assert stored(p, cid) == slots(rec)
    p.chain.advance_time(WINDOW + 1)
    newer = p.state(cid, 10, 500)
    with rejected("not in window"):
        p.raw(p.cs)("challenge", cid, rec, newer, *p.sigs(newer))
    p.raw(p.other)("settle", cid, rec)
    assert p.balance(p.ev) == TOKENS - 1000 + 650
    assert p.balance(p.cs) == TOKENS - 500 + 850
    with rejected("record"):
        p.raw(p.other)("settle", cid, rec)


def test_close_with_the_initial_state_returns_the_deposits(parties: Parties) -> None:
    p = parties
    cid, record = open_funded(p, 1000, 0)
    with rejected("initial state"):      # nonce 0 is only "nothing paid"
        p.raw(p.ev)("close", cid, record, p.state(cid, 0, 0, 5), b"", b"")
    tx = p.raw(p.ev)("close", cid, record, p.state(cid, 0, 0), b"", b"")
    p.chain.advance_time(WINDOW + 1)
    p.raw(p.ev)("settle", cid, closing(record, tx.block_timestamp + WINDOW, 0, 0))
    assert p.balance(p.ev) == TOKENS


def test_cooperative_close_during_the_window_needs_a_newer_final_state(parties: Parties) -> None:
    p = parties
    cid, record = open_funded(p, 1000, 500)
    mid = p.state(cid, 5, 200)
    tx = p.raw(p.cs)("close", cid, record, mid, *p.sigs(mid))
    rec = closing(record, tx.block_timestamp + WINDOW, 5, 200)
    stale_final = p.state(cid, 5, 250, final=True)
    with rejected("closing"):
        p.raw(p.ev)("coopClose", cid, rec, stale_final, *p.sigs(stale_final))
    final = p.state(cid, 6, 250, final=True)
    p.raw(p.ev)("coopClose", cid, rec, final, *p.sigs(final))
    assert p.balance(p.cs) == TOKENS - 500 + 750


def test_terms_must_match_the_stored_hash(parties: Parties) -> None:
    """Callers pass the Terms (ev, cs, window) back; deposits and the closing state are
    read from storage, so no caller can pass other deposits."""
    p = parties
    cid, record = open_funded(p, 1000, 500)
    final = p.state(cid, 1, 10, final=True)
    for forged in (ChannelRecord(p.ev.address, p.cs.address, 1000, 500, WINDOW + 1),
                   ChannelRecord(p.other.address, p.cs.address, 1000, 500, WINDOW),
                   ChannelRecord(p.ev.address, p.other.address, 1000, 500, WINDOW)):
        with rejected("record"):
            p.raw(p.ev)("coopClose", cid, forged, final, *p.sigs(final))
    with rejected("record"):
        p.raw(p.ev)("settle", bytes(32), ChannelRecord(bytes(20), bytes(20), 0, 0, 0))


# --- settle never reverts, even when the token refuses a payout ---------------------------

@pytest.mark.parametrize("mode", [1, 2], ids=["transfer-reverts", "transfer-returns-false"])
def test_settle_never_reverts_when_a_payout_transfer_fails(mode: int) -> None:
    """A token that refuses to pay the EV (blacklist, pause) must not lock the station's
    money: settle pays the station, credits the EV, and the EV withdraws later."""
    chain = InProcessChain.start(min_window_s=1)
    out = vyper.compile_code((Path(__file__).parent / "blocking_token.vy").read_text(),
                             output_formats=["abi", "bytecode"])
    token_addr, _ = Sender(chain.w3, chain.deployer).deploy(
        bytes.fromhex(out["bytecode"][2:]), "deploy hostile token")
    channel = deploy_contracts(chain.w3, chain.deployer, token=token_addr,
                               min_window_s=1).channel
    token = chain.w3.eth.contract(address=Web3.to_checksum_address(token_addr), abi=out["abi"])

    def token_call(key: SettlementKey, fn: str, *args: object) -> None:
        args = tuple(Web3.to_checksum_address(a) if isinstance(a, bytes) else a for a in args)
        data = token.encode_abi(fn, args=list(args))
        Sender(chain.w3, key).transact(token_addr, bytes.fromhex(data[2:]), fn)

    def balance(key: SettlementKey) -> int:
        return token.functions.balanceOf(Web3.to_checksum_address(key.address)).call()

    ev, cs = SettlementKey.generate(), SettlementKey.generate()
    for key in (ev, cs):
        chain.fund(key.address)
        token_call(key, "mint", key.address, 1000)
        token_call(key, "approve", channel, 2**256 - 1)
    p = Parties(chain, ev, cs, cs, contract=channel)
    cid, record = open_funded(p, 600, 400)
    state = p.state(cid, 4, 100)
    tx = p.raw(ev)("close", cid, record, state, *p.sigs(state))
    token_call(ev, "set_mode", ev.address, mode)          # the EV's payout will fail
    chain.advance_time(WINDOW + 1)
    p.raw(cs)("settle", cid, closing(record, tx.block_timestamp + WINDOW, 4, 100))
    credit = p.client(ev).contract.functions.credit(Web3.to_checksum_address(ev.address))
    assert balance(cs) == 1000 - 400 + 500
    assert balance(ev) == 1000 - 600 and credit.call() == 500
    token_call(ev, "set_mode", ev.address, 0)
    p.raw(ev)("withdraw")
    assert balance(ev) == 1000 - 600 + 500 and credit.call() == 0
    with rejected("nothing to withdraw"):
        p.raw(ev)("withdraw")
