"""Watchtower: challenges a stale unilateral close with the best valid state handed to it.

Runs next to the rich-client node (DESIGN s6: "anyone may submit it: watchtower"). A vehicle
or station hands it co-signed states; when the chain shows a channel closing on a lower nonce
than the best valid state held, and the window is still open, it challenges at once.

Rules (issue 14):

1. Nothing unverified is ever held as "best". Every state is checked against the exact
   digest the contract recovers (chain, contract, channel id, both parties' signatures,
   a nonce the contract can store) before it is kept. A hand-off (handoff.py) proves its
   parties offline; a bare SignedState from local code waits, unverified and bounded, until
   the chain shows the channel's parties (``learn``).
2. Per channel the tower keeps the ``keep`` highest-nonce verified states, so an invalid
   state (one the contract refuses on balances) never displaces a valid one; a challenge
   uses the highest that the record's deposits accept.
3. Kept states are in a crash-safe store (towerstore.py) before ``offer`` returns True.
4. The tower challenges as soon as it sees a stale close, and warns (WindowWarning event,
   ``window-margin`` counter) when the remaining window is under ``margin_s``; a window
   already over is WindowMissed (``window-missed``).

``Watchtower`` is the sans-I/O core: states in (``offer``, ``offer_handoff``), channel
records in (``observe``), events out. ``WatchtowerService`` is the thin blocking driver: it
polls the node through a SettlementClient, sends the challenges, logs and reports events.
Time is the chain's (the head block's timestamp), passed in.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from agent.channel.state import check_balances
from agent.errors import ChannelError, EdgeAgentError, SettlementError, SignatureError
from agent.settlement.client import ChannelView, SettlementClient
from agent.settlement.handoff import Handoff
from agent.settlement.model import ChannelRecord, SignedState, Status, TxResult
from agent.settlement.towerstore import Guarded, TowerStore

log = logging.getLogger(__name__)

DEFAULT_MARGIN_S = 600
KEEP_PER_CHANNEL = 4
MAX_PENDING_CHANNELS = 1024


@dataclass(frozen=True, slots=True)
class Challenge:
    """Send ``signed`` to the contract's challenge(): it beats the closing nonce."""

    channel_id: bytes
    signed: SignedState
    closing_nonce: int
    deadline: int


@dataclass(frozen=True, slots=True)
class WindowWarning:
    """A stale close with less than the safety margin left: challenge NOW, check the tower."""

    channel_id: bytes
    closing_nonce: int
    held_nonce: int
    deadline: int
    remaining_s: int
    margin_s: int


@dataclass(frozen=True, slots=True)
class WindowMissed:
    """The window of a stale close ended before the tower could challenge."""

    channel_id: bytes
    closing_nonce: int
    held_nonce: int
    deadline: int


TowerEvent = Challenge | WindowWarning | WindowMissed


