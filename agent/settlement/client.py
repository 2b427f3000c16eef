"""The agent's settlement client: channel operations on the contract over JSON-RPC.

Blocking (web3 is): asyncio callers run it with ``asyncio.to_thread``. Every method returns
when its transaction is mined and confirmed (``SendPolicy.confirmations``), with a TxResult
(hash, gas used, block); every failure is a SettlementError with a reason code (see rpc.py;
``bad-state`` when a state is refused here before any transaction is sent).

Usage (DESIGN s6)::

    client = SettlementClient(url_or_web3, contract_address, settlement_key)
    opened = client.open_channel(ev, cs, salt, window_s=3600, deposit=1000)
    client.deposit(opened.channel_id, 500)            # the other party, with its own client
    client.cooperative_close(final_state, sig_ev, sig_cs)   # settles at once
    # or: client.close(state, sig_ev, sig_cs); ...window...; client.settle(channel_id)
"""

from __future__ import annotations

from dataclasses import dataclass

from web3 import Web3
from web3.contract import Contract

from agent.channel.state import ChannelState, derive_channel_id
from agent.errors import ChannelError, SettlementError, SignatureError
from agent.settlement import artifacts
from agent.settlement.model import (
    ChannelRecord,
    SignedState,
    Status,
    TxResult,
    unpack_closing,
    unpack_deposits,
)
from agent.settlement.rpc import Sender, SendPolicy, connect
from agent.settlement.txsign import DigestSigner

SETTLED_MARK = (1).to_bytes(32, "big")
EMPTY_SIG = b""


@dataclass(frozen=True, slots=True)
class Opened:
    channel_id: bytes
    tx: TxResult
    approve: TxResult | None   # the ERC-20 approve sent first, if the allowance was short


@dataclass(frozen=True, slots=True)
class ChannelView:
    channel_id: bytes
    status: Status
    record: ChannelRecord | None   # None when UNKNOWN or SETTLED

    def describe(self) -> dict[str, object]:
        out: dict[str, object] = {"channel": "0x" + self.channel_id.hex(),
                                  "status": self.status.value}
        if self.record is not None:
            r = self.record
            out.update(ev="0x" + r.ev.hex(), cs="0x" + r.cs.hex(), deposit_ev=r.dep_ev,
                       deposit_cs=r.dep_cs, window_s=r.window, deadline=r.deadline,
                       nonce=r.nonce, t_ev=r.t_ev, t_cs=r.t_cs)
        return out


