"""Anchoring: Merkle roots of verified envelope hashes, and their proofs in the logbook.

The Merkle tree is RFC 9162 s2.1's (agent.merkle) over envelope hashes. The ingest
records each period's root with its leaves in the ``anchors`` table (and, when a node and
contract are configured, the transaction that put the root on chain, agent.fleet.anchor_chain,
with its inclusion proof, agent.fleet.inclusion); the logbook carries, for each included
envelope that an anchor covers, the root, the audit path, the transaction and its proof,
and the offline verifier recomputes the root from the envelope itself and checks that a
block holds the root's Anchored event.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from typing import Protocol

from agent import dcbor
from agent.errors import MalformedEnvelope
from agent.fleet.db import Database
from agent.merkle import merkle_proof, merkle_root, root_from_proof

__all__ = ["bundle_anchors", "check_anchors", "merkle_proof", "merkle_root", "pending_periods",
           "record_anchoring", "record_period", "root_from_proof"]


def record_period(db: Database, leaves: Sequence[bytes], first_ns: int, last_ns: int,
                  tx: tuple[bytes, int, int, bytes] | None = None) -> bytes:
    """Store one anchoring period (root + its leaves, and the transaction if any)."""
    root = merkle_root(leaves)
    tx_hash, block, chain_id, contract = tx if tx else (None, None, None, None)
    db.transaction(lambda d: d.execute(
        "INSERT INTO anchors (root, leaves, first_ns, last_ns, tx_hash, block, chain_id, "
        "contract, leaf_hashes) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (root, len(leaves), first_ns, last_ns, tx_hash, block, chain_id, contract,
         b"".join(leaves))))
    return root


def pending_periods(db: Database) -> list[tuple[bytes, int, int, int]]:
    """(root, leaves, first_ns, last_ns) of the periods not on chain yet, oldest first."""
    return [(bytes(root), int(n), int(first), int(last)) for root, n, first, last in db.query(
        "SELECT root, leaves, first_ns, last_ns FROM anchors WHERE tx_hash IS NULL "
        "ORDER BY id")]


def record_anchoring(db: Database, root: bytes, tx_hash: bytes, block: int, chain_id: int,
                     contract: bytes, inclusion: dict[str, object]) -> None:
    """The transaction that put ``root`` on chain, and its inclusion proof."""
    def work(d: Database) -> None:
        d.execute("UPDATE anchors SET tx_hash = ?, block = ?, chain_id = ?, contract = ? "
                  "WHERE root = ? AND tx_hash IS NULL", (tx_hash, block, chain_id, contract,
                                                         root))
        d.execute("INSERT INTO anchor_proofs (root, proof) VALUES (?, ?) ON CONFLICT DO "
                  "NOTHING", (root, dcbor.dumps(inclusion)))

    db.transaction(work)


def bundle_anchors(db: Database, chains: dict[str, list[object]]) -> list[object]:
    """Proofs for the included envelopes of a logbook (see the module docstring)."""
    wanted = {hashlib.sha256(e).digest() for entries in chains.values() for e in entries
              if isinstance(e, bytes)}
    out: list[object] = []
    proofs = {bytes(root): dcbor.loads(bytes(proof)) for root, proof in db.query(
        "SELECT root, proof FROM anchor_proofs")}
    for root, blob, tx_hash, block, chain_id, contract in db.query(
            "SELECT root, leaf_hashes, tx_hash, block, chain_id, contract FROM anchors"):
        blob = bytes(blob)
        leaves = [blob[i:i + 32] for i in range(0, len(blob), 32)]
        for index, digest in enumerate(leaves):
            if digest in wanted:
                out.append({"hash": digest, "root": bytes(root), "index": index,
                            "size": len(leaves), "path": merkle_proof(leaves, index),
                            "tx": bytes(tx_hash) if tx_hash is not None else None,
                            "block": block, "chain_id": chain_id,
                            "contract": bytes(contract) if contract is not None else None,
                            "inclusion": proofs.get(bytes(root))})
    return out


class _Report(Protocol):
    anchored: int
    recorded: int
    anchorings: list[str]

    def fail(self, reason: str) -> None: ...


def check_anchors(bundle: dict[object, object], chains: dict[object, object],
                  report: _Report) -> None:
    included = {hashlib.sha256(e).digest() for entries in chains.values()
                if isinstance(entries, list) for e in entries if isinstance(e, bytes)}
    anchors = bundle.get("anchors", [])
    if not isinstance(anchors, list):
        raise MalformedEnvelope("bundle anchors must be an array")
    for item in anchors:
        if not isinstance(item, dict):
            raise MalformedEnvelope("an anchor proof is a map")
        digest, root, path = item.get("hash"), item.get("root"), item.get("path")
        index, size = item.get("index"), item.get("size")
        if not (isinstance(digest, bytes) and isinstance(root, bytes) and isinstance(path, list)
                and isinstance(index, int) and isinstance(size, int)
                and all(isinstance(p, bytes) for p in path)):
            raise MalformedEnvelope("anchor proof fields have wrong types")
        if digest not in included:
            report.fail(f"anchor proof for envelope {digest.hex()[:16]} not in the logbook")
            continue
        try:
            good = root_from_proof(digest, index, size, path) == root
        except (ValueError, IndexError):
            good = False
        if not good:
            report.fail(f"anchor proof of envelope {digest.hex()[:16]} does not lead to its "
                        f"root {root.hex()[:16]}")
            continue
        if item.get("inclusion") is None:
            report.recorded += 1  # a root the fleet recorded, not (yet) on chain
            continue
        _check_on_chain(item, digest, root, report)


def _check_on_chain(item: dict[object, object], digest: bytes, root: bytes,
                    report: _Report) -> None:
    """The root's transaction is in a block (agent.fleet.inclusion): what that proves
    offline, and the one look-up it leaves to the reader, is said in that module."""
    try:
        from agent.fleet.inclusion import check_inclusion
    except ModuleNotFoundError:  # rlp / py-trie come with the chain extra
        report.fail("checking anchoring transactions needs the chain extra: "
                    "pip install 'ev-edge-agent[chain]'")
        return
    contract, block, chain_id = item.get("contract"), item.get("block"), item.get("chain_id")
    if not (isinstance(contract, bytes) and len(contract) == 20 and isinstance(block, int)
            and isinstance(chain_id, int)):
        raise MalformedEnvelope("anchor transaction fields have wrong types")
    try:
        anchoring = check_inclusion(item["inclusion"], root, contract)
    except MalformedEnvelope as exc:
        report.fail(f"anchoring of envelope {digest.hex()[:16]}: {exc}")
        return
    if anchoring.block_number != block:
        report.fail(f"anchoring of envelope {digest.hex()[:16]}: the proof is for block "
                    f"{anchoring.block_number}, the bundle says {block}")
        return
    report.anchored += 1
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(anchoring.timestamp))
    line = (f"root {root.hex()[:16]} anchored by 0x{anchoring.submitter.hex()} in block "
            f"{block} of chain {chain_id} at {when} UTC: block hash "
            f"0x{anchoring.block_hash.hex()} (check it on any node or explorer)")
    if line not in report.anchorings:
        report.anchorings.append(line)
