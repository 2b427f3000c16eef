"""Watchtower: challenges a stale unilateral close with the latest state delegated to it.

Runs next to the rich-client node (DESIGN s6: "anyone may submit it: watchtower"). A vehicle
or station hands it co-signed states (SignedState); when the chain shows a channel closing
with a lower nonce than the best state held, and the window is still open, it challenges.

``Watchtower`` is the sans-I/O core: states in (``offer``), channel records in
(``observe``), decisions out. ``WatchtowerService`` is the thin blocking driver: it reads
``RecordSet`` logs block range by block range through a SettlementClient and sends the
challenges. Time is the chain's (the head block's timestamp), passed in.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from agent.errors import ChannelError, EdgeAgentError, SettlementError, SignatureError
from agent.settlement.client import SettlementClient, record_from_log
from agent.settlement.model import ChannelRecord, SignedState, Status, TxResult

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Challenge:
    """Send ``signed`` to the contract's challenge(): it beats the closing nonce."""

    channel_id: bytes
    signed: SignedState
    closing_nonce: int
    deadline: int


class Watchtower:
    def __init__(self, chain_id: int, contract: bytes) -> None:
        self.chain_id, self.contract = chain_id, contract
        self.best: dict[bytes, SignedState] = {}
        self.counters: Counter[str] = Counter()

    def offer(self, signed: SignedState) -> bool:
        """Keep ``signed`` if it is for our chain and contract and newer than what we hold.
        Signatures are checked against the parties once the channel's record is known."""
        state = signed.state
        if state.chain_id != self.chain_id or state.contract != self.contract:
            self.counters["state-foreign"] += 1
            return False
        held = self.best.get(state.channel_id)
        if held is not None and held.state.nonce >= state.nonce:
            self.counters["state-not-newer"] += 1
            return False
        self.best[state.channel_id] = signed
        self.counters["state-accepted"] += 1
        return True

    def forget(self, channel_id: bytes) -> None:
        self.best.pop(channel_id, None)

    def observe(self, channel_id: bytes, record: ChannelRecord, now: int) -> Challenge | None:
        """A channel's current record: challenge if it is closing on an older state."""
        held = self.best.get(channel_id)
        if held is None or record.deadline == 0:
            return None
        if record.nonce >= held.state.nonce:
            return None
        if now > record.deadline:
            self.counters["window-missed"] += 1
            log.error("channel 0x%s closed on nonce %d; window ended before we saw it",
                      channel_id.hex(), record.nonce)
            return None
        try:
            held.check(record.ev, record.cs, record.dep_ev, record.dep_cs)
        except (SignatureError, ChannelError) as exc:
            # A delegated state the contract would refuse: drop it, say so, keep watching.
            self.counters[f"state-invalid-{exc.reason}"] += 1
            del self.best[channel_id]
            return None
        return Challenge(channel_id, held, record.nonce, record.deadline)


class WatchtowerService:
    """Blocking driver: poll the node's logs, feed the core, send challenges."""

    def __init__(self, client: SettlementClient, tower: Watchtower, *, from_block: int = 0,
                 sources: list[Callable[[], list[SignedState]]] | None = None) -> None:
        self.client, self.tower = client, tower
        self.next_block = from_block
        self.sources = sources or []

    def poll_once(self) -> list[TxResult]:
        for source in self.sources:
            for signed in source():
                self.tower.offer(signed)
        w3 = self.client.w3
        head = self.client.sender.call(lambda: w3.eth.get_block("latest"), "eth_getBlock")
        logs = []
        if head["number"] >= self.next_block:
            logs = self.client.sender.call(
                lambda: self.client.contract.events.RecordSet.get_logs(
                    from_block=self.next_block, to_block=head["number"]), "eth_getLogs")
        latest: dict[bytes, ChannelRecord] = {}
        for entry in logs:
            latest[bytes(entry["args"]["channel_id"])] = record_from_log(entry["args"]["record"])
        # Also re-check held channels not in this batch: a state may arrive after the close.
        for channel_id in [c for c in self.tower.best if c not in latest]:
            try:
                view = self.client.view(channel_id)
            except SettlementError:
                continue
            if view.status is Status.SETTLED:   # nothing left to guard
                self.tower.forget(channel_id)
            elif view.record is not None:
                latest[channel_id] = view.record
        self.next_block = head["number"] + 1
        sent = []
        for channel_id, record in latest.items():
            action = self.tower.observe(channel_id, record, head["timestamp"])
            if action is None:
                continue
            try:
                tx = self.client.challenge(action.signed.state, action.signed.sig_ev,
                                           action.signed.sig_cs)
            except SettlementError as exc:
                self.tower.counters[f"challenge-failed-{exc.reason}"] += 1
                log.warning("challenge of 0x%s failed: %s", channel_id.hex(), exc.reason)
                continue
            self.tower.counters["challenge-sent"] += 1
            log.info("challenged 0x%s: nonce %d over %d", channel_id.hex(),
                     action.signed.state.nonce, action.closing_nonce)
            sent.append(tx)
        return sent

    def run(self, poll_s: float = 2.0, stop: Callable[[], bool] = lambda: False) -> None:
        while not stop():
            try:
                self.poll_once()
            except SettlementError as exc:  # node down: keep trying, say so
                self.tower.counters[f"poll-failed-{exc.reason}"] += 1
                log.warning("watchtower poll failed: %s", exc)
            time.sleep(poll_s)


def states_from_dir(directory: Path) -> Callable[[], list[SignedState]]:
    """A source of delegated states: every ``*.state`` file (SignedState CBOR) in a directory.
    A bad file is counted and skipped, never fatal (hostile input)."""
    def read() -> list[SignedState]:
        out = []
        for path in sorted(directory.glob("*.state")):
            try:
                out.append(SignedState.decode(path.read_bytes()))
            except (OSError, EdgeAgentError) as exc:
                log.warning("skipping delegated state %s: %s", path.name,
                            getattr(exc, "reason", type(exc).__name__))
        return out
    return read