class Watchtower:
    def __init__(self, chain_id: int, contract: bytes, *, margin_s: int = DEFAULT_MARGIN_S,
                 store: TowerStore | None = None, keep: int = KEEP_PER_CHANNEL) -> None:
        if margin_s < 0 or keep < 1:
            raise ValueError("margin_s must be >= 0 and keep >= 1")
        self.chain_id, self.contract = chain_id, contract
        self.margin_s, self.keep, self.store = margin_s, keep, store
        self.counters: Counter[str] = Counter()
        self._held: dict[bytes, list[SignedState]] = {}     # verified, highest nonce first
        self._parties: dict[bytes, tuple[bytes, bytes]] = {}
        self._pending: dict[bytes, list[SignedState]] = {}  # waiting for the parties
        if store is not None:
            for entry in store.guarded():
                self._keep(entry.signed, entry.ev, entry.cs, persist=False)

    @property
    def best(self) -> dict[bytes, SignedState]:
        """The highest-nonce verified state of every guarded channel."""
        return {cid: states[0] for cid, states in self._held.items()}

    def held(self, channel_id: bytes) -> list[SignedState]:
        return list(self._held.get(channel_id, ()))

    def waiting(self) -> list[bytes]:
        """Channels with offered states whose parties the tower does not know yet."""
        return list(self._pending)

    # ---- states in

    def offer_handoff(self, handoff: Handoff) -> bool:
        """A party's authenticated hand-off: verified offline, kept if it is among the best."""
        try:
            handoff.verify(self.chain_id, self.contract)
        except (ChannelError, SignatureError) as exc:
            self.counters[f"handoff-refused-{exc.reason}"] += 1
            return False
        self._parties[handoff.channel_id] = (handoff.ev, handoff.cs)
        return self._keep(handoff.signed, handoff.ev, handoff.cs)

    def offer(self, signed: SignedState) -> bool:
        """A bare co-signed state (from local code). Verified against the channel's parties
        once known (``learn``); until then it waits (bounded) and is not used."""
        state = signed.state
        if state.chain_id != self.chain_id or state.contract != self.contract:
            self.counters["state-foreign"] += 1
            return False
        parties = self._parties.get(state.channel_id)
        if parties is not None:
            return self._verify_and_keep(signed, *parties)
        if state.channel_id not in self._pending and len(self._pending) >= MAX_PENDING_CHANNELS:
            self.counters["state-pending-full"] += 1
            return False
        waiting = self._pending.setdefault(state.channel_id, [])
        if signed not in waiting:
            waiting.append(signed)
            waiting.sort(key=lambda s: s.state.nonce, reverse=True)
            del waiting[self.keep:]
            self.counters["state-waiting"] += 1
        return False

    def learn(self, channel_id: bytes, ev: bytes, cs: bytes) -> None:
        """The chain says these are the channel's parties: verify what waits for them."""
        self._parties[channel_id] = (ev, cs)
        for signed in self._pending.pop(channel_id, []):
            self._verify_and_keep(signed, ev, cs)

    def forget(self, channel_id: bytes) -> None:
        """The channel settled: nothing left to guard."""
        self._held.pop(channel_id, None)
        self._pending.pop(channel_id, None)
        self._parties.pop(channel_id, None)
        if self.store is not None:
            self.store.forget(channel_id)

    def _verify_and_keep(self, signed: SignedState, ev: bytes, cs: bytes) -> bool:
        try:
            signed.check_signatures(ev, cs)
        except (ChannelError, SignatureError) as exc:
            self.counters[f"state-invalid-{exc.reason}"] += 1
            return False
        return self._keep(signed, ev, cs)

    def _keep(self, signed: SignedState, ev: bytes, cs: bytes, *, persist: bool = True) -> bool:
        """Add a verified state to the channel's best ``keep`` (persisted first)."""
        cid = signed.state.channel_id
        held = self._held.get(cid, [])
        nonce = signed.state.nonce
        if any(s.state.nonce == nonce for s in held):
            same = any(s == signed for s in held)
            self.counters["state-not-newer" if same else "state-equivocation"] += 1
            return False
        if len(held) >= self.keep and nonce < held[-1].state.nonce:
            self.counters["state-not-newer"] += 1
            return False
        if persist and self.store is not None:
            self.store.add(Guarded(signed, ev, cs))
        self._parties[cid] = (ev, cs)
        held = sorted([*held, signed], key=lambda s: s.state.nonce, reverse=True)[:self.keep]
        self._held[cid] = held
        self.counters["state-accepted"] += 1
        return True

    # ---- the chain in, decisions out

    def observe(self, channel_id: bytes, record: ChannelRecord, now: int) -> list[TowerEvent]:
        """A channel's current record: challenge at once if it is closing on an older state
        than the best valid one held; warn under the margin; report a missed window."""
        held = self._held.get(channel_id)
        if not held or record.deadline == 0:
            return []
        if self._parties.get(channel_id) != (record.ev, record.cs):
            self.counters["record-parties-mismatch"] += 1
            return []
        best = self._best_valid(channel_id, record)
        if best is None or best.state.nonce <= record.nonce:
            return []
        if now > record.deadline:
            self.counters["window-missed"] += 1
            return [WindowMissed(channel_id, record.nonce, best.state.nonce, record.deadline)]
        out: list[TowerEvent] = [Challenge(channel_id, best, record.nonce, record.deadline)]
        remaining = record.deadline - now
        if remaining < self.margin_s:
            self.counters["window-margin"] += 1
            out.append(WindowWarning(channel_id, record.nonce, best.state.nonce,
                                     record.deadline, remaining, self.margin_s))
        return out

    def _best_valid(self, channel_id: bytes, record: ChannelRecord) -> SignedState | None:
        """The highest held state whose balances the record's deposits accept. Deposits
        are frozen while closing, so one refused now is refused for good: dropped."""
        held = self._held[channel_id]
        for signed in list(held):
            if signed.state.nonce <= record.nonce:
                return signed
            try:
                check_balances(signed.state, record.dep_ev, record.dep_cs)
                return signed
            except ChannelError as exc:
                self.counters[f"state-invalid-{exc.reason}"] += 1
                held.remove(signed)
        return None


Source = Callable[[], Iterable[Handoff | SignedState]]


