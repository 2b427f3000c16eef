"""Settlement as a durable job, and the watch each side keeps on its own channels
(DESIGN s5b, s6).

When a session ends, its channel is settled on chain by a job that survives kill -9:

- cooperative (the default): the final co-signed state goes to ``coopClose`` (settles at
  once). The side named by ``[settlement] submit`` sends it; the other waits
  ``coop_grace_s`` for the ledger to show it settled, then sends it itself;
- unilateral (no final state: the peer is gone, or refused to sign it): ``close`` with our
  latest co-signed state (or the initial one, nothing paid), a ``challenge`` if the chain
  shows an older one, and ``settle`` once the dispute window is over.

Every step starts from what the ledger says now (``view``), never from what the job
remembers having sent, so a job restarted after a crash (or after a transaction it sent but
never saw mined) goes on from the ledger's state and never sends a transaction the contract
would refuse: a close after a close, a second settle. Before it sends anything it waits for
its own transactions still pending at the node (the same nonce is never spent twice). A
transaction the node refuses at estimate (``rejected``: the state changed meanwhile) is
counted and the step is re-planned from a fresh view; a node that is down is retried with
back-off. The job record (agent/channel/sessions.py JobRecord) is rewritten at each step.

The client is agent/settlement/client.py's SettlementClient (blocking: every call runs in
a worker thread).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from agent.backoff import Backoff
from agent.channel.protocol import Channel, Closed, Phase
from agent.channel.records import CosignedRecord
from agent.channel.sessions import JobRecord, SessionDir
from agent.errors import SettlementError

if TYPE_CHECKING:  # web3 only where a node is configured
    from agent.channel.context import Context, SessionView
    from agent.settlement.client import ChannelView, SettlementClient
    from agent.settlement.model import TxResult

log = logging.getLogger("edge_agent.channel.jobs")
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class JobInputs:
    channel_id: bytes
    final: Closed | None              # the final co-signed state, if the close completed
    latest: CosignedRecord | None     # our latest co-signed state (unilateral / challenge)
    funded: bool                      # the channel was (said to be) funded on chain
    submitter: bool                   # we send the cooperative close
    end_reason: str


async def settle_session(ctx: Context, directory: SessionDir, channel: Channel,
                         view: SessionView, final: Closed | None, reason: str, *,
                         submitter: bool, ended: Callable[[], None] = lambda: None
                         ) -> JobRecord:
    """The end of a session, the same on both sides: the ``session-ended`` event, the
    settlement job run to its end (``view.job`` follows it), the ``session-settled``
    event. ``ended`` runs between the first and the job (the vehicle frees its slot then)."""
    # Funded or not, once OPEN went out the peer may have deposited: the job finds out on
    # the ledger (nothing there: nothing to settle; open: close and settle).
    inputs = JobInputs(channel.channel_id, final, channel.cosigned,
                       funded=channel.phase is not Phase.IDLE, submitter=submitter,
                       end_reason=reason)

    def changed(job: JobRecord) -> None:
        view.job = job

    job = SettlementJob(ctx.client, directory, inputs,
                        coop_grace_s=ctx.settings.coop_grace_s,
                        poll_s=ctx.settlement.poll_s, on_change=changed)
    short = channel.channel_id.hex()
    await ctx.event("session-ended", f"session 0x{short[:12]} ended: {reason}",
                    channel=short, reason=reason)
    ended()
    done = await job.run()
    await ctx.event("session-settled", f"channel 0x{short} {done.state} ({done.close}) at "
                    f"nonce {done.nonce}: vehicle paid {done.t_ev}, station paid {done.t_cs}",
                    channel=short, state=done.state, close=done.close or "none",
                    nonce=done.nonce, t_ev=done.t_ev, t_cs=done.t_cs, tx=done.tx.hex())
    return done


class SettlementJob:
    def __init__(self, client: SettlementClient, directory: SessionDir, inputs: JobInputs, *,
                 coop_grace_s: float, poll_s: float,
                 on_change: Callable[[JobRecord], None] = lambda job: None) -> None:
        self.client, self.dir, self.inputs = client, directory, inputs
        self.coop_grace_s, self.poll_s = coop_grace_s, poll_s
        self.on_change = on_change
        self.counters: Counter[str] = Counter()
        job = directory.job()
        ours = inputs.final.state if inputs.final is not None else \
            inputs.latest.state if inputs.latest is not None else None
        self.job = job if job is not None else JobRecord(
            end_reason=inputs.end_reason, wh=ours.wh if ours is not None else 0)
        self._backoff = Backoff(poll_s, max(poll_s, 30.0))

    async def run(self) -> JobRecord:
        """Until the channel is settled (or there is nothing to settle)."""
        started = time.monotonic()
        self._save(self.job)
        while not self.job.done:
            try:
                await self._step(time.monotonic() - started)
                self._backoff.reset()
            except SettlementError as exc:
                self.counters[f"settle-{exc.reason}"] += 1
                log.warning("settlement of 0x%s: %s (%s); trying again",
                            self.inputs.channel_id.hex()[:12], exc, exc.reason)
                await asyncio.sleep(self._backoff.next())
        return self.job

    async def _call(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.to_thread(fn, *args)

    def _save(self, job: JobRecord) -> None:
        self.job = job.update(updated_ns=time.time_ns())
        self.dir.save_job(self.job)
        self.on_change(self.job)

    async def _step(self, waited_s: float) -> None:
        await self._wait_own_pending()
        view: ChannelView = await self._call(self.client.view, self.inputs.channel_id)
        status = view.status.value
        if status == "settled":
            settled: dict[str, object] = {"state": "settled",
                                          "close": self.job.close or "by-peer"}
            if not self.job.close:   # the peer settled it: say at which state (not nonce 0)
                known = view.record if view.record is not None and view.record.nonce else None
                final = self.inputs.final.state if self.inputs.final is not None else None
                source = known or final
                if source is not None:
                    settled.update(nonce=source.nonce, t_ev=source.t_ev, t_cs=source.t_cs)
            self._save(self.job.update(**settled))
            return
        if status == "unknown":
            if not self.inputs.funded or waited_s > self.coop_grace_s:
                self._save(self.job.update(state="nothing-to-settle"))
                return
            await asyncio.sleep(self.poll_s)  # the funding may still be on its way
            return
        record = view.record
        assert record is not None
        if status == "open":
            await self._open(waited_s)
            return
        await self._closing(record.nonce, record.deadline, record.t_ev, record.t_cs)

    async def _open(self, waited_s: float) -> None:
        final = self.inputs.final
        if final is not None:
            if not (self.inputs.submitter or waited_s >= self.coop_grace_s):
                if self.job.state != "waiting":
                    self._save(self.job.update(state="waiting"))
                await asyncio.sleep(self.poll_s)
                return
            state = final.state
            self._save(self.job.update(state="submitting", close="cooperative",
                                       nonce=state.nonce, t_ev=state.t_ev, t_cs=state.t_cs))
            tx = await self._call(self.client.cooperative_close, state, final.sig_ev,
                                  final.sig_cs)
            self._sent(tx, state="settled")
            return
        # "submitting" until the close is mined: "closing" says it is on chain (the
        # dispute window runs from its block), so a status, or a test that moves the
        # chain's clock, never takes a close still on its way for one already made.
        latest = self.inputs.latest
        if latest is not None:
            self._save(self.job.update(state="submitting", close="unilateral",
                                       nonce=latest.state.nonce, t_ev=latest.state.t_ev,
                                       t_cs=latest.state.t_cs))
            tx = await self._call(self.client.close, latest.state, latest.sig_ev,
                                  latest.sig_cs)
        else:  # nothing co-signed: the initial state (everything back to its owner)
            self._save(self.job.update(state="submitting", close="unilateral", nonce=0))
            tx = await self._call(lambda: self.client.close(channel_id=self.inputs.channel_id))
        self._sent(tx, state="closing")

    async def _closing(self, nonce: int, deadline: int, t_ev: int, t_cs: int) -> None:
        mine = self.inputs.final or self.inputs.latest
        if mine is not None and mine.state.nonce > nonce:
            state = mine.state
            self._save(self.job.update(state="closing", close="challenged",
                                       nonce=state.nonce, t_ev=state.t_ev, t_cs=state.t_cs))
            tx = await self._call(self.client.challenge, state, mine.sig_ev, mine.sig_cs)
            self._sent(tx, state="closing")
            return
        now = await self._chain_time()
        if max(now, int(time.time())) <= deadline:
            if self.job.state != "closing" or self.job.nonce != nonce:
                self._save(self.job.update(state="closing", close=self.job.close or "unilateral",
                                           nonce=nonce, t_ev=t_ev, t_cs=t_cs))
            await asyncio.sleep(min(self.poll_s, max(0.05, deadline - now + 1)))
            return
        self._save(self.job.update(nonce=nonce, t_ev=t_ev, t_cs=t_cs,
                                   close=self.job.close or "unilateral"))
        tx = await self._call(self.client.settle, self.inputs.channel_id)
        self._sent(tx, state="settled")

    def _sent(self, tx: TxResult, *, state: str) -> None:
        self.counters["tx-sent"] += 1
        self._save(self.job.update(state=state, tx=tx.tx_hash))

    async def _chain_time(self) -> int:
        w3 = self.client.w3
        block = await self._call(self.client.sender.call,
                                 lambda: w3.eth.get_block("latest"), "eth_getBlock")
        return int(block["timestamp"])

    async def _wait_own_pending(self) -> None:
        """A transaction of ours still pending at the node (sent just before a crash) is
        waited for: sending another would spend its nonce twice."""
        w3, sender = self.client.w3, self.client.sender
        for _ in range(600):
            pending, mined = await self._call(lambda: (
                sender.call(lambda: w3.eth.get_transaction_count(sender.address, "pending"),
                            "eth_getTransactionCount"),
                sender.call(lambda: w3.eth.get_transaction_count(sender.address, "latest"),
                            "eth_getTransactionCount")))
            if pending <= mined:
                return
            self.counters["waited-own-pending"] += 1
            await asyncio.sleep(self.poll_s)


class NewBlocks:
    """The node's chain head, polled once for every watcher of this agent. The ledger only
    changes with a new block, so K open channels cost one ``eth_blockNumber`` per poll and
    K contract calls per new block, instead of K contract calls per poll (a station with
    50 sessions spent half a core on them: bench/station_load.py)."""

    def __init__(self, client: SettlementClient, poll_s: float) -> None:
        self.client, self.poll_s = client, poll_s
        self.number = -1
        self._new = asyncio.Event()

    async def run(self) -> None:
        client = self.client
        while True:
            try:
                number = await asyncio.to_thread(
                    client.sender.call, lambda: int(client.w3.eth.block_number),
                    "eth_blockNumber")
            except SettlementError as exc:
                log.info("chain head: %s", exc.reason)
                number = self.number
            if number != self.number:
                self.number = number
                self._new.set()
                self._new = asyncio.Event()
            await asyncio.sleep(self.poll_s)

    async def after(self, seen: int) -> int:
        """The head once it is another block than ``seen``."""
        while self.number == seen or self.number < 0:
            await self._new.wait()
        return self.number


async def watch_open(client: SettlementClient, channel_id: bytes, blocks: NewBlocks,
                     funded: Callable[[], bool]) -> str:
    """Our own channel while its session runs: return the ledger status ("closing",
    "settled") once the channel is no longer open there (the peer closed it on chain:
    the session must end, and the job challenges a stale state). Checked at every new
    block (a close is one); node errors are retried at the next."""
    seen_open = False
    checked = -1
    while True:
        checked = await blocks.after(checked)
        if not funded():
            continue
        try:
            view = await asyncio.to_thread(client.view, channel_id)
        except SettlementError as exc:
            log.info("watch of 0x%s: %s", channel_id.hex()[:12], exc.reason)
            continue
        status = view.status.value
        if status == "open":
            seen_open = True
        elif status != "unknown" or seen_open:
            return status
