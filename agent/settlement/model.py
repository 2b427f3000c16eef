"""Values the settlement layer passes around. Sans-I/O (no web3 here).

``ChannelRecord`` is a channel as the contract (agent/settlement/channel.vy) holds it in its
three slots: keccak256 of the Terms (ev, cs, window: passed back by callers), the packed
deposits, and the packed closing state; the ``Opened`` and ``Closing`` logs fill in what the
slots only hash or fold (the addresses, t_ev and t_cs).

``SignedState`` is a co-signed channel state as it travels to the settlement layer (the
channel session's final state, a state delegated to a watchtower), in deterministic CBOR::

    {1: ChannelState item (agent/channel/state.py), 2: sig_ev (65 B), 3: sig_cs (65 B)}
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from agent import dcbor
from agent.channel.state import (
    MAX_NONCE,
    ChannelState,
    abi_encode_static,
    check_balances,
    keccak,
    recover_signer,
)
from agent.errors import BadSignature, ChannelError, MalformedEnvelope

SIG_LEN = 65
MASK128 = (1 << 128) - 1
MAX_TOTAL_DEPOSIT = MASK128   # the contract packs both deposits and a payout in 128 bits


class Status(enum.Enum):
    UNKNOWN = "unknown"      # no such channel on this contract
    OPEN = "open"
    CLOSING = "closing"      # unilateral close seen; dispute window running
    SETTLED = "settled"


@dataclass(frozen=True, slots=True)
class ChannelRecord:
    """A channel as the contract holds it: its Terms (ev, cs, window), the deposits, and
    while closing the deadline and the closing state (nonce, t_ev, t_cs; the contract
    stores only the EV's payout, ``to_ev``, and logs t_ev and t_cs in ``Closing``)."""

    ev: bytes
    cs: bytes
    dep_ev: int
    dep_cs: int
    window: int
    deadline: int = 0
    nonce: int = 0
    t_ev: int = 0
    t_cs: int = 0

    def terms_tuple(self) -> tuple[str, str, int]:
        """The ABI tuple of the contract's ``Terms`` struct (what callers pass back)."""
        return ("0x" + self.ev.hex(), "0x" + self.cs.hex(), self.window)

    def terms_hash(self) -> bytes:
        """``channels[id]`` on the contract: keccak256(abi.encode(Terms))."""
        return keccak(abi_encode_static(self.ev, self.cs, self.window))

    def packed_deposits(self) -> int:
        """``deposits[id]``: dep_ev << 128 | dep_cs."""
        return self.dep_ev << 128 | self.dep_cs

    def packed_closing(self) -> int:
        """``closing[id]``: deadline << 192 | nonce << 128 | to_ev; 0 while open."""
        if self.deadline == 0:
            return 0
        return self.deadline << 192 | self.nonce << 128 | self.to_ev

    @property
    def total(self) -> int:
        return self.dep_ev + self.dep_cs

    @property
    def to_ev(self) -> int:
        """The EV's payout under the closing state (the station's is ``total - to_ev``)."""
        return self.dep_ev - self.t_ev + self.t_cs


def unpack_deposits(word: int) -> tuple[int, int]:
    return word >> 128, word & MASK128


def unpack_closing(word: int) -> tuple[int, int, int]:
    """(deadline, nonce, to_ev) of a ``closing[id]`` word."""
    return word >> 192, (word >> 128) & MAX_NONCE, word & MASK128


@dataclass(frozen=True, slots=True)
class SignedState:
    state: ChannelState
    sig_ev: bytes
    sig_cs: bytes

    def __post_init__(self) -> None:
        for name in ("sig_ev", "sig_cs"):
            value = getattr(self, name)
            if not isinstance(value, bytes) or len(value) != SIG_LEN:
                raise ValueError(f"{name} must be {SIG_LEN} bytes")

    def check_signatures(self, ev: bytes, cs: bytes) -> None:
        """Raise BadSignature unless ``ev`` and ``cs`` both signed exactly the digest the
        contract recovers (agent/channel/state.py), or ChannelError(nonce-out-of-range)
        for a nonce the contract cannot store."""
        if self.state.nonce > MAX_NONCE:
            raise ChannelError("nonce above 2**64 - 1", reason="nonce-out-of-range",
                               nonce=self.state.nonce)
        digest = self.state.digest()
        for sig, signer in ((self.sig_ev, ev), (self.sig_cs, cs)):
            if recover_signer(digest, sig) != signer:
                raise BadSignature("state signed by another key", reason="wrong-signer")

    def check(self, ev: bytes, cs: bytes, dep_ev: int, dep_cs: int) -> None:
        """Raise BadSignature / ChannelError unless the contract would accept this state."""
        self.check_signatures(ev, cs)
        check_balances(self.state, dep_ev, dep_cs)

    def to_cbor_item(self) -> dict[int, object]:
        return {1: self.state.to_cbor_item(), 2: self.sig_ev, 3: self.sig_cs}

    def encode(self) -> bytes:
        return dcbor.dumps(self.to_cbor_item())

    @classmethod
    def from_cbor_item(cls, item: object) -> SignedState:
        if not isinstance(item, dict) or set(item) != {1, 2, 3}:
            raise MalformedEnvelope("a signed state is a map with keys 1..3",
                                    reason="malformed-signed-state")
        state = ChannelState.from_cbor_item(item[1])
        try:
            return cls(state, item[2], item[3])
        except ValueError as exc:
            raise MalformedEnvelope(str(exc), reason="malformed-signed-state") from None

    @classmethod
    def decode(cls, data: bytes) -> SignedState:
        return cls.from_cbor_item(dcbor.loads(data, max_bytes=1024))


@dataclass(frozen=True, slots=True)
class TxResult:
    """A mined, confirmed transaction."""

    tx_hash: bytes
    gas_used: int
    block_number: int
    block_timestamp: int
