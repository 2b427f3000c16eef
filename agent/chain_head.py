"""The device's signed chain head in its retained status, its last will and on a timer.

Without it a truncated tail is invisible: a broker that drops the last envelopes of a
stream, or a capture cut short, still verifies, since nothing after the cut proves that
more existed. So the agent says, signed with its identity key, "my chain ends at seq N with
hash H" (agent.envelope.seal_head), in three places:

- the retained status ``evedge/v1/<device>/status`` at every connect ("online"),
- the last will the broker publishes when the connection dies ("lost"): the head as it
  was at connect time, the newest thing the broker can hold for us,
- the same retained status again every ``[status] head_interval_s`` (default 30 s) and at a
  clean exit ("offline").

Payload (JSON, so people and dashboards read it as before)::

    {"state": "online", "client": "<client id>",
     "head": {"seq": 4949, "hash": "<hex>", "cose": "<hex of the signed head>"}}

``seq``/``hash`` are for reading; only ``cose`` counts (``edge-agent verify --mqtt`` and the
fleet ingest check its signature and report "device says seq 4949, last seen 4944").
The head names the last envelope committed to the spool: it may not have reached the
broker yet, which is the point.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Callable
from typing import Protocol

from agent.envelope import Signer, seal_head
from agent.errors import UplinkError

HEAD_INTERVAL_S = 30.0


class HeadStatus:
    """Makes the status / will payloads. ``chain`` returns the spool's (next_seq, head)."""

    def __init__(self, identity: Signer, device_id: str, client_id: str,
                 chain: Callable[[], tuple[int, bytes]],
                 clock: Callable[[], int] = time.time_ns) -> None:
        self.identity, self.device_id, self.client_id = identity, device_id, client_id
        self._chain, self._clock = chain, clock
        self.counters: Counter[str] = Counter()

    def head(self) -> bytes | None:
        next_seq, digest = self._chain()
        if next_seq == 0:
            return None  # nothing sealed yet: no head to claim
        return seal_head(self.identity, self.device_id, next_seq - 1, digest, self._clock())

    def payload(self, state: str) -> bytes:
        """The uplink's ``status_payload`` hook: called with "online" | "offline" | "lost"."""
        status: dict[str, object] = {"state": state, "client": self.client_id}
        next_seq, digest = self._chain()
        cose = self.head()
        if cose is not None:
            status["head"] = {"seq": next_seq - 1, "hash": digest.hex(), "cose": cose.hex()}
        return json.dumps(status).encode()


def head_from_status(payload: bytes) -> bytes | None:
    """The signed head in a status payload, or None (an old agent, or not our JSON)."""
    try:
        status = json.loads(payload)
        cose = status["head"]["cose"]
        return bytes.fromhex(cose) if isinstance(cose, str) else None
    except (ValueError, KeyError, TypeError):
        return None


class Publisher(Protocol):
    """What ``publish_heads`` needs of agent.uplink.Uplink."""

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False,
                      retry: bool = True) -> None: ...


async def publish_heads(uplink: Publisher, topic: str, status: HeadStatus,
                        interval_s: float = HEAD_INTERVAL_S) -> None:
    """Task ``chain-head``: republish the retained status with the current head."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            await uplink.publish(topic, status.payload("online"), retain=True, retry=False)
            status.counters["heads_published"] += 1
        except (UplinkError, TimeoutError):
            # Not connected: the next connect publishes a fresh head anyway.
            status.counters["heads_not_published"] += 1
