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

from collections.abc import Mapping
from dataclasses import dataclass

from web3 import Web3
from web3.contract import Contract

from agent.channel.state import ChannelState, derive_channel_id
from agent.errors import ChannelError, SettlementError, SignatureError
from agent.settlement import artifacts
from agent.settlement.model import ChannelRecord, SignedState, Status, TxResult
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
        # channel id -> (latest record seen, its block): later views scan logs from there
        self._records: dict[bytes, tuple[ChannelRecord, int]] = {}

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
        """Status and current record, rebuilt from RecordSet logs and checked against the
        hash the contract stores."""
        stored = self.sender.call(lambda: self.contract.functions.channels(channel_id).call(),
                                  "channels")
        if stored == bytes(32):
            return ChannelView(channel_id, Status.UNKNOWN, None)
        if stored == SETTLED_MARK:
            return ChannelView(channel_id, Status.SETTLED, None)
        cached = self._records.get(channel_id)
        if cached is not None and cached[0].hash() == stored:   # no log scan needed
            return _view(channel_id, cached[0])
        start = cached[1] if cached is not None else self.from_block
        logs = self.sender.call(lambda: self.contract.events.RecordSet.get_logs(
            from_block=start, argument_filters={"channel_id": channel_id}), "eth_getLogs")
        for entry in reversed(logs):
            record = record_from_log(entry["args"]["record"])
            if record.hash() == stored:
                self._records[channel_id] = (record, entry["blockNumber"])
                return _view(channel_id, record)
        raise SettlementError("the node has no RecordSet log matching the stored channel "
                              "(pruned logs? set from_block)", reason="record-missing")

    def record(self, channel_id: bytes) -> ChannelRecord:
        view = self.view(channel_id)
        if view.record is None:
            raise SettlementError(f"channel 0x{channel_id.hex()} is {view.status.value}",
                                  reason=f"channel-{view.status.value}")
        return view.record

    def balance(self, account: bytes) -> int:
        address = Web3.to_checksum_address(account)
        return self.sender.call(lambda: self.token.functions.balanceOf(address).call(),
                                "balanceOf")

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
        return self._send("deposit", [channel_id, _rec(record), amount])

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
            return self._send("close", [channel_id, _rec(record), (0, 0, 0, 0, False),
                                        EMPTY_SIG, EMPTY_SIG])
        return self._state_call("close", state, sig_ev, sig_cs)

    def challenge(self, state: ChannelState, sig_ev: bytes, sig_cs: bytes) -> TxResult:
        return self._state_call("challenge", state, sig_ev, sig_cs)

    def settle(self, channel_id: bytes) -> TxResult:
        record = self.record(channel_id)
        return self._send("settle", [channel_id, _rec(record)])

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
        args = [state.channel_id, _rec(record),
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


def _view(channel_id: bytes, record: ChannelRecord) -> ChannelView:
    status = Status.OPEN if record.deadline == 0 else Status.CLOSING
    return ChannelView(channel_id, status, record)


def _cs(address: bytes) -> str:
    return Web3.to_checksum_address(address)


def _rec(record: ChannelRecord) -> tuple[object, ...]:
    """The ABI tuple web3 wants for the contract's ``Record`` struct (checksum addresses)."""
    return (_cs(record.ev), _cs(record.cs), *record.as_tuple()[2:])


def _address(value: bytes | str) -> bytes:
    if isinstance(value, str):
        value = bytes.fromhex(value.removeprefix("0x"))
    if len(value) != 20:
        raise SettlementError("a contract address is 20 bytes", reason="bad-address")
    return value


def record_from_log(value: object) -> ChannelRecord:
    if isinstance(value, Mapping):
        value = [value[k] for k in ("ev", "cs", "dep_ev", "dep_cs", "window", "deadline",
                                    "nonce", "t_ev", "t_cs")]
    return ChannelRecord.from_tuple(value)  # type: ignore[arg-type]