class WatchtowerService:
    """Blocking driver: offer what the sources hand over, read the guarded channels from
    the node, send challenges, log and report events (``on_event``)."""

    def __init__(self, client: SettlementClient, tower: Watchtower, *, from_block: int = 0,
                 sources: list[Source] | None = None,
                 on_event: Callable[[TowerEvent], None] | None = None) -> None:
        self.client, self.tower = client, tower
        self.next_block = from_block   # kept for callers; the tower reads current records
        self.sources = sources or []
        self.on_event = on_event or (lambda event: None)

    def poll_once(self) -> list[TxResult]:
        for source in self.sources:
            for item in source():
                if isinstance(item, Handoff):
                    self.tower.offer_handoff(item)
                else:
                    self.tower.offer(item)
        for channel_id in self.tower.waiting():
            view = self._view(channel_id)
            if view is not None and view.record is not None:
                self.tower.learn(channel_id, view.record.ev, view.record.cs)
        head = self.client.sender.call(lambda: self.client.w3.eth.get_block("latest"),
                                       "eth_getBlock")
        self.next_block = head["number"] + 1
        sent = []
        for channel_id in list(self.tower.best):
            view = self._view(channel_id)
            if view is None:
                continue
            if view.status is Status.SETTLED:
                self.tower.forget(channel_id)
                continue
            if view.record is None:
                continue
            for event in self.tower.observe(channel_id, view.record, head["timestamp"]):
                tx = self._act(event)
                if tx is not None:
                    sent.append(tx)
        return sent

    def _view(self, channel_id: bytes) -> ChannelView | None:
        try:
            return self.client.view(channel_id)
        except SettlementError as exc:
            self.tower.counters[f"view-failed-{exc.reason}"] += 1
            return None

    def _act(self, event: TowerEvent) -> TxResult | None:
        cid = "0x" + event.channel_id.hex()
        if isinstance(event, WindowWarning):
            log.error("channel %s closed on nonce %d with only %d s of its window left "
                      "(margin %d s): challenging with nonce %d", cid, event.closing_nonce,
                      event.remaining_s, event.margin_s, event.held_nonce)
        elif isinstance(event, WindowMissed):
            log.error("channel %s closed on nonce %d; the window ended before we could "
                      "challenge with nonce %d", cid, event.closing_nonce, event.held_nonce)
        self.on_event(event)
        if not isinstance(event, Challenge):
            return None
        signed = event.signed
        try:
            tx = self.client.challenge(signed.state, signed.sig_ev, signed.sig_cs)
        except SettlementError as exc:
            self.tower.counters[f"challenge-failed-{exc.reason}"] += 1
            log.warning("challenge of %s failed: %s", cid, exc.reason)
            return None
        self.tower.counters["challenge-sent"] += 1
        log.info("challenged %s: nonce %d over %d", cid, signed.state.nonce,
                 event.closing_nonce)
        return tx

    def run(self, poll_s: float = 2.0, stop: Callable[[], bool] = lambda: False) -> None:
        if poll_s * 2 > self.tower.margin_s:
            log.warning("watchtower polls every %.1f s, more than half its %d s safety "
                        "margin: a close may be seen too late", poll_s, self.tower.margin_s)
        while not stop():
            try:
                self.poll_once()
            except SettlementError as exc:  # node down: keep trying, say so
                self.tower.counters[f"poll-failed-{exc.reason}"] += 1
                log.warning("watchtower poll failed: %s", exc)
            time.sleep(poll_s)


def handoffs_from_dir(directory: Path) -> Source:
    """Hand-offs dropped as ``*.handoff`` files (Handoff CBOR) in a directory. A bad file is
    counted in the log and skipped, never fatal (hostile input); a bare ``*.state`` file is
    refused: a hand-off must say which party sends it and be signed by it."""
    def read() -> list[Handoff | SignedState]:
        out: list[Handoff | SignedState] = []
        for path in sorted(directory.glob("*.state")):
            log.warning("ignoring %s: a bare state is not an authenticated hand-off "
                        "(write a .handoff)", path.name)
        for path in sorted(directory.glob("*.handoff")):
            try:
                out.append(Handoff.decode(path.read_bytes()))
            except (OSError, EdgeAgentError) as exc:
                log.warning("skipping hand-off %s: %s", path.name,
                            getattr(exc, "reason", type(exc).__name__))
        return out
    return read


def drop_handoff(directory: Path, handoff: Handoff) -> Path:
    """Write ``handoff`` into a tower's directory atomically (temp file, fsync, rename), one
    file per channel: a newer hand-off replaces the older one."""
    path = directory / f"{handoff.channel_id.hex()}.handoff"
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(handoff.encode())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path
