# pragma version 0.4.3
# @license Apache-2.0
"""
@title EvEdgeAnchor: Merkle roots of verified fleet envelopes, pinned in time
@notice Issue 19 "anchoring": a fleet ingest submits, every period, the RFC 9162 Merkle root
        of the envelope hashes it verified in that period (agent/fleet/anchor.py builds the
        tree). The hashes are on chain, the payloads stay off chain. A mileage logbook then
        carries, per envelope, its audit path to a root and the receipt of the transaction
        that anchored the root, with the block header: offline, the verifier proves that a
        block with that hash holds the Anchored event (agent/fleet/anchoring.py).

        anchor     anyone may anchor a root under their own address; the first anchoring of
                   a (submitter, root) is kept: anchoredAt never moves later, so a fleet
                   operator cannot re-date history. Re-anchoring the same root is a no-op
                   (no revert: a retry after a lost answer costs gas, nothing else).
"""

event Anchored:
    submitter: indexed(address)
    root: indexed(bytes32)
    leaves: uint256
    first_ns: uint64
    last_ns: uint64

# submitter -> root -> block.timestamp of its first anchoring (0: never)
anchoredAt: public(HashMap[address, HashMap[bytes32, uint256]])


@external
def anchor(root: bytes32, leaves: uint256, first_ns: uint64, last_ns: uint64):
    assert root != empty(bytes32), "empty root"
    assert leaves > 0, "no leaves"
    assert first_ns <= last_ns, "period ends before it starts"
    if self.anchoredAt[msg.sender][root] != 0:
        return
    self.anchoredAt[msg.sender][root] = block.timestamp
    log Anchored(submitter=msg.sender, root=root, leaves=leaves, first_ns=first_ns,
                 last_ns=last_ns)
