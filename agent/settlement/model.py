"""Values the settlement layer passes around. Sans-I/O (no web3 here).

``ChannelRecord`` mirrors the contract's ``Record`` struct (agent/settlement/channel.vy): the
contract stores only keccak256(abi.encode(record)) per channel, so whoever calls it passes the
record back; ``RecordSet`` logs carry every version of it.

``SignedState`` is a co-signed channel state as it travels to the settlement layer (the
channel session's final state, a state delegated to a watchtower), in deterministic CBOR::

    {1: ChannelState item (agent/channel/state.py), 2: sig_ev (65 B), 3: sig_cs (65 B)}
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from agent import dcbor
from agent.channel.state import (
    ChannelState,
    abi_encode_static,
    check_balances,
    check_state_signature,
    keccak,
)
from agent.errors import MalformedEnvelope

SIG_LEN = 65


class Status(enum.Enum):
    UNKNOWN = "unknown"      # no such channel on this contract
    OPEN = "open"
    CLOSING = "closing"      # unilateral close seen; dispute window running
    SETTLED = "settled"


@dataclass(frozen=True, slots=True)
class ChannelRecord:
    ev: bytes
    cs: bytes
    dep_ev: int
    dep_cs: int
    window: int
    deadline: int = 0
    nonce: int = 0
    t_ev: int = 0
    t_cs: int = 0

    def as_tuple(self) -> tuple[str, str, int, int, int, int, int, int, int]:
        """The ABI tuple web3 expects for the contract's ``Record`` struct."""
        return ("0x" + self.ev.hex(), "0x" + self.cs.hex(), self.dep_ev, self.dep_cs,
                self.window, self.deadline, self.nonce, self.t_ev, self.t_cs)

    @classmethod
    def from_tuple(cls, values: tuple | list) -> ChannelRecord:  # type: ignore[type-arg]
        ev, cs, *rest = values
        return cls(_addr(ev), _addr(cs), *(int(v) for v in rest))

    def hash(self) -> bytes:
        """What the contract stores: keccak256(abi.encode(record)), all static words."""
        return keccak(abi_encode_static(self.ev, self.cs, self.dep_ev, self.dep_cs, self.window,
                                        self.deadline, self.nonce, self.t_ev, self.t_cs))

    @property
    def total(self) -> int:
        return self.dep_ev + self.dep_cs


def _addr(value: str | bytes) -> bytes:
    if isinstance(value, str):
        return bytes.fromhex(value.removeprefix("0x"))
    return bytes(value)


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

    def check(self, ev: bytes, cs: bytes, dep_ev: int, dep_cs: int) -> None:
        """Raise BadSignature / ChannelError unless the contract would accept this state."""
        check_state_signature(self.state, self.sig_ev, ev)
        check_state_signature(self.state, self.sig_cs, cs)
        check_balances(self.state, dep_ev, dep_cs)

    def encode(self) -> bytes:
        return dcbor.dumps({1: self.state.to_cbor_item(), 2: self.sig_ev, 3: self.sig_cs})

    @classmethod
    def decode(cls, data: bytes) -> SignedState:
        item = dcbor.loads(data, max_bytes=1024)
        if not isinstance(item, dict) or set(item) != {1, 2, 3}:
            raise MalformedEnvelope("a signed state is a map with keys 1..3",
                                    reason="malformed-signed-state")
        state = ChannelState.from_cbor_item(item[1])
        try:
            return cls(state, item[2], item[3])  # type: ignore[arg-type]
        except ValueError as exc:
            raise MalformedEnvelope(str(exc), reason="malformed-signed-state") from None


@dataclass(frozen=True, slots=True)
class TxResult:
    """A mined, confirmed transaction."""

    tx_hash: bytes
    gas_used: int
    block_number: int
    block_timestamp: int
