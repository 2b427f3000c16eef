"""Agent side of the end-to-end commit marks (``[spool] keep_until = "fleet-commit"``).

A PUBACK only says the broker has a message. A broker killed before its autosave loses
messages it acknowledged (measured: mosquitto with persistence and ``autosave_interval 1``,
kill -9 during an outage test, 440 of 4015 envelopes gone while the agent had deleted them).
So the fleet ingest (agent.fleet.ingest) publishes, per device and retained, a commit mark
on ``evedge/v1/<device>/commit``: the highest seq up to which the device's chain is
contiguous in the fleet database, and that envelope's hash, signed by the ingest's key
(agent.envelope.seal_head with COMMIT_CONTENT_TYPE). This task checks each mark against
``[spool] commit_keys`` and deletes the envelopes it covers from the spool
(Spool.delete_committed); until then they stay, and go out again after a reconnect.

A mark that does not verify, names another device, or whose hash is not the spool's own
envelope at that seq is counted and ignored: the worst a forged mark could do is make the
agent keep rows longer, never lose one.

Batched marks: a mark per device is an Ed25519 signature per device, as costly for the
ingest as verifying an envelope. So the ingest signs ONE root per flush: the RFC 9162
Merkle root (agent.merkle) of the heads it marks, and sends each device its own head with
its audit path (docs/envelope.md "commit marks")::

    batch-mark = [root-mark: bstr,    ; COSE_Sign1, content type COMMIT_BATCH_CONTENT_TYPE,
                                      ; payload {2: root bstr 32, 5: leaves uint, 7: ts_ns}
                  index: uint, path: [* bstr 32], device: tstr, seq: uint, hash: bstr 32]
    leaf = SHA-256(dCBOR(["evedge/v1/commit", device, seq, hash]))

The follower takes both forms (a COSE_Sign1 of COMMIT_CONTENT_TYPE: one device's mark).

The follower reads its topic through the agent's one topic router (agent.channel.mux):
the uplink has a single queue of incoming messages, and the payment-channel service reads
it through the same router, so neither takes the other's messages.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from agent import dcbor
from agent.channel.mux import Incoming
from agent.envelope import (
    COMMIT_CONTENT_TYPE,
    ChainHead,
    KeyLookup,
    Signer,
    open_head,
    open_signed,
    seal_signed,
)
from agent.errors import (
    MalformedEnvelope,
    RemoteProtocolError,
    SignatureError,
    SpoolError,
    UnknownKey,
)
from agent.keys import key_id
from agent.merkle import merkle_paths, root_from_proof
from agent.topics import commit_topic

COMMIT_BATCH_CONTENT_TYPE = "application/evedge-commit-batch+cbor"
COMMIT_DOMAIN = "evedge/v1/commit"
MAX_MARK_BYTES = 4096
R_ROOT, R_LEAVES, R_TS = 2, 5, 7

log = logging.getLogger("edge_agent.fleet_commit")


def commit_leaf(device: str, seq: int, digest: bytes) -> bytes:
    return hashlib.sha256(dcbor.dumps([COMMIT_DOMAIN, device, seq, digest])).digest()


def seal_commit_batch(identity: Signer, heads: Sequence[tuple[str, int, bytes]],
                      ts_ns: int) -> list[tuple[str, bytes]]:
    """(device, its batch mark) for every (device, seq, hash) head: one signature."""
    root, paths = merkle_paths([commit_leaf(*head) for head in heads])
    root_mark = seal_signed(identity, COMMIT_BATCH_CONTENT_TYPE,
                            {R_ROOT: root, R_LEAVES: len(heads), R_TS: ts_ns})
    return [(device, dcbor.dumps([root_mark, index, paths[index], device, seq, digest]))
            for index, (device, seq, digest) in enumerate(heads)]


def open_commit_batch(data: bytes, lookup: KeyLookup) -> ChainHead:
    """Check a batch mark: the root's signature, then the head's path to it."""
    item = dcbor.loads(data, max_bytes=MAX_MARK_BYTES)
    if not (isinstance(item, list) and len(item) == 6):
        raise MalformedEnvelope("a batch commit mark is an array of 6", reason="mark-schema")
    root_mark, index, path, device, seq, digest = item
    if not (isinstance(root_mark, bytes) and isinstance(index, int) and index >= 0
            and isinstance(path, list) and all(isinstance(p, bytes) for p in path)
            and isinstance(device, str) and isinstance(seq, int) and seq >= 0
            and isinstance(digest, bytes) and len(digest) == 32):
        raise MalformedEnvelope("batch commit mark fields have wrong types",
                                reason="mark-schema")
    kid, payload = open_signed(root_mark, lookup, COMMIT_BATCH_CONTENT_TYPE)
    if not (isinstance(payload, dict) and set(payload) == {R_ROOT, R_LEAVES, R_TS}
            and isinstance(payload[R_ROOT], bytes) and isinstance(payload[R_LEAVES], int)
            and isinstance(payload[R_TS], int)):
        raise MalformedEnvelope("batch commit root has the wrong fields", reason="mark-schema")
    try:
        good = root_from_proof(commit_leaf(device, seq, digest), index, payload[R_LEAVES],
                               path) == payload[R_ROOT]
    except (ValueError, IndexError):
        good = False
    if not good:
        raise MalformedEnvelope("the head's path does not lead to the signed root",
                                reason="mark-path")
    return ChainHead(kid, device, seq, digest, payload[R_TS], data)


class Router(Protocol):
    """What the follower needs of agent.channel.mux.TopicMux."""

    async def subscribe(self, pattern: str) -> asyncio.Queue[Incoming]: ...


DeleteCommitted = Callable[[int, bytes], Awaitable[int]]
"""(seq, hash) -> rows deleted: Spool.delete_committed on the spool's thread."""


