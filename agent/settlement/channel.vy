# pragma version 0.4.3
# @license Apache-2.0
"""
@title EvEdgeChannel: bidirectional EV <-> station payment channels over one ERC-20 token
@notice DESIGN s6. Rules (the reference adjudicator agent/settlement/adjudicator.py has the
        same ones, and the tests run both side by side on generated traces and in a
        Hypothesis state machine with an adversary):

        open       ev or cs opens with its own deposit; id = keccak256(abi.encode(chainId,
                   this, ev, cs, salt)); an id is used once, ever (a settled channel keeps
                   a SETTLED marker, so old states can never be replayed on a new channel).
        deposit    ev or cs adds to its own deposit while the channel is open (no close
                   started); the two deposits together stay below 2**128.
        coopClose  a state with final = true signed by both settles at once (open channel,
                   or a closing one before its deadline with a higher nonce).
        close      ev or cs starts the dispute window with a co-signed state (or the initial
                   state: nonce 0, nothing paid, which needs no signature).
        challenge  anyone (a watchtower) replaces the closing state with a co-signed state of
                   a higher nonce while block.timestamp <= deadline.
        settle     anyone, once block.timestamp > deadline; never reverts for a closing
                   channel given enough gas: every payout is a call with a fixed gas
                   stipend, and one that fails is credited for withdraw() instead.

        A state is checked exactly as agent/channel/state.py signs it: EIP-712 digest over
        domain EvEdgeChannel/1/chainId/this and State(bytes32 channelId,uint256 nonce,
        uint256 tEv,uint256 tCs,uint256 wh,bool final); 65-byte r||s||v signatures with
        v in {27, 28} and s <= n/2 (EIP-2); balances dep_ev - t_ev + t_cs and
        dep_cs + t_ev - t_cs must each lie in [0, dep_ev + dep_cs]; a state that starts or
        wins a dispute has a nonce below 2**64 (the channel protocol counts +1 per update).

        Storage, three slots per channel, chosen so that nothing one party sends can make
        another party's valid call revert (issue 14):
          channels[id] = keccak256(abi.encode(Terms)) | SETTLED. Terms (ev, cs, window) are
                         fixed at open; callers pass them back (one SLOAD instead of three).
          deposits[id] = dep_ev << 128 | dep_cs. Read from storage, never passed: a deposit
                         landing just before a close cannot invalidate it ("dust deposit").
          closing[id]  = deadline << 192 | nonce << 128 | to_ev (0 while open). Read from
                         storage, never passed: a challenge names no earlier closing state,
                         so a state landed ahead of it in the same block cannot make it
                         revert ("front-running"); only a higher nonce wins.
        Every change is logged (Opened, Deposited, Closing, Settled), so any node's logs show
        the full history.
"""

from ethereum.ercs import IERC20

struct Terms:
    ev: address
    cs: address
    window: uint256      # dispute window, seconds

struct State:
    nonce: uint256
    t_ev: uint256
    t_cs: uint256
    wh: uint256
    final: bool

event Opened:
    channel_id: indexed(bytes32)
    ev: address
    cs: address
    window: uint256

event Deposited:
    channel_id: indexed(bytes32)
    dep_ev: uint256
    dep_cs: uint256

event Closing:
    channel_id: indexed(bytes32)
    nonce: uint256
    t_ev: uint256
    t_cs: uint256
    deadline: uint256

event Settled:
    channel_id: indexed(bytes32)
    to_ev: uint256
    to_cs: uint256

event Credited:
    account: indexed(address)
    amount: uint256

# secp256k1 n // 2 (EIP-2 low-s bound), = 0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0
SECP256K1_HALF_N: constant(uint256) = 57896044618658097711785492504343953926418782139537452191302581570759080747168
DOMAIN_TYPEHASH: constant(bytes32) = keccak256(
    "EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)")
NAME_HASH: constant(bytes32) = keccak256("EvEdgeChannel")
VERSION_HASH: constant(bytes32) = keccak256("1")
STATE_TYPEHASH: constant(bytes32) = keccak256(
    "State(bytes32 channelId,uint256 nonce,uint256 tEv,uint256 tCs,uint256 wh,bool final)")
