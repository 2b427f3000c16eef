"""Authenticated hand-off of a co-signed state from a channel party to a watchtower. Sans-I/O.

A tower must never hold a state it cannot verify, and only the channel's two parties may
give it states (issue 14, "watchtower poisoning"). A hand-off carries what the tower needs
to check everything offline, before it ever talks to the chain:

    {1: SignedState item (model.py), 2: ev address, 3: cs address, 4: salt (32 B),
     5: by (address of the party handing off: ev or cs), 6: sig (65 B, secp256k1 by ``by``)}

in deterministic CBOR. The checks (``Handoff.verify``), each a reason code:

- the state is for the tower's chain and contract (``state-foreign``);
- keccak256(abi.encode(chainId, contract, ev, cs, salt)) is the state's channel id: the
  contract derives ids the same way, so ev and cs ARE the channel's parties
  (``handoff-wrong-channel``);
- ``by`` is ev or cs (``handoff-not-a-party``) and ``sig`` is its signature over the
  hand-off digest (``wrong-signer`` / the signature reasons of state.recover_signer);
- both state signatures recover ev and cs over the EIP-712 digest the contract recovers,
  and the nonce fits the contract's 64 bits (model.SignedState.check_signatures).

Hand-off digest: keccak256(dCBOR([b"evedge/v1/tower-handoff", chain_id, contract,
channel_id, state digest, ev, cs, salt])). Its preimage starts with a CBOR array head (0x88),
never 0x19 (EIP-191/712) nor 0x02 (EIP-1559 transactions), so a hand-off signature can never
be replayed as a state or a transaction signature, nor one of those as a hand-off.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent import dcbor
from agent.channel.state import derive_channel_id, keccak, recover_signer
from agent.errors import BadSignature, ChannelError, MalformedEnvelope
from agent.settlement.model import SIG_LEN, SignedState
from agent.settlement.txsign import DigestSigner

HANDOFF_DOMAIN = b"evedge/v1/tower-handoff"
MAX_HANDOFF_BYTES = 1024


@dataclass(frozen=True, slots=True)
class Handoff:
    signed: SignedState
    ev: bytes
    cs: bytes
    salt: bytes
    by: bytes
    sig: bytes

    def __post_init__(self) -> None:
        for name, size in (("ev", 20), ("cs", 20), ("salt", 32), ("by", 20), ("sig", SIG_LEN)):
            value = getattr(self, name)
            if not isinstance(value, bytes) or len(value) != size:
                raise ValueError(f"hand-off {name} must be {size} bytes")

    @classmethod
    def make(cls, signed: SignedState, ev: bytes, cs: bytes, salt: bytes,
             key: DigestSigner) -> Handoff:
        """Hand ``signed`` off, signed by ``key`` (the settlement key of ev or cs)."""
        unsigned = cls(signed, ev, cs, salt, key.address, bytes(SIG_LEN))
        return cls(signed, ev, cs, salt, key.address, key.sign_digest(unsigned.digest()))

    @property
    def channel_id(self) -> bytes:
        return self.signed.state.channel_id

    def digest(self) -> bytes:
        state = self.signed.state
        return keccak(dcbor.dumps([HANDOFF_DOMAIN, state.chain_id, state.contract,
                                   state.channel_id, state.digest(), self.ev, self.cs,
                                   self.salt]))

    def verify(self, chain_id: int, contract: bytes) -> None:
        """Return if a tower on (chain_id, contract) may keep this state; raise ChannelError
        or BadSignature (with a reason code) otherwise."""
        state = self.signed.state
        if state.chain_id != chain_id or state.contract != contract:
            raise ChannelError("state for another chain or contract", reason="state-foreign")
        if derive_channel_id(chain_id, contract, self.ev, self.cs, self.salt) != state.channel_id:
            raise ChannelError("parties and salt do not derive the state's channel id",
                               reason="handoff-wrong-channel")
        if self.by not in (self.ev, self.cs):
            raise ChannelError("handed off by someone who is not a party",
                               reason="handoff-not-a-party")
        if recover_signer(self.digest(), self.sig) != self.by:
            raise BadSignature("hand-off not signed by its sender", reason="wrong-signer")
        self.signed.check_signatures(self.ev, self.cs)

    def encode(self) -> bytes:
        return dcbor.dumps({1: self.signed.to_cbor_item(), 2: self.ev, 3: self.cs,
                            4: self.salt, 5: self.by, 6: self.sig})

    @classmethod
    def decode(cls, data: bytes) -> Handoff:
        item = dcbor.loads(data, max_bytes=MAX_HANDOFF_BYTES)
        if not isinstance(item, dict) or set(item) != {1, 2, 3, 4, 5, 6}:
            raise MalformedEnvelope("a hand-off is a map with keys 1..6",
                                    reason="malformed-handoff")
        signed = SignedState.from_cbor_item(item[1])
        try:
            return cls(signed, item[2], item[3], item[4], item[5], item[6])
        except ValueError as exc:
            raise MalformedEnvelope(str(exc), reason="malformed-handoff") from None