class CommitFollower:
    """Verifies commit marks and deletes what they cover."""

    def __init__(self, device_id: str, commit_keys: Sequence[bytes]) -> None:
        self.device_id = device_id
        self.topic = commit_topic(device_id)
        self._keys = {key_id(public): public for public in commit_keys}
        self.counters: Counter[str] = Counter()
        self.committed_seq = -1

    def _lookup(self, kid: bytes) -> bytes:
        try:
            return self._keys[kid]
        except KeyError:
            raise UnknownKey(f"commit mark signed by key {kid.hex()}, not one of "
                             f"[spool] commit_keys", kid=kid) from None

    def check(self, payload: bytes) -> ChainHead | None:
        """The mark, if it is a new one for us from a trusted ingest key; else None."""
        try:
            if payload[:1] == b"\xd2":  # a COSE_Sign1 (tag 18): one device's own mark
                mark = open_head(payload, self._lookup, COMMIT_CONTENT_TYPE)
            else:
                mark = open_commit_batch(payload, self._lookup)
        except (SignatureError, RemoteProtocolError) as exc:
            self.counters[f"mark_refused_{exc.reason}"] += 1
            log.warning("fleet commit mark refused: %s (%s)", exc, exc.reason)
            return None
        if mark.device != self.device_id:
            self.counters["mark_refused_other-device"] += 1
            return None
        if mark.seq <= self.committed_seq:
            self.counters["mark_old"] += 1
            return None
        return mark

    async def run(self, router: Router, delete: DeleteCommitted) -> None:
        """Task ``fleet-commit``: subscribe through the router (retained: the last mark
        comes at once) and follow the marks."""
        queue = await router.subscribe(self.topic)
        while True:
            message = await queue.get()
            mark = self.check(bytes(message.payload))
            if mark is None:
                continue
            try:
                deleted = await delete(mark.seq, mark.hash)
            except SpoolError as exc:  # deleting later is fine: nothing is lost
                self.counters[f"delete_failed_{exc.reason}"] += 1
                continue
            self.committed_seq = mark.seq
            self.counters["marks"] += 1
            self.counters["deleted"] += deleted