# No Terms hash to this (it would need a keccak256 preimage of 1).
SETTLED: constant(bytes32) = 0x0000000000000000000000000000000000000000000000000000000000000001
MASK64: constant(uint256) = 2**64 - 1
MASK128: constant(uint256) = 2**128 - 1
# Gas a token's transfer() may use per payout. A standard ERC-20 transfer to a fresh
# account costs ~30-55k (USDC-style proxies ~65k); a token that burns more is treated like
# one that refuses: the payout is credited. Without this bound a token can burn 63/64 of
# the gas and leave too little to finish settle at any gas limit (issue 14, griefing).
TRANSFER_GAS: constant(uint256) = 100_000
# Gas a payout must find left before its call: the stipend (the EVM forwards at most 63/64
# of what is left, EIP-150), the call itself, and a credit entry if the transfer fails. A
# caller who sends less gets "gas", never a credit instead of a payment.
PAY_GAS: constant(uint256) = TRANSFER_GAS + TRANSFER_GAS // 63 + 40_000

TOKEN: public(immutable(IERC20))
MIN_WINDOW: public(immutable(uint256))
MAX_WINDOW: public(immutable(uint256))

channels: public(HashMap[bytes32, bytes32])   # channel id -> keccak256(Terms) | SETTLED
deposits: public(HashMap[bytes32, uint256])   # dep_ev << 128 | dep_cs
closing: public(HashMap[bytes32, uint256])    # deadline << 192 | nonce << 128 | to_ev
credit: public(HashMap[address, uint256])     # payouts whose transfer failed (pull)


@deploy
def __init__(token: IERC20, min_window: uint256, max_window: uint256):
    assert min_window <= max_window and max_window < 2**32, "window bounds"
    TOKEN = token
    MIN_WINDOW = min_window
    MAX_WINDOW = max_window


@external
@view
def read(channel_id: bytes32) -> (bytes32, uint256, uint256):
    """All three slots of a channel in one call (clients, watchtowers)."""
    return self.channels[channel_id], self.deposits[channel_id], self.closing[channel_id]


@internal
@view
def _load(channel_id: bytes32, terms: Terms):
    # The caller's Terms must be the stored ones (this also rejects unknown and settled ids).
    assert self.channels[channel_id] == keccak256(abi_encode(terms)), "record"


@internal
def _pull(sender: address, amount: uint256):
    if amount > 0:
        assert extcall TOKEN.transferFrom(sender, self, amount, default_return_value=True), "transferFrom"


@internal
@view
def _digest(channel_id: bytes32, s: State) -> bytes32:
    domain: bytes32 = keccak256(abi_encode(DOMAIN_TYPEHASH, NAME_HASH, VERSION_HASH, chain.id, self))
    struct_hash: bytes32 = keccak256(abi_encode(
        STATE_TYPEHASH, channel_id, s.nonce, s.t_ev, s.t_cs, s.wh, s.final))
    return keccak256(concat(b"\x19\x01", domain, struct_hash))


@internal
@pure
def _check_sig(digest: bytes32, sig: Bytes[65], signer: address):
    assert len(sig) == 65, "sig length"
    r: uint256 = convert(extract32(sig, 0), uint256)
    s: uint256 = convert(extract32(sig, 32), uint256)
    v: uint256 = convert(slice(sig, 64, 1), uint256)
    # EIP-2: high s is the malleated twin of a valid signature; reject it.
    assert r != 0 and s != 0 and s <= SECP256K1_HALF_N, "sig range"
    assert v == 27 or v == 28, "sig v"
    recovered: address = ecrecover(digest, v, r, s)
    assert recovered != empty(address) and recovered == signer, "signer"


