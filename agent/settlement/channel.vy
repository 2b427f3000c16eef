# pragma version 0.4.3
# @license Apache-2.0
"""
@title EvEdgeChannel: bidirectional EV <-> station payment channels over one ERC-20 token
@notice DESIGN s6. Rules (the reference adjudicator agent/settlement/adjudicator.py has the
        same ones, and the tests run both side by side on generated traces):

        open       ev or cs opens with its own deposit; id = keccak256(abi.encode(chainId,
                   this, ev, cs, salt)); an id is used once, ever (a settled channel keeps
                   a SETTLED marker, so old states can never be replayed on a new channel).
        deposit    ev or cs adds to its own deposit while the channel is open.
        coopClose  a state with final = true signed by both settles at once (open channel,
                   or a closing one before its deadline with a higher nonce).
        close      ev or cs starts the dispute window with a co-signed state (or the initial
                   state: nonce 0, nothing paid, which needs no signature).
        challenge  anyone (a watchtower) replaces the closing state with a co-signed state of
                   a higher nonce while block.timestamp <= deadline.
        settle     anyone, once block.timestamp > deadline; never reverts for a closing
                   channel: a token transfer that fails is credited for withdraw() instead.

        A state is checked exactly as agent/channel/state.py signs it: EIP-712 digest over
        domain EvEdgeChannel/1/chainId/this and State(bytes32 channelId,uint256 nonce,
        uint256 tEv,uint256 tCs,uint256 wh,bool final); 65-byte r||s||v signatures with
        v in {27, 28} and s <= n/2 (EIP-2); balances dep_ev - t_ev + t_cs and
        dep_cs + t_ev - t_cs must each lie in [0, dep_ev + dep_cs].

        Storage: one slot per channel holding keccak256 of its Record (gas: one SSTORE
        instead of nine). Callers pass the Record back; every change emits it in RecordSet,
        so any node's logs rebuild it.
"""

from ethereum.ercs import IERC20

struct Record:
    ev: address
    cs: address
    dep_ev: uint256
    dep_cs: uint256
    window: uint256      # dispute window, seconds
    deadline: uint256    # 0 while open; after close: last second a challenge is accepted
    nonce: uint256       # nonce of the closing state
    t_ev: uint256
    t_cs: uint256

struct State:
    nonce: uint256
    t_ev: uint256
    t_cs: uint256
    wh: uint256
    final: bool

event RecordSet:
    channel_id: indexed(bytes32)
    record: Record

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
# No Record hashes to this (it would need a keccak256 preimage of 1).
SETTLED: constant(bytes32) = 0x0000000000000000000000000000000000000000000000000000000000000001

TOKEN: public(immutable(IERC20))
MIN_WINDOW: public(immutable(uint256))
MAX_WINDOW: public(immutable(uint256))

channels: public(HashMap[bytes32, bytes32])   # channel id -> keccak256(Record) | SETTLED
credit: public(HashMap[address, uint256])     # payouts whose transfer failed (pull)


@deploy
def __init__(token: IERC20, min_window: uint256, max_window: uint256):
    assert min_window <= max_window, "window bounds"
    TOKEN = token
    MIN_WINDOW = min_window
    MAX_WINDOW = max_window


@internal
@pure
def _hash(rec: Record) -> bytes32:
    return keccak256(abi_encode(rec))


@internal
@view
def _load(channel_id: bytes32, rec: Record):
    # The caller's Record must be the stored one (this also rejects unknown and settled ids).
    assert self.channels[channel_id] == self._hash(rec), "record"


@internal
def _store(channel_id: bytes32, rec: Record):
    self.channels[channel_id] = self._hash(rec)
    log RecordSet(channel_id=channel_id, record=rec)


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
def _balances(rec: Record, t_ev: uint256, t_cs: uint256) -> (uint256, uint256):
    # dep_ev - t_ev + t_cs and dep_cs + t_ev - t_cs, each in [0, total]; written on the net
    # flow so no intermediate can overflow (their sum is always the total).
    if t_ev >= t_cs:
        net: uint256 = t_ev - t_cs
        assert net <= rec.dep_ev, "balance"
        return rec.dep_ev - net, rec.dep_cs + net
    net: uint256 = t_cs - t_ev
    assert net <= rec.dep_cs, "balance"
    return rec.dep_ev + net, rec.dep_cs - net


@internal
def _check_state(channel_id: bytes32, rec: Record, s: State, sig_ev: Bytes[65], sig_cs: Bytes[65]):
    digest: bytes32 = self._digest(channel_id, s)
    self._check_sig(digest, sig_ev, rec.ev)
    self._check_sig(digest, sig_cs, rec.cs)
    self._balances(rec, s.t_ev, s.t_cs)


@internal
def _pay(to: address, amount: uint256):
    # Never revert here (settle must not): a transfer that reverts or returns false is
    # credited for withdraw() instead. State is final before this is reached (CEI).
    if amount == 0:
        return
    ok: bool = False
    res: Bytes[32] = b""
    ok, res = raw_call(
        TOKEN.address, abi_encode(to, amount, method_id=method_id("transfer(address,uint256)")),
        max_outsize=32, revert_on_failure=False)
    if ok and len(res) > 0:
        ok = convert(res, bool)
    elif ok:
        # An empty answer is success only from a token that exists (a call to an address
        # without code "succeeds" too); TOKEN is warm here, so this costs 100 gas.
        ok = TOKEN.address.is_contract
    if not ok:
        self.credit[to] += amount
        log Credited(account=to, amount=amount)


