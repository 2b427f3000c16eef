"""The station's check of a vehicle's FUNDED claim against the ledger (DESIGN s5, s6).

A vehicle could say FUNDED without having deposited anything, and every state it then signs
would be unsettleable. Before the station delivers beyond its credit window, it reads the
channel's record on the contract: open, between exactly these two parties, with at least the
vehicle deposit and the dispute window OPEN announced. Blocking (web3); call it through
``asyncio.to_thread`` from the session's ``check_funding`` hook.
"""

from __future__ import annotations

from agent.channel.records import OpenParams
from agent.errors import SettlementError
from agent.settlement.client import SettlementClient
from agent.settlement.model import ChannelRecord, Status


def check_channel_funded(client: SettlementClient, params: OpenParams) -> ChannelRecord:
    """The channel's record if the ledger shows the channel of ``params`` open and funded; raise
    SettlementError (reason ``not-funded`` or ``funding-mismatch``) otherwise."""
    if params.contract != client.address or params.chain_id != client.chain_id:
        raise SettlementError("the channel names another chain or contract than our node's",
                              reason="funding-mismatch")
    view = client.view(params.channel_id)
    if view.status is not Status.OPEN or view.record is None:
        raise SettlementError(f"channel 0x{params.channel_id.hex()} is {view.status.value} on "
                              "the ledger, not open", reason="not-funded")
    record = view.record
    problems = [name for name, ok in (
        ("vehicle address", record.ev == params.ev.address),
        ("station address", record.cs == params.cs.address),
        ("vehicle deposit", record.dep_ev >= params.deposit_ev),
        ("dispute window", record.window == params.dispute_window_s)) if not ok]
    if problems:
        raise SettlementError(f"channel 0x{params.channel_id.hex()} on the ledger differs from "
                              f"OPEN: {', '.join(problems)}", reason="funding-mismatch")
    return record