@internal
@pure
def _to_ev(dep_ev: uint256, dep_cs: uint256, t_ev: uint256, t_cs: uint256) -> uint256:
    # The EV's payout dep_ev - t_ev + t_cs; both payouts in [0, total]. Written on the net
    # flow so no intermediate can overflow (the two payouts always add up to the total).
    if t_ev >= t_cs:
        net: uint256 = t_ev - t_cs
        assert net <= dep_ev, "balance"
        return dep_ev - net
    net: uint256 = t_cs - t_ev
    assert net <= dep_cs, "balance"
    return dep_ev + net


@internal
def _check_state(channel_id: bytes32, terms: Terms, s: State, sig_ev: Bytes[65],
                 sig_cs: Bytes[65]) -> uint256:
    """Both signatures and the balances; returns the EV's payout under ``s``."""
    digest: bytes32 = self._digest(channel_id, s)
    self._check_sig(digest, sig_ev, terms.ev)
    self._check_sig(digest, sig_cs, terms.cs)
    deps: uint256 = self.deposits[channel_id]
    return self._to_ev(deps >> 128, deps & MASK128, s.t_ev, s.t_cs)


@internal
def _transfer(to: address, amount: uint256) -> bool:
    """TOKEN.transfer with a fixed gas stipend; False if it reverts, returns false or
    runs out of the stipend."""
    assert msg.gas >= PAY_GAS, "gas"
    ok: bool = False
    res: Bytes[32] = b""
    ok, res = raw_call(
        TOKEN.address, abi_encode(to, amount, method_id=method_id("transfer(address,uint256)")),
        max_outsize=32, gas=TRANSFER_GAS, revert_on_failure=False)
    if ok and len(res) > 0:
        return convert(res, bool)
    # An empty answer is success only from a token that exists (a call to an address
    # without code "succeeds" too); TOKEN is warm here, so this costs 100 gas.
    return ok and TOKEN.address.is_contract


@internal
def _pay(to: address, amount: uint256):
    # Never revert here on the token's account (settle must not): a payout whose transfer
    # fails is credited for withdraw() instead. State is final before this is reached (CEI).
    if amount > 0 and not self._transfer(to, amount):
        self.credit[to] += amount
        log Credited(account=to, amount=amount)


@internal
def _payout(channel_id: bytes32, terms: Terms, to_ev: uint256):
    deps: uint256 = self.deposits[channel_id]
    to_cs: uint256 = (deps >> 128) + (deps & MASK128) - to_ev
    self.channels[channel_id] = SETTLED
    self.deposits[channel_id] = 0
    self.closing[channel_id] = 0
    log Settled(channel_id=channel_id, to_ev=to_ev, to_cs=to_cs)
    self._pay(terms.ev, to_ev)
    self._pay(terms.cs, to_cs)


@internal
def _set_closing(channel_id: bytes32, deadline: uint256, s: State, to_ev: uint256):
    assert s.nonce <= MASK64, "nonce"
    self.closing[channel_id] = (deadline << 192) | (s.nonce << 128) | to_ev
    log Closing(channel_id=channel_id, nonce=s.nonce, t_ev=s.t_ev, t_cs=s.t_cs,
                deadline=deadline)


@external
def open(ev: address, cs: address, salt: bytes32, window: uint256, amount: uint256) -> bytes32:
    """Open a channel and deposit ``amount`` for the caller (ev or cs)."""
    assert ev != empty(address) and cs != empty(address) and ev != cs, "parties"
    assert msg.sender == ev or msg.sender == cs, "not a party"
    assert MIN_WINDOW <= window and window <= MAX_WINDOW, "window"
    assert amount <= MASK128, "deposit"
    channel_id: bytes32 = keccak256(abi_encode(chain.id, self, ev, cs, salt))
    assert self.channels[channel_id] == empty(bytes32), "channel id used"
    self.channels[channel_id] = keccak256(abi_encode(Terms(ev=ev, cs=cs, window=window)))
    log Opened(channel_id=channel_id, ev=ev, cs=cs, window=window)
    if amount > 0:
        dep_ev: uint256 = 0
        dep_cs: uint256 = 0
        if msg.sender == ev:
            dep_ev = amount
        else:
            dep_cs = amount
        self.deposits[channel_id] = (dep_ev << 128) | dep_cs
        log Deposited(channel_id=channel_id, dep_ev=dep_ev, dep_cs=dep_cs)
        self._pull(msg.sender, amount)
    return channel_id


