"""The settlement job (agent/channel/jobs.py) against anvil: what its states say is what
the ledger says. (anvil, not eth-tester: the job calls the node from worker threads
while the test moves the chain's clock.)"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agent.channel.jobs import JobInputs, SettlementJob
from agent.channel.records import CosignedRecord
from agent.channel.sessions import JobRecord, SessionDir

from .conftest import TOKENS, Parties, new_salt


@pytest.mark.anvil
def test_closing_is_said_only_once_the_close_is_on_chain(anvil_parties: Parties,
                                                         tmp_path: Path) -> None:
    """A unilateral close: "submitting" while the transaction is on its way, "closing"
    from its block on (the dispute window runs from there), then "settled". A status
    that said "closing" before the close was mined let a restart after a kill -9 be
    taken for a close already made."""
    p = anvil_parties
    ev = p.client(p.ev)
    cid = ev.open_channel(p.ev.address, p.cs.address, new_salt(), 30, 500).channel_id
    state = p.state(cid, 4, 120)
    directory = SessionDir(tmp_path, cid)
    directory.path.mkdir(parents=True)
    seen: list[tuple[str, str]] = []   # (job state, ledger status) at every save

    def changed(job: JobRecord) -> None:
        seen.append((job.state, ev.view(cid).status.value))

    inputs = JobInputs(cid, None, CosignedRecord(state, *p.sigs(state)), funded=True,
                       submitter=False, end_reason="credit-window")
    job = SettlementJob(ev, directory, inputs, coop_grace_s=0.0, poll_s=0.05,
                        on_change=changed)

    async def run() -> JobRecord:
        task = asyncio.create_task(job.run())
        async with asyncio.timeout(20):
            while not any(s == "closing" for s, _ in seen):
                await asyncio.sleep(0.02)
            p.chain.advance_time(31)
            return await task

    try:
        done = asyncio.run(run())
    except TimeoutError:
        raise AssertionError(f"{seen} {job.counters}") from None
    assert (done.state, done.close, done.nonce, done.t_ev) == ("settled", "unilateral", 4, 120)
    assert "submitting" in [s for s, _ in seen], seen
    assert all(status == "closing" for s, status in seen if s == "closing"), seen
    assert directory.job() == done
    assert p.balance(p.cs) == TOKENS + 120 and p.balance(p.ev) == TOKENS - 120