@internal
def _payout(channel_id: bytes32, rec: Record, t_ev: uint256, t_cs: uint256):
    to_ev: uint256 = 0
    to_cs: uint256 = 0
    to_ev, to_cs = self._balances(rec, t_ev, t_cs)
    self.channels[channel_id] = SETTLED
    log Settled(channel_id=channel_id, to_ev=to_ev, to_cs=to_cs)
    self._pay(rec.ev, to_ev)
    self._pay(rec.cs, to_cs)


@external
def open(ev: address, cs: address, salt: bytes32, window: uint256, amount: uint256) -> bytes32:
    """Open a channel and deposit ``amount`` for the caller (ev or cs)."""
    assert ev != empty(address) and cs != empty(address) and ev != cs, "parties"
    assert msg.sender == ev or msg.sender == cs, "not a party"
    assert MIN_WINDOW <= window and window <= MAX_WINDOW, "window"
    channel_id: bytes32 = keccak256(abi_encode(chain.id, self, ev, cs, salt))
    assert self.channels[channel_id] == empty(bytes32), "channel id used"
    rec: Record = Record(ev=ev, cs=cs, dep_ev=0, dep_cs=0, window=window, deadline=0,
                         nonce=0, t_ev=0, t_cs=0)
    if msg.sender == ev:
        rec.dep_ev = amount
    else:
        rec.dep_cs = amount
    self._store(channel_id, rec)
    self._pull(msg.sender, amount)
    return channel_id


@external
def deposit(channel_id: bytes32, rec: Record, amount: uint256):
    """Add ``amount`` to the caller's deposit of an open channel."""
    self._load(channel_id, rec)
    assert rec.deadline == 0, "not open"
    new: Record = rec
    if msg.sender == rec.ev:
        new.dep_ev += amount
    elif msg.sender == rec.cs:
        new.dep_cs += amount
    else:
        raise "not a party"
    self._store(channel_id, new)
    self._pull(msg.sender, amount)


@external
def coopClose(channel_id: bytes32, rec: Record, s: State, sig_ev: Bytes[65], sig_cs: Bytes[65]):
    """Settle at once with a final state signed by both (anyone may submit it)."""
    self._load(channel_id, rec)
    assert s.final, "not final"
    if rec.deadline != 0:
        assert block.timestamp <= rec.deadline and s.nonce > rec.nonce, "closing"
    self._check_state(channel_id, rec, s, sig_ev, sig_cs)
    self._payout(channel_id, rec, s.t_ev, s.t_cs)


@external
def close(channel_id: bytes32, rec: Record, s: State, sig_ev: Bytes[65], sig_cs: Bytes[65]):
    """Start the dispute window with the latest co-signed state (caller: ev or cs)."""
    self._load(channel_id, rec)
    assert rec.deadline == 0, "not open"
    assert msg.sender == rec.ev or msg.sender == rec.cs, "not a party"
    if s.nonce == 0:
        # The initial state (nothing paid) is agreed by opening; no signature needed, so a
        # party whose peer never signed anything can still get its deposit back.
        assert s.t_ev == 0 and s.t_cs == 0, "initial state"
    else:
        self._check_state(channel_id, rec, s, sig_ev, sig_cs)
    new: Record = rec
    new.deadline = block.timestamp + rec.window
    new.nonce = s.nonce
    new.t_ev = s.t_ev
    new.t_cs = s.t_cs
    self._store(channel_id, new)


@external
def challenge(channel_id: bytes32, rec: Record, s: State, sig_ev: Bytes[65], sig_cs: Bytes[65]):
    """Replace the closing state with a newer co-signed one (anyone: watchtower)."""
    self._load(channel_id, rec)
    assert rec.deadline != 0 and block.timestamp <= rec.deadline, "not in window"
    assert s.nonce > rec.nonce, "stale"
    self._check_state(channel_id, rec, s, sig_ev, sig_cs)
    new: Record = rec
    new.nonce = s.nonce
    new.t_ev = s.t_ev
    new.t_cs = s.t_cs
    self._store(channel_id, new)


@external
def settle(channel_id: bytes32, rec: Record):
    """Pay out a closing channel after its window (anyone). Balances were checked when the
    state was accepted and deposits cannot change while closing, so nothing here reverts."""
    self._load(channel_id, rec)
    assert rec.deadline != 0 and block.timestamp > rec.deadline, "window"
    self._payout(channel_id, rec, rec.t_ev, rec.t_cs)


@external
def withdraw():
    """Pull a payout whose transfer failed at settle."""
    amount: uint256 = self.credit[msg.sender]
    assert amount > 0, "nothing to withdraw"
    self.credit[msg.sender] = 0
    assert extcall TOKEN.transfer(msg.sender, amount, default_return_value=True), "transfer"
