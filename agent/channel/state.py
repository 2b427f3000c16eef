"""The channel state both parties co-sign, and what the contract checks. Sans-I/O.

This module is the contract between the channel protocol (agent/channel/protocol.py) and the
settlement contract (agent/settlement/): change both together.

State (DESIGN s5), deterministic CBOR with small integer keys::

    {0: version, 1: chain_id, 2: contract (20 B), 3: channel_id (32 B), 4: nonce,
     5: t_ev, 6: t_cs, 7: wh, 8: final}

``t_ev`` is what the vehicle has paid the station in total, ``t_cs`` what the station has
paid the vehicle (V2G); both only grow. ``wh`` is the cumulative metered energy the state
pays for (informative for the contract). Balances are derived from the deposits.

What the EVM verifies is secp256k1 over the EIP-712 typed-data digest (EIP-712 s"Specification")::

    EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)
      name = "EvEdgeChannel", version = "1"
    State(bytes32 channelId,uint256 nonce,uint256 tEv,uint256 tCs,uint256 wh,bool final)
    digest = keccak256(0x19 0x01 || domainSeparator || hashStruct(state))

The domain binds chain and contract, the struct binds the channel and the message type
(only ``State`` is ever signed with the settlement key), so a signature cannot be replayed
on another chain, contract, channel or type. Signatures are 65 bytes r || s || v with
v in {27, 28} and s in the lower half of the curve order (EIP-2): high-s is rejected.

Channel id = keccak256(abi.encode(uint256 chainId, address contract, address ev,
address cs, bytes32 salt)), so an id is never reused across chains, contracts or pairs.

The ABI encoding here is hand-written: every field is a static 32-byte word (Solidity ABI
spec, "Formal Specification of the Encoding"), which is five lines and keeps eth-abi and
web3 off the Pi.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from coincurve import PrivateKey, PublicKey
from Crypto.Hash import keccak as _keccak

from agent import dcbor
from agent.errors import BadSignature, ChannelError, MalformedEnvelope

STATE_VERSION = 1
UINT256_MAX = (1 << 256) - 1
# The highest nonce a state that starts or wins a dispute may carry: the contract packs it
# in 64 bits (agent/settlement/channel.vy, ``closing``). +1 per update never gets there, and
# the wire cannot carry more: a CBOR unsigned integer ends at 2**64 - 1 (RFC 8949 s3.1), so
# a peer's larger nonce is a malformed state and every co-signed state settles.
MAX_NONCE = (1 << 64) - 1
# secp256k1 group order n, and n/2 for the low-s rule (EIP-2).
SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
SECP256K1_HALF_N = SECP256K1_N // 2



def keccak(data: bytes) -> bytes:
    """Keccak-256 (Ethereum's, not SHA3-256). pycryptodome directly, the backend eth-hash
    uses: eth-hash's dispatch costs 12 of its 16 us a call, and every channel update
    hashes six times (struct hash, digest, signer address, on both sides)."""
    return _keccak.new(digest_bits=256, data=data).digest()


DOMAIN_NAME = "EvEdgeChannel"
DOMAIN_VERSION = "1"
DOMAIN_TYPEHASH = keccak(
    b"EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)")
STATE_TYPEHASH = keccak(
    b"State(bytes32 channelId,uint256 nonce,uint256 tEv,uint256 tCs,uint256 wh,bool final)")


def _word(value: int | bytes | bool) -> bytes:
    """One static ABI word: uint256, bool, address (left-padded) or bytes32."""
    if isinstance(value, bytes):
        return value.rjust(32, b"\0") if len(value) == 20 else value
    return int(value).to_bytes(32, "big")


def abi_encode_static(*values: int | bytes | bool) -> bytes:
    return b"".join(_word(v) for v in values)


@functools.lru_cache(maxsize=32)  # a channel asks for the same one every update
def domain_separator(chain_id: int, contract: bytes) -> bytes:
    return keccak(abi_encode_static(
        DOMAIN_TYPEHASH, keccak(DOMAIN_NAME.encode()), keccak(DOMAIN_VERSION.encode()),
        chain_id, contract))


def derive_channel_id(chain_id: int, contract: bytes, ev: bytes, cs: bytes, salt: bytes) -> bytes:
    """Channel id from chain, contract, both settlement addresses and a 32-byte salt."""
    for name, value, size in (("contract", contract, 20), ("ev", ev, 20), ("cs", cs, 20),
                              ("salt", salt, 32)):
        if not isinstance(value, bytes) or len(value) != size:
            raise ValueError(f"{name} must be {size} bytes")
    return keccak(abi_encode_static(chain_id, contract, ev, cs, salt))


@dataclass(frozen=True, slots=True)
class ChannelState:
    chain_id: int
    contract: bytes
    channel_id: bytes
    nonce: int
    t_ev: int
    t_cs: int
    wh: int
    final: bool = False
    version: int = STATE_VERSION

    def __post_init__(self) -> None:
        for name in ("chain_id", "nonce", "t_ev", "t_cs", "wh", "version"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= UINT256_MAX:
                raise ValueError(f"state {name} must be an integer in [0, 2**256)")
        if not isinstance(self.contract, bytes) or len(self.contract) != 20:
            raise ValueError("state contract must be a 20-byte address")
        if not isinstance(self.channel_id, bytes) or len(self.channel_id) != 32:
            raise ValueError("state channel_id must be 32 bytes")
        if not isinstance(self.final, bool):
            raise ValueError("state final must be a bool")

    def to_cbor_item(self) -> dict[int, object]:
        return {0: self.version, 1: self.chain_id, 2: self.contract, 3: self.channel_id,
                4: self.nonce, 5: self.t_ev, 6: self.t_cs, 7: self.wh, 8: self.final}

    def encode(self) -> bytes:
        return dcbor.dumps(self.to_cbor_item())

    @classmethod
    def from_cbor_item(cls, item: object) -> ChannelState:
        if not isinstance(item, dict) or set(item) != set(range(9)):
            raise MalformedEnvelope("a channel state is a map with keys 0..8",
                                    reason="malformed-state")
        if item[0] != STATE_VERSION:
            raise MalformedEnvelope(f"unknown state version {item[0]!r}", reason="state-version")
        try:
            return cls(chain_id=item[1], contract=item[2], channel_id=item[3], nonce=item[4],
                       t_ev=item[5], t_cs=item[6], wh=item[7], final=item[8])
        except ValueError as exc:
            raise MalformedEnvelope(str(exc), reason="malformed-state") from None

    @classmethod
    def decode(cls, data: bytes) -> ChannelState:
        return cls.from_cbor_item(dcbor.loads(data, max_bytes=512))

    def struct_hash(self) -> bytes:
        return keccak(abi_encode_static(STATE_TYPEHASH, self.channel_id, self.nonce, self.t_ev,
                                        self.t_cs, self.wh, self.final))

    def digest(self) -> bytes:
        """The EIP-712 digest the settlement keys sign and the contract recovers."""
        return keccak(b"\x19\x01" + domain_separator(self.chain_id, self.contract)
                      + self.struct_hash())


def eth_address(public_key: PublicKey | bytes) -> bytes:
    """20-byte Ethereum address of a secp256k1 public key (compressed or not)."""
    if isinstance(public_key, bytes):
        public_key = PublicKey(public_key)
    return keccak(public_key.format(compressed=False)[1:])[-20:]


def sign_digest(private_key: PrivateKey, digest: bytes) -> bytes:
    """65-byte r || s || v signature; libsecp256k1 always yields low s."""
    raw = private_key.sign_recoverable(digest, hasher=None)
    return raw[:64] + bytes([27 + raw[64]])


def recover_signer(digest: bytes, signature: bytes) -> bytes:
    """Address that made ``signature`` over ``digest``; BadSignature on any malformation,
    including high s (EIP-2), so a malleated copy of a valid signature never verifies."""
    if not isinstance(signature, bytes) or len(signature) != 65:
        raise BadSignature("settlement signature must be 65 bytes", reason="bad-sig-length")
    r = int.from_bytes(signature[:32], "big")
    s = int.from_bytes(signature[32:64], "big")
    v = signature[64]
    if not (0 < r < SECP256K1_N and 0 < s <= SECP256K1_HALF_N):
        raise BadSignature("settlement signature has r or s out of range (high s?)",
                           reason="malleated-signature")
    if v not in (27, 28):
        raise BadSignature("settlement signature v must be 27 or 28", reason="bad-sig-v")
    try:
        public = PublicKey.from_signature_and_message(
            signature[:64] + bytes([v - 27]), digest, hasher=None)
    except Exception as exc:  # coincurve raises plain Exception/ValueError on bad input
        raise BadSignature("settlement signature does not recover a key",
                           reason="bad-signature") from exc
    return eth_address(public)


def check_state_signature(state: ChannelState, signature: bytes, expected_signer: bytes) -> None:
    """Return if ``expected_signer`` signed ``state``; raise BadSignature otherwise."""
    if recover_signer(state.digest(), signature) != expected_signer:
        raise BadSignature("state signed by another key", reason="wrong-signer")


def check_balances(state: ChannelState, deposit_ev: int, deposit_cs: int) -> tuple[int, int]:
    """Derived balances (ev, cs); ChannelError if either leaves [0, total deposit]."""
    balance_ev = deposit_ev - state.t_ev + state.t_cs
    balance_cs = deposit_cs + state.t_ev - state.t_cs
    total = deposit_ev + deposit_cs
    if not (0 <= balance_ev <= total and 0 <= balance_cs <= total):
        raise ChannelError("balances leave the deposits", reason="balance-out-of-range",
                           nonce=state.nonce)
    return balance_ev, balance_cs
