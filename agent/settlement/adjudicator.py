"""Reference adjudicator: the channel contract's rules in plain Python. Sans-I/O.

Same rules as agent/settlement/channel.vy (read its header); the tests run both side by side
on generated traces and require the same accept/reject decision, the same channel record and
the same token balances after every step. ``now`` is the block timestamp, passed in.

The ledger is modelled too (an ERC-20 that refuses transfers beyond a balance, plus a
``blocked`` set of recipients whose incoming transfers fail: revert, return false or burn
the gas stipend) so that payouts, credits for failed transfers and "nothing settles twice"
are checked, not assumed. ``ChannelRecord.terms_hash / packed_deposits / packed_closing``
give the contract's three storage slots, so a test compares them word for word.

Rejections raise SettlementError with ``reason="rejected"`` and the contract's revert string
as ``why``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from agent.channel.state import (
    MAX_NONCE,
    ChannelState,
    derive_channel_id,
    recover_signer,
)
from agent.errors import BadSignature, SettlementError
from agent.settlement.model import MAX_TOTAL_DEPOSIT, ChannelRecord, Status

ZERO = bytes(20)


class Rejected(SettlementError):
    """The contract would revert. ``why`` is its revert string."""

    reason = "rejected"

    def __init__(self, why: str) -> None:
        super().__init__(f"rejected: {why}")
        self.why = why


def _require(condition: bool, why: str) -> None:
    if not condition:
        raise Rejected(why)


@dataclass
class Adjudicator:
    chain_id: int
    contract: bytes
    min_window: int
    max_window: int
    channels: dict[bytes, ChannelRecord | None] = field(default_factory=dict)  # None: settled
    tokens: dict[bytes, int] = field(default_factory=dict)     # token balances, incl. contract
    credit: dict[bytes, int] = field(default_factory=dict)
    blocked: set[bytes] = field(default_factory=set)

    # --- reads --------------------------------------------------------------------------
    def status(self, channel_id: bytes) -> Status:
        if channel_id not in self.channels:
            return Status.UNKNOWN
        record = self.channels[channel_id]
        if record is None:
            return Status.SETTLED
        return Status.OPEN if record.deadline == 0 else Status.CLOSING

    def _load(self, channel_id: bytes) -> ChannelRecord:
        record = self.channels.get(channel_id)
        _require(record is not None, "record")
        assert record is not None
        return record

    # --- token model --------------------------------------------------------------------
    def _pull(self, sender: bytes, amount: int) -> None:
        _require(self.tokens.get(sender, 0) >= amount, "transferFrom")
        self.tokens[sender] = self.tokens.get(sender, 0) - amount
        self.tokens[self.contract] = self.tokens.get(self.contract, 0) + amount

    def _pay(self, to: bytes, amount: int) -> None:
        if amount == 0:
            return
        if to in self.blocked:  # the transfer fails: credit it (settle never reverts)
            self.credit[to] = self.credit.get(to, 0) + amount
            return
        self.tokens[self.contract] -= amount
        self.tokens[to] = self.tokens.get(to, 0) + amount

    # --- rules ----------------------------------------------------------------------------
    def _check_state(self, channel_id: bytes, record: ChannelRecord, state: ChannelState,
                     sig_ev: bytes, sig_cs: bytes) -> None:
        # The contract hashes with its own chain id and address: a state made for another
        # chain or contract yields another digest, so its signatures recover other keys.
        here = dataclasses.replace(state, chain_id=self.chain_id, contract=self.contract,
                                   channel_id=channel_id)
        digest = here.digest()
        for sig, signer in ((sig_ev, record.ev), (sig_cs, record.cs)):
            try:
                _require(recover_signer(digest, sig) == signer, "signer")
            except BadSignature as exc:
                raise Rejected(exc.reason) from None
        balances(record, state.t_ev, state.t_cs)

    def open(self, sender: bytes, ev: bytes, cs: bytes, salt: bytes, window: int, amount: int,
             now: int) -> bytes:
        _require(ev != ZERO and cs != ZERO and ev != cs, "parties")
        _require(sender in (ev, cs), "not a party")
        _require(self.min_window <= window <= self.max_window, "window")
        _require(amount <= MAX_TOTAL_DEPOSIT, "deposit")
        channel_id = derive_channel_id(self.chain_id, self.contract, ev, cs, salt)
        _require(channel_id not in self.channels, "channel id used")
        self._pull(sender, amount)
        self.channels[channel_id] = ChannelRecord(
            ev, cs, amount if sender == ev else 0, amount if sender == cs else 0, window)
        return channel_id

    def deposit(self, sender: bytes, channel_id: bytes, amount: int, now: int) -> None:
        record = self._load(channel_id)
        _require(record.deadline == 0, "not open")
        _require(sender in (record.ev, record.cs), "not a party")
        field_name = "dep_ev" if sender == record.ev else "dep_cs"
        new_total = getattr(record, field_name) + amount
        _require(record.total + amount <= MAX_TOTAL_DEPOSIT, "deposit")
        self._pull(sender, amount)
        self.channels[channel_id] = dataclasses.replace(record, **{field_name: new_total})

    def coop_close(self, sender: bytes, channel_id: bytes, state: ChannelState, sig_ev: bytes,
                   sig_cs: bytes, now: int) -> tuple[int, int]:
        record = self._load(channel_id)
        _require(state.final, "not final")
        if record.deadline != 0:
            _require(now <= record.deadline and state.nonce > record.nonce, "closing")
        self._check_state(channel_id, record, state, sig_ev, sig_cs)
        return self._payout(channel_id, record, state.t_ev, state.t_cs)

    def close(self, sender: bytes, channel_id: bytes, state: ChannelState, sig_ev: bytes,
              sig_cs: bytes, now: int) -> None:
        record = self._load(channel_id)
        _require(record.deadline == 0, "not open")
        _require(sender in (record.ev, record.cs), "not a party")
        if state.nonce == 0:  # the initial state: nothing paid, no signature needed
            _require(state.t_ev == 0 and state.t_cs == 0, "initial state")
        else:
            self._check_state(channel_id, record, state, sig_ev, sig_cs)
        _require(state.nonce <= MAX_NONCE, "nonce")
        self.channels[channel_id] = dataclasses.replace(
            record, deadline=now + record.window, nonce=state.nonce, t_ev=state.t_ev,
            t_cs=state.t_cs)

    def challenge(self, sender: bytes, channel_id: bytes, state: ChannelState, sig_ev: bytes,
                  sig_cs: bytes, now: int) -> None:
        record = self._load(channel_id)
        _require(record.deadline != 0 and now <= record.deadline, "not in window")
        _require(state.nonce > record.nonce, "stale")
        self._check_state(channel_id, record, state, sig_ev, sig_cs)
        _require(state.nonce <= MAX_NONCE, "nonce")
        self.channels[channel_id] = dataclasses.replace(
            record, nonce=state.nonce, t_ev=state.t_ev, t_cs=state.t_cs)

    def settle(self, sender: bytes, channel_id: bytes, now: int) -> tuple[int, int]:
        record = self._load(channel_id)
        _require(record.deadline != 0 and now > record.deadline, "window")
        return self._payout(channel_id, record, record.t_ev, record.t_cs)

    def withdraw(self, sender: bytes, now: int) -> int:
        amount = self.credit.get(sender, 0)
        _require(amount > 0, "nothing to withdraw")
        _require(sender not in self.blocked, "transfer")
        self.credit[sender] = 0
        self.tokens[self.contract] -= amount
        self.tokens[sender] = self.tokens.get(sender, 0) + amount
        return amount

    def _payout(self, channel_id: bytes, record: ChannelRecord, t_ev: int,
                t_cs: int) -> tuple[int, int]:
        to_ev, to_cs = balances(record, t_ev, t_cs)
        self.channels[channel_id] = None
        self._pay(record.ev, to_ev)
        self._pay(record.cs, to_cs)
        return to_ev, to_cs


def balances(record: ChannelRecord, t_ev: int, t_cs: int) -> tuple[int, int]:
    """(ev, cs) = (dep_ev - t_ev + t_cs, dep_cs + t_ev - t_cs), each within [0, total]."""
    to_ev = record.dep_ev - t_ev + t_cs
    to_cs = record.dep_cs + t_ev - t_cs
    _require(0 <= to_ev <= record.total and 0 <= to_cs <= record.total, "balance")
    return to_ev, to_cs
