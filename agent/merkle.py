"""RFC 9162 s2.1 Merkle trees over 32-byte digests (Certificate Transparency v2). Sans-I/O.

SHA-256; a leaf is ``H(0x00 || digest)``, a node ``H(0x01 || left || right)``, an odd last
node is promoted unchanged, so a proof cannot pass a node off as a leaf or the reverse.
Used for anchoring (agent.fleet.anchor: envelope hashes, one root per period on chain) and
for batched commit marks (agent.fleet_commit: one signature over many devices' heads).

Hand-written: twenty lines of hashing, and no maintained library implements RFC 9162
paths without pulling a CT log client with it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence


def _leaf(digest: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + digest).digest()


def _node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _levels(leaves: Sequence[bytes]) -> list[list[bytes]]:
    if not leaves:
        raise ValueError("no leaves")
    levels = [[_leaf(d) for d in leaves]]
    while len(levels[-1]) > 1:
        level = levels[-1]
        levels.append([_node(level[i], level[i + 1]) if i + 1 < len(level) else level[i]
                       for i in range(0, len(level), 2)])
    return levels


def merkle_root(leaves: Sequence[bytes]) -> bytes:
    return _levels(leaves)[-1][0]


def _path(levels: list[list[bytes]], index: int) -> list[bytes]:
    path = []
    for level in levels[:-1]:
        sibling = index ^ 1
        if sibling < len(level):
            path.append(level[sibling])
        index //= 2
    return path


def merkle_proof(leaves: Sequence[bytes], index: int) -> list[bytes]:
    """The audit path of leaf ``index``: sibling hashes from the leaf up."""
    return _path(_levels(leaves), index)


def merkle_paths(leaves: Sequence[bytes]) -> tuple[bytes, list[list[bytes]]]:
    """The root and every leaf's audit path, the tree built once (n log n, not n**2)."""
    levels = _levels(leaves)
    return levels[-1][0], [_path(levels, i) for i in range(len(leaves))]


def root_from_proof(digest: bytes, index: int, size: int, path: Sequence[bytes]) -> bytes:
    """Recompute the root from one leaf and its path (the inverse of merkle_proof);
    ValueError for a path that does not fit a tree of ``size`` leaves."""
    if not 0 <= index < size:
        raise ValueError("leaf index outside the tree")
    node, remaining = _leaf(digest), list(path)
    width = size
    while width > 1:
        if index % 2 == 1:
            node = _node(remaining.pop(0), node)
        elif index + 1 < width:
            node = _node(node, remaining.pop(0))
        index //= 2
        width = (width + 1) // 2
    if remaining:
        raise ValueError("proof longer than the tree")
    return node