@external
def deposit(channel_id: bytes32, terms: Terms, amount: uint256):
    """Add ``amount`` to the caller's deposit of an open channel."""
    self._load(channel_id, terms)
    assert self.closing[channel_id] == 0, "not open"
    deps: uint256 = self.deposits[channel_id]
    dep_ev: uint256 = deps >> 128
    dep_cs: uint256 = deps & MASK128
    if msg.sender == terms.ev:
        dep_ev += amount
    elif msg.sender == terms.cs:
        dep_cs += amount
    else:
        raise "not a party"
    assert dep_ev + dep_cs <= MASK128, "deposit"
    self.deposits[channel_id] = (dep_ev << 128) | dep_cs
    log Deposited(channel_id=channel_id, dep_ev=dep_ev, dep_cs=dep_cs)
    self._pull(msg.sender, amount)


@external
def coopClose(channel_id: bytes32, terms: Terms, s: State, sig_ev: Bytes[65], sig_cs: Bytes[65]):
    """Settle at once with a final state signed by both (anyone may submit it)."""
    self._load(channel_id, terms)
    assert s.final, "not final"
    c: uint256 = self.closing[channel_id]
    if c != 0:
        assert block.timestamp <= c >> 192 and s.nonce > (c >> 128) & MASK64, "closing"
    self._payout(channel_id, terms, self._check_state(channel_id, terms, s, sig_ev, sig_cs))


@external
def close(channel_id: bytes32, terms: Terms, s: State, sig_ev: Bytes[65], sig_cs: Bytes[65]):
    """Start the dispute window with the latest co-signed state (caller: ev or cs)."""
    self._load(channel_id, terms)
    assert self.closing[channel_id] == 0, "not open"
    assert msg.sender == terms.ev or msg.sender == terms.cs, "not a party"
    to_ev: uint256 = 0
    if s.nonce == 0:
        # The initial state (nothing paid) is agreed by opening; no signature needed, so a
        # party whose peer never signed anything can still get its deposit back.
        assert s.t_ev == 0 and s.t_cs == 0, "initial state"
        to_ev = self.deposits[channel_id] >> 128
    else:
        to_ev = self._check_state(channel_id, terms, s, sig_ev, sig_cs)
    self._set_closing(channel_id, block.timestamp + terms.window, s, to_ev)


@external
def challenge(channel_id: bytes32, terms: Terms, s: State, sig_ev: Bytes[65], sig_cs: Bytes[65]):
    """Replace the closing state with a newer co-signed one (anyone: watchtower). Names no
    earlier state: whatever landed before it, a higher nonce wins."""
    self._load(channel_id, terms)
    c: uint256 = self.closing[channel_id]
    deadline: uint256 = c >> 192
    assert c != 0 and block.timestamp <= deadline, "not in window"
    assert s.nonce > (c >> 128) & MASK64, "stale"
    self._set_closing(channel_id, deadline, s,
                      self._check_state(channel_id, terms, s, sig_ev, sig_cs))


@external
def settle(channel_id: bytes32, terms: Terms):
    """Pay out a closing channel after its window (anyone). Balances were checked when the
    state was accepted and deposits cannot change while closing, so nothing here reverts
    (given PAY_GAS per payout)."""
    self._load(channel_id, terms)
    c: uint256 = self.closing[channel_id]
    assert c != 0 and block.timestamp > c >> 192, "window"
    self._payout(channel_id, terms, c & MASK128)


@external
def withdraw():
    """Pull a payout whose transfer failed at settle (same gas stipend; a transfer that
    fails again reverts and leaves the credit in place)."""
    amount: uint256 = self.credit[msg.sender]
    assert amount > 0, "nothing to withdraw"
    self.credit[msg.sender] = 0
    assert self._transfer(msg.sender, amount), "transfer"
