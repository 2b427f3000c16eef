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

The follower reads its topic through the agent's one topic router (agent.channel.mux):
the uplink has a single queue of incoming messages, and the payment-channel service reads
it through the same router, so neither takes the other's messages.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from agent.channel.mux import Incoming
from agent.envelope import COMMIT_CONTENT_TYPE, ChainHead, open_head
from agent.errors import RemoteProtocolError, SignatureError, SpoolError, UnknownKey
from agent.keys import key_id
from agent.topics import commit_topic

log = logging.getLogger("edge_agent.fleet_commit")


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
            mark = open_head(payload, self._lookup, COMMIT_CONTENT_TYPE)
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