class SettlementClient:
    def __init__(self, node: Web3 | str, contract: bytes | str, signer: DigestSigner, *,
                 policy: SendPolicy | None = None, from_block: int = 0) -> None:
        self.w3 = connect(node)
        self.address = _address(contract)
        self.sender = Sender(self.w3, signer, policy)
        self.signer = signer
        self.from_block = from_block
        compiled = artifacts.load("EvEdgeChannel")
        self.contract = self.w3.eth.contract(address=Web3.to_checksum_address(self.address),
                                             abi=compiled.abi)
        self._token: Contract | None = None
        # channel id -> (ev, cs, window, block of its Opened log): Terms never change
        self._records: dict[bytes, tuple[bytes, bytes, int, int]] = {}
        # (channel id, closing nonce) -> (t_ev, t_cs), from Closing logs
        self._amounts: dict[tuple[bytes, int], tuple[int, int]] = {}

    @property
    def chain_id(self) -> int:
        return self.sender.chain_id

    @property
    def token(self) -> Contract:
        """The deposit token (the contract's TOKEN), as a web3 contract."""
        if self._token is None:
            address = self.sender.call(lambda: self.contract.functions.TOKEN().call(), "TOKEN")
            self._token = self.w3.eth.contract(address=address,
                                               abi=artifacts.load("EvEdgeToken").abi)
        return self._token

    def channel_id(self, ev: bytes, cs: bytes, salt: bytes) -> bytes:
        return derive_channel_id(self.chain_id, self.address, ev, cs, salt)

    # --- reads --------------------------------------------------------------------------
    def view(self, channel_id: bytes) -> ChannelView:
        """Status and current record: the contract's three slots in one call, the Terms
        from the ``Opened`` log (checked against the stored hash, cached), and while closing
        t_ev / t_cs of the closing nonce from its ``Closing`` log."""
        stored, deposits, closing = self.sender.call(
            lambda: self.contract.functions.read(channel_id).call(), "read")
        if stored == bytes(32):
            return ChannelView(channel_id, Status.UNKNOWN, None)
        if stored == SETTLED_MARK:
            return ChannelView(channel_id, Status.SETTLED, None)
        ev, cs, window, block = self._terms(channel_id, stored)
        dep_ev, dep_cs = unpack_deposits(deposits)
        record = ChannelRecord(ev, cs, dep_ev, dep_cs, window)
        if closing == 0:
            return ChannelView(channel_id, Status.OPEN, record)
        deadline, nonce, to_ev = unpack_closing(closing)
        t_ev, t_cs = self._closing_amounts(channel_id, nonce, block)
        record = ChannelRecord(ev, cs, dep_ev, dep_cs, window, deadline, nonce, t_ev, t_cs)
        if record.to_ev != to_ev:
            raise SettlementError("the Closing log does not match the stored closing state",
                                  reason="record-missing")
        return ChannelView(channel_id, Status.CLOSING, record)

    def _terms(self, channel_id: bytes, stored: bytes) -> tuple[bytes, bytes, int, int]:
        cached = self._records.get(channel_id)
        if cached is not None:
            return cached
        logs = self.sender.call(lambda: self.contract.events.Opened.get_logs(
            from_block=self.from_block, argument_filters={"channel_id": channel_id}),
            "eth_getLogs")
        for entry in logs:
            args = entry["args"]
            terms = (_addr(args["ev"]), _addr(args["cs"]), int(args["window"]))
            if ChannelRecord(terms[0], terms[1], 0, 0, terms[2]).terms_hash() == stored:
                self._records[channel_id] = (*terms, entry["blockNumber"])
                return self._records[channel_id]
        raise SettlementError("the node has no Opened log matching the stored channel "
                              "(pruned logs? set from_block)", reason="record-missing")

    def _closing_amounts(self, channel_id: bytes, nonce: int, block: int) -> tuple[int, int]:
        key = (channel_id, nonce)
        if key not in self._amounts:
            logs = self.sender.call(lambda: self.contract.events.Closing.get_logs(
                from_block=block, argument_filters={"channel_id": channel_id}), "eth_getLogs")
            for entry in logs:  # one Closing per nonce: nonces only grow while closing
                args = entry["args"]
                self._amounts[(channel_id, int(args["nonce"]))] = (int(args["t_ev"]),
                                                                   int(args["t_cs"]))
        if key not in self._amounts:
            raise SettlementError("the node has no Closing log for the stored closing state",
                                  reason="record-missing")
        return self._amounts[key]

    def record(self, channel_id: bytes) -> ChannelRecord:
        view = self.view(channel_id)
        if view.record is None:
            raise SettlementError(f"channel 0x{channel_id.hex()} is {view.status.value}",
                                  reason=f"channel-{view.status.value}")
        return view.record

    def balance(self, account: bytes) -> int:
        address = Web3.to_checksum_address(account)
        balance: int = self.sender.call(
            lambda: self.token.functions.balanceOf(address).call(), "balanceOf")
        return balance

    # --- writes -------------------------------------------------------------------------
    def open_channel(self, ev: bytes, cs: bytes, salt: bytes, window_s: int,
                     deposit: int) -> Opened:
        """Open (ev, cs, salt) and deposit ``deposit`` for this client's key (ev or cs)."""
        approve = self._ensure_allowance(deposit)
        data = self._encode("open", [_cs(ev), _cs(cs), salt, window_s, deposit])
        tx = self.sender.transact(self.address, data, "open")
        return Opened(self.channel_id(ev, cs, salt), tx, approve)

    def deposit(self, channel_id: bytes, amount: int) -> TxResult:
        record = self.record(channel_id)   # first: no approve for a channel that is not open
        self._ensure_allowance(amount)
        return self._send("deposit", [channel_id, _terms_arg(record), amount])

    def cooperative_close(self, state: ChannelState, sig_ev: bytes, sig_cs: bytes) -> TxResult:
        if not state.final:
            raise SettlementError("cooperative close needs a final state", reason="bad-state")
        return self._state_call("coopClose", state, sig_ev, sig_cs)

    def close(self, state: ChannelState | None = None, sig_ev: bytes = EMPTY_SIG,
              sig_cs: bytes = EMPTY_SIG, *, channel_id: bytes | None = None) -> TxResult:
        """Unilateral close with the latest co-signed state; with no state, the initial one
        (nonce 0, nothing paid) of ``channel_id``."""
        if state is None:
            if channel_id is None:
                raise SettlementError("close needs a state or a channel id", reason="bad-state")
            record = self.record(channel_id)
            return self._send("close", [channel_id, _terms_arg(record), (0, 0, 0, 0, False),
                                        EMPTY_SIG, EMPTY_SIG])
        return self._state_call("close", state, sig_ev, sig_cs)

    def challenge(self, state: ChannelState, sig_ev: bytes, sig_cs: bytes) -> TxResult:
        return self._state_call("challenge", state, sig_ev, sig_cs)

    def close_or_challenge(self, state: ChannelState, sig_ev: bytes,
                           sig_cs: bytes) -> TxResult | None:
        """Put our latest co-signed state on chain whatever the peer did first: close an
        open channel, challenge a closing one whose nonce is lower, nothing (None) when
        the chain already holds this nonce or a higher one. A peer's close that lands
        ahead of ours turns our close into a challenge (one retry), so the outcome never
        depends on who was first (issue 14)."""
        for attempt in range(2):
            view = self.view(state.channel_id)
            if view.record is None:
                raise SettlementError(f"channel 0x{state.channel_id.hex()} is "
                                      f"{view.status.value}",
                                      reason=f"channel-{view.status.value}")
            if view.status is Status.CLOSING and view.record.nonce >= state.nonce:
                return None
            fn = "close" if view.status is Status.OPEN else "challenge"
            try:
                return self._state_call(fn, state, sig_ev, sig_cs)
            except SettlementError as exc:
                if attempt or exc.reason not in ("rejected", "reverted"):
                    raise
        raise AssertionError("unreachable")

    def settle(self, channel_id: bytes) -> TxResult:
        record = self.record(channel_id)
        return self._send("settle", [channel_id, _terms_arg(record)])

    def withdraw(self) -> TxResult:
        return self._send("withdraw", [])

    # --- helpers ------------------------------------------------------------------------
    def _state_call(self, fn: str, state: ChannelState, sig_ev: bytes,
                    sig_cs: bytes) -> TxResult:
        if state.chain_id != self.chain_id or state.contract != self.address:
            raise SettlementError("state is for another chain or contract", reason="bad-state")
        record = self.record(state.channel_id)
        try:  # refuse here what the contract would refuse: no gas burnt, a precise reason
            SignedState(state, sig_ev, sig_cs).check(record.ev, record.cs, record.dep_ev,
                                                     record.dep_cs)
        except (SignatureError, ChannelError, ValueError) as exc:
            raise SettlementError(f"{fn}: state refused: {exc}", reason="bad-state") from exc
        args: list[object] = [state.channel_id, _terms_arg(record),
                (state.nonce, state.t_ev, state.t_cs, state.wh, state.final), sig_ev, sig_cs]
        return self._send(fn, args)

    def _encode(self, fn: str, args: list[object]) -> bytes:
        return bytes.fromhex(self.contract.encode_abi(fn, args=args).removeprefix("0x"))

    def _send(self, fn: str, args: list[object]) -> TxResult:
        return self.sender.transact(self.address, self._encode(fn, args), fn)

    def _ensure_allowance(self, amount: int) -> TxResult | None:
        if amount == 0:
            return None
        owner, spender = self.sender.address, Web3.to_checksum_address(self.address)
        allowed = self.sender.call(
            lambda: self.token.functions.allowance(owner, spender).call(), "allowance")
        if allowed >= amount:
            return None
        data = bytes.fromhex(self.token.encode_abi("approve", args=[spender, amount])
                             .removeprefix("0x"))
        return self.sender.transact(bytes.fromhex(self.token.address[2:]), data, "approve")


def _cs(address: bytes) -> str:
    return Web3.to_checksum_address(address)


def _terms_arg(record: ChannelRecord) -> tuple[str, str, int]:
    """The ABI tuple web3 wants for the contract's ``Terms`` struct (checksum addresses)."""
    return (_cs(record.ev), _cs(record.cs), record.window)


def _addr(value: str | bytes) -> bytes:
    if isinstance(value, str):
        return bytes.fromhex(value.removeprefix("0x"))
    return bytes(value)


def _address(value: bytes | str) -> bytes:
    if isinstance(value, str):
        value = bytes.fromhex(value.removeprefix("0x"))
    if len(value) != 20:
        raise SettlementError("a contract address is 20 bytes", reason="bad-address")
    return value
