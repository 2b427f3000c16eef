"""Sending transactions to an Ethereum JSON-RPC node: nonces, gas, fees, retries, confirmations.

The node is a standard "rich-client" node (geth, Besu, anvil ...) over HTTP, or the in-process
eth-tester chain (agent/settlement/chain.py); both are plain ``web3.Web3`` objects here. This
is the only module that turns web3/requests exceptions into ours (SettlementError with a
reason code):

    node-unavailable   connection refused / timed out after ``retries`` attempts
    rejected           the node's gas estimate says the call would revert (reason attached)
    reverted           mined with status 0 (state changed between estimate and inclusion)
    tx-timeout         not mined (or not confirmed) within ``timeout_s``
    rpc                any other JSON-RPC error answer

Nonces: each transaction takes the node's pending transaction count, and returns only once
mined, so one Sender never has two in flight; a restart, a transaction sent by another tool
or a chain rolled back never leaves us on a stale counter of our own. Gas: the node's estimate plus a
margin. Fees (EIP-1559): max fee = 2 x base fee + priority fee, the usual wallet rule that
survives several full blocks of base-fee growth.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

import requests
from eth_typing import HexStr
from hexbytes import HexBytes
from web3 import HTTPProvider, Web3
from web3.exceptions import ContractLogicError, TransactionNotFound, Web3Exception
from web3.types import TxParams, TxReceipt, Wei

from agent.errors import SettlementError
from agent.settlement.model import TxResult
from agent.settlement.settings import SendPolicy as SendPolicy  # re-exported for callers
from agent.settlement.txsign import DigestSigner, Tx, contract_address, tx_hash

log = logging.getLogger(__name__)
T = TypeVar("T")
DEFAULT_PRIORITY_FEE = 10**9
try:  # the in-process chain reports reverts with its own exception
    from eth_tester.exceptions import TransactionFailed as _TesterRevert
except ImportError:  # pragma: no cover - the 'chain' extra is not installed
    class _TesterRevert(Exception):  # type: ignore[no-redef]
        pass
_REVERTS = (ContractLogicError, _TesterRevert)
_TRANSIENT = (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
              ConnectionError, TimeoutError)


def connect(node: Web3 | str, timeout_s: float = 10.0) -> Web3:
    """A Web3 for ``node``: an existing Web3, or an http(s) URL from config."""
    if isinstance(node, Web3):
        return node
    if not isinstance(node, str) or not node.startswith(("http://", "https://")):
        raise SettlementError(f"node must be an http(s) URL, got {node!r}", reason="node-url")
    # Our own retry loop (below) decides what is transient; web3's would retry blindly.
    return Web3(HTTPProvider(node, request_kwargs={"timeout": timeout_s},
                             exception_retry_configuration=None))


class Sender:
    """Signs and sends transactions for one key on one node."""

    def __init__(self, w3: Web3, signer: DigestSigner, policy: SendPolicy | None = None) -> None:
        self.w3, self.signer = w3, signer
        self.policy = policy or SendPolicy()
        self.address = Web3.to_checksum_address(signer.address)
        self._chain_id: int | None = None

    # --- JSON-RPC with retries ----------------------------------------------------------
    def call(self, fn: Callable[[], T], what: str) -> T:
        """Run one JSON-RPC request, retrying what is transient: no connection, a timeout,
        HTTP 5xx or 429 (a node behind a proxy or a rate limiter), with doubling delays."""
        delay = self.policy.retry_delay_s
        for attempt in range(1, self.policy.retries + 1):
            try:
                return fn()
            except _REVERTS:
                raise
            except requests.exceptions.HTTPError as exc:
                status = exc.response.status_code if exc.response is not None else 0
                if status < 500 and status != 429:
                    raise SettlementError(f"node answered HTTP {status} to {what}",
                                          reason="rpc") from exc
                failure: Exception = exc
            except (*_TRANSIENT, requests.exceptions.RequestException) as exc:
                failure = exc
            except (Web3Exception, ValueError) as exc:
                raise SettlementError(f"node refused {what}: {exc}", reason="rpc") from exc
            if attempt == self.policy.retries:
                raise SettlementError(
                    f"node unavailable during {what} after {attempt} attempts "
                    f"({type(failure).__name__})", reason="node-unavailable") from failure
            log.warning("node error during %s (%s), retrying", what, type(failure).__name__)
            time.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")

    @property
    def chain_id(self) -> int:
        if self._chain_id is None:
            self._chain_id = self.call(lambda: self.w3.eth.chain_id, "eth_chainId")
        return self._chain_id

    # --- transactions -------------------------------------------------------------------
    def transact(self, to: bytes | None, data: bytes, what: str, value: int = 0,
                 gas: int | None = None) -> TxResult:
        """Estimate (unless ``gas`` is given), sign, send, wait for the receipt and the
        confirmation depth. The estimate runs on the latest block, the transaction lands in
        the next one: at a dispute-window edge the two can differ, which surfaces as
        ``reverted`` rather than ``rejected``."""
        request: TxParams = {"from": self.address, "data": HexStr("0x" + data.hex()),
                             "value": Wei(value)}
        if to is not None:
            request["to"] = Web3.to_checksum_address(to)
        if gas is None:
            try:
                estimate = self.call(lambda: self.w3.eth.estimate_gas(request),
                                     f"{what} estimate")
            except _REVERTS as exc:
                raise SettlementError(f"{what} rejected by the contract: {_reason(exc)}",
                                      reason="rejected") from exc
            gas = estimate * (100 + self.policy.gas_margin_pct) // 100
        base_fee = self.call(lambda: self.w3.eth.get_block("latest").get("baseFeePerGas", 0),
                             "eth_getBlockByNumber")
        try:
            priority = self.call(lambda: self.w3.eth.max_priority_fee, "eth_maxPriorityFeePerGas")
        except SettlementError as exc:
            if exc.reason == "node-unavailable":
                raise
            priority = Wei(DEFAULT_PRIORITY_FEE)
        pending = self.call(lambda: self.w3.eth.get_transaction_count(self.address, "pending"),
                            "eth_getTransactionCount")
        tx = Tx(self.chain_id, pending, priority, 2 * base_fee + priority, gas, to, value, data)
        raw = tx.sign(self.signer)
        self._send_raw(raw, what)
        return self.wait(tx_hash(raw), what)

    def deploy(self, bytecode: bytes, what: str) -> tuple[bytes, TxResult]:
        pending = self.call(lambda: self.w3.eth.get_transaction_count(self.address, "pending"),
                            "eth_getTransactionCount")
        address = contract_address(self.signer.address, pending)
        return address, self.transact(None, bytecode, what)

    def _send_raw(self, raw: bytes, what: str) -> None:
        try:
            self.call(lambda: self.w3.eth.send_raw_transaction(raw), f"{what} send")
        except SettlementError as exc:
            # A resend after a lost answer: the node already has exactly these bytes.
            if exc.reason == "rpc" and "known" in str(exc).lower():
                return
            raise

    def wait(self, txh: bytes, what: str) -> TxResult:
        deadline = time.monotonic() + self.policy.timeout_s
        while True:
            receipt = self._receipt(txh, what)
            if receipt is not None:
                head = self.call(lambda: self.w3.eth.block_number, "eth_blockNumber")
                if head - receipt["blockNumber"] + 1 >= self.policy.confirmations:
                    break
            if time.monotonic() > deadline:
                raise SettlementError(f"{what} {txh.hex()} not confirmed within "
                                      f"{self.policy.timeout_s} s", reason="tx-timeout")
            time.sleep(self.policy.poll_s)
        if receipt["status"] != 1:
            raise SettlementError(f"{what} {txh.hex()} reverted on chain", reason="reverted")
        block = self.call(lambda: self.w3.eth.get_block(receipt["blockNumber"]), "eth_getBlock")
        return TxResult(bytes(txh), receipt["gasUsed"], receipt["blockNumber"], block["timestamp"])

    def _receipt(self, txh: bytes, what: str) -> TxReceipt | None:
        try:
            return self.call(lambda: self.w3.eth.get_transaction_receipt(HexBytes(txh)),
                             f"{what} receipt")
        except SettlementError as exc:
            if isinstance(exc.__cause__, TransactionNotFound):
                return None
            raise


def _reason(exc: Exception) -> str:
    message = str(getattr(exc, "message", None) or exc)
    return message.removeprefix("execution reverted: ")
