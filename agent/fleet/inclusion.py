"""Proof that an anchoring transaction is in a block, checked offline. Sans-I/O.

What the logbook carries for each anchored root (``make_inclusion`` builds it from what
the node returned when the transaction was mined; ``check_inclusion`` verifies it)::

    {"header": bstr,        # the block header, RLP, exactly as hashed (Yellow Paper s4.3)
     "index": uint,         # the transaction's index in the block
     "receipt": bstr,       # its receipt, consensus encoding (EIP-2718 typed: type || rlp)
     "nodes": [bstr, ...]}  # the receipts-trie path from receiptsRoot to rlp(index), RLP

Offline, with no node, ``check_inclusion`` proves: the block whose hash is
keccak256(header) (number N, timestamp T) holds, at ``index``, a successful transaction
whose receipt logs ``Anchored(submitter, root, ...)`` from the anchor contract: the
receipt hangs under the header's receiptsRoot (a Merkle-Patricia proof) and the header
hashes to the block hash. What it CANNOT prove offline: that this block is part of the
canonical chain of the chain id the bundle names (anyone can write a header with a
receiptsRoot of their choosing; consensus is what makes one real). That takes one look-up
of block N's hash on any node or explorer of that chain, which the verifier prints for the
reader, or a light client. Nor does the header say which chain it belongs to.

Hand-written: the header's field order (every fork adds fields at the end) and the receipt
encoding; the trie proof itself is py-trie's (HexaryTrie, the one py-evm uses), RLP is
pyrlp's. No maintained library turns a JSON-RPC block into its hashed header.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import rlp
from trie import exceptions as trie_errors
from trie.hexary import HexaryTrie

from agent.channel.state import keccak
from agent.errors import MalformedEnvelope

ANCHORED_TOPIC = keccak(b"Anchored(address,bytes32,uint256,uint64,uint64)")
# The header's fields in the order they are hashed; the optional tail grows fork by fork
# (London baseFee, Shanghai withdrawals, Cancun blobs and beacon root, Prague requests).
_BASE_FIELDS = ("parentHash", "sha3Uncles", "miner", "stateRoot", "transactionsRoot",
                "receiptsRoot", "logsBloom", "difficulty", "number", "gasLimit", "gasUsed",
                "timestamp", "extraData", "mixHash", "nonce")
_FORK_FIELDS = ("baseFeePerGas", "withdrawalsRoot", "blobGasUsed", "excessBlobGas",
                "parentBeaconBlockRoot", "requestsHash")
_INT_FIELDS = {"difficulty", "number", "gasLimit", "gasUsed", "timestamp", "baseFeePerGas",
               "blobGasUsed", "excessBlobGas"}
RECEIPTS_ROOT, NUMBER, TIMESTAMP = 5, 8, 11
# what py-trie raises for a proof that does not hold (found by the property test)
_TRIE_ERRORS = (trie_errors.BadTrieProof, trie_errors.ValidationError,
                trie_errors.InvalidNode, trie_errors.InvalidNibbles,
                trie_errors.MissingTrieNode, trie_errors.MissingTraversalNode,
                trie_errors.TraversedPartialPath)


@dataclass(frozen=True, slots=True)
class Anchoring:
    """What an inclusion proof established."""

    block_number: int
    block_hash: bytes
    timestamp: int
    submitter: bytes
    leaves: int


def _value(block: Mapping[str, Any], name: str) -> object:
    value = block[name]
    if name in _INT_FIELDS:
        return int(value)
    if isinstance(value, str):  # an address, checksummed
        return bytes.fromhex(value.removeprefix("0x"))
    return bytes(value)


def header_rlp(block: Mapping[str, Any]) -> bytes:
    """The RLP header a JSON-RPC block (web3's AttributeDict) hashes to."""
    fields = [_value(block, name) for name in _BASE_FIELDS]
    for name in _FORK_FIELDS:
        if name not in block or block[name] is None:
            break
        fields.append(_value(block, name))
    encoded: bytes = rlp.encode(fields)
    return encoded


Log = tuple[bytes, list[bytes], bytes]   # address, topics, data


def _address(value: object) -> bytes:
    return bytes.fromhex(value[2:]) if isinstance(value, str) else bytes(value)  # type: ignore[call-overload]  # HexBytes


def receipt_bytes(receipt: Mapping[str, Any]) -> bytes:
    """A receipt's consensus encoding (EIP-2718: type || rlp([status, cumulative gas,
    bloom, logs]); legacy receipts are the bare RLP). ``receipt``: web3's JSON receipt."""
    logs: list[Log] = [(_address(log["address"]), [bytes(t) for t in log["topics"]],
                        bytes(log["data"])) for log in receipt["logs"]]
    body: bytes = rlp.encode([int(receipt["status"]), int(receipt["cumulativeGasUsed"]),
                              logs_bloom(logs), [list(log) for log in logs]])
    kind = int(receipt.get("type", 0) or 0)
    return body if kind == 0 else bytes([kind]) + body


def logs_bloom(logs: Sequence[Log]) -> bytes:
    """The 2048-bit bloom of a receipt's logs (Yellow Paper s4.3.1, M3:2048): computed, as
    some nodes (eth-tester) leave it out of their receipts."""
    bloom = 0
    for address, topics, _ in logs:
        for item in [address, *topics]:
            digest = keccak(item)
            for i in (0, 2, 4):
                bloom |= 1 << (((digest[i] << 8) | digest[i + 1]) & 2047)
    return bloom.to_bytes(256, "big")


def make_inclusion(block: Mapping[str, Any], receipts: Sequence[Mapping[str, Any]],
                   index: int, header: bytes | None = None) -> dict[str, object]:
    """The proof for the transaction at ``index`` of ``block``, from all its receipts in
    order. ``header``: the RLP header when the chain hands it over directly (the in-process
    chain, whose JSON pads extraData); else it is rebuilt from the block's fields. Raises
    MalformedEnvelope when the node's answers do not add up (the receipts do not make the
    block's receiptsRoot, or the header does not hash to the block hash)."""
    trie = HexaryTrie({})
    for i, receipt in enumerate(receipts):
        trie[rlp.encode(i)] = receipt_bytes(receipt)
    if trie.root_hash != bytes(block["receiptsRoot"]):
        raise MalformedEnvelope("the node's receipts do not make the block's receiptsRoot",
                                reason="anchor-node")
    header = header_rlp(block) if header is None else header
    if keccak(header) != bytes(block["hash"]):
        raise MalformedEnvelope("the node's block fields do not hash to its block hash",
                                reason="anchor-node")
    path = trie.get_proof(rlp.encode(index))  # type: ignore[no-untyped-call]  # py-trie
    return {"header": header, "index": index, "receipt": receipt_bytes(receipts[index]),
            "nodes": [rlp.encode(node) for node in path]}


def check_inclusion(proof: object, root: bytes, contract: bytes) -> Anchoring:
    """Verify a proof of :func:`make_inclusion` for Merkle ``root`` anchored by the anchor
    ``contract``; raises MalformedEnvelope (reason ``anchor-inclusion``) with what failed."""
    if not isinstance(proof, dict):
        raise _bad("the inclusion proof is not a map")
    header, index, receipt, nodes = (proof.get(k) for k in ("header", "index", "receipt",
                                                            "nodes"))
    if not (isinstance(header, bytes) and isinstance(index, int) and index >= 0
            and isinstance(receipt, bytes) and receipt and isinstance(nodes, list)
            and all(isinstance(n, bytes) for n in nodes)):
        raise _bad("inclusion proof fields have wrong types")
    try:
        fields = rlp.decode(header)
        receipts_root = fields[RECEIPTS_ROOT]
        number = int.from_bytes(fields[NUMBER], "big")
        timestamp = int.from_bytes(fields[TIMESTAMP], "big")
        found = HexaryTrie.get_from_proof(  # type: ignore[no-untyped-call]  # py-trie
            receipts_root, rlp.encode(index), [rlp.decode(n) for n in nodes])
    except (*_TRIE_ERRORS, rlp.exceptions.RLPException, IndexError, TypeError, ValueError,
            AttributeError, KeyError) as exc:
        raise _bad(f"the receipt is not under the header's receiptsRoot ({exc})") from None
    if found != receipt:
        raise _bad("the receipt is not under the header's receiptsRoot")
    return Anchoring(number, keccak(header), timestamp, *_anchored_log(receipt, root,
                                                                          contract))


def _anchored_log(receipt: bytes, root: bytes, contract: bytes) -> tuple[bytes, int]:
    try:
        body = rlp.decode(receipt[1:] if receipt[0] < 0x80 else receipt)
        status, logs = body[0], body[3]
        if status != b"\x01":
            raise _bad("the anchoring transaction failed (receipt status 0)")
        for address, topics, data in logs:
            if address == contract and len(topics) == 3 and topics[0] == ANCHORED_TOPIC \
                    and topics[2] == root and len(data) == 96:
                return bytes(topics[1][12:]), int.from_bytes(data[:32], "big")
    except (rlp.exceptions.RLPException, IndexError, TypeError, ValueError) as exc:
        raise _bad(f"the receipt does not decode ({exc})") from None
    raise _bad(f"the receipt holds no Anchored event of root {root.hex()[:16]} from "
               f"contract 0x{contract.hex()}")


def _bad(detail: str) -> MalformedEnvelope:
    return MalformedEnvelope(detail, reason="anchor-inclusion")
