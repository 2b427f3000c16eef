"""EIP-1559 transactions signed with a digest signer. Sans-I/O.

The settlement key (agent.keys.SettlementKey) only exposes ``address`` and
``sign_digest(digest) -> r || s || v`` (v in {27, 28}, low s), so the secret never leaves it:
this module builds the transaction, hashes it and assembles the signed bytes itself.

EIP-1559 / EIP-2718: the signed payload is ``0x02 || rlp([chainId, nonce,
maxPriorityFeePerGas, maxFeePerGas, gas, to, value, data, accessList])`` and the transaction is
``0x02 || rlp([..., yParity, r, s])``; its hash is keccak256 of those bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import rlp

from agent.channel.state import keccak


class DigestSigner(Protocol):
    """What the settlement layer needs of a key: agent.keys.SettlementKey is one."""

    @property
    def address(self) -> bytes: ...

    def sign_digest(self, digest: bytes) -> bytes: ...


@dataclass(frozen=True, slots=True)
class Tx:
    chain_id: int
    nonce: int
    max_priority_fee: int
    max_fee: int
    gas: int
    to: bytes | None          # None deploys a contract
    value: int
    data: bytes

    def _fields(self) -> list[object]:
        return [self.chain_id, self.nonce, self.max_priority_fee, self.max_fee, self.gas,
                self.to or b"", self.value, self.data, []]

    def signing_hash(self) -> bytes:
        return keccak(b"\x02" + rlp.encode(self._fields()))

    def sign(self, signer: DigestSigner) -> bytes:
        """The raw signed transaction for eth_sendRawTransaction."""
        sig = signer.sign_digest(self.signing_hash())
        r, s, v = int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:64], "big"), sig[64]
        encoded: bytes = rlp.encode(self._fields() + [v - 27, r, s])  # rlp has no types
        return b"\x02" + encoded


def tx_hash(raw: bytes) -> bytes:
    return keccak(raw)


def contract_address(sender: bytes, nonce: int) -> bytes:
    """Address of a contract created by ``sender`` at ``nonce`` (Yellow Paper eq. 86)."""
    return keccak(rlp.encode([sender, nonce]))[12:]
