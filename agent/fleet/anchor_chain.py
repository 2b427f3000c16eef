"""The anchor contract (agent/fleet/anchor.vy) on a JSON-RPC node: artifact, deployment,
submission of a period's Merkle root, and the inclusion proof of the transaction.

Like the channel contract (agent/settlement/artifacts.py), the compiled artifact
``anchor.json`` is committed next to its source and loaded at run time (no compiler on the
ingest machine); ``python -m agent.fleet.anchor_chain`` rebuilds it with the pinned Vyper,
and a test checks that the source compiles to exactly the committed bytes. Transactions go
through agent.settlement.rpc.Sender (nonces, fees, retries, confirmations, our errors), so
the node is any Ethereum JSON-RPC node, or the in-process eth-tester chain in tests.

After the transaction is mined, :meth:`AnchorClient.submit` fetches the block and every
receipt in it and builds the offline inclusion proof (agent.fleet.inclusion): the logbook
carries it, so the verifier needs no node.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from hexbytes import HexBytes
from web3 import Web3
from web3.types import TxReceipt

from agent.errors import SettlementError
from agent.fleet.inclusion import make_inclusion
from agent.settlement.artifacts import COMPILER_VERSION, EVM_VERSION, Compiled
from agent.settlement.model import TxResult
from agent.settlement.rpc import Sender, SendPolicy, connect
from agent.settlement.txsign import DigestSigner

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "anchor.vy"
ARTIFACT = HERE / "anchor.json"
NAME = "EvEdgeAnchor"


def compile_anchor() -> dict[str, object]:
    """Compile anchor.vy with the pinned vyper (test extra only) into the artifact's shape."""
    import vyper
    from vyper.compiler.settings import Settings

    if vyper.__version__ != COMPILER_VERSION:
        raise SettlementError(f"the artifact is built with vyper {COMPILER_VERSION}, "
                              f"found {vyper.__version__}", reason="compiler-version")
    source = SOURCE.read_text()
    out = vyper.compile_code(source, contract_path=SOURCE.name,
                             output_formats=["abi", "bytecode"],
                             settings=Settings(evm_version=EVM_VERSION))
    return {"compiler": f"vyper {COMPILER_VERSION}", "evm_version": EVM_VERSION,
            "contracts": {NAME: {"source": SOURCE.name, "abi": out["abi"],
                                 "bytecode": out["bytecode"],
                                 "source_sha256": hashlib.sha256(source.encode()).hexdigest()}}}


@cache
def load_anchor() -> Compiled:
    try:
        entry = json.loads(ARTIFACT.read_text())["contracts"][NAME]
        return Compiled(name=NAME, abi=entry["abi"],
                        bytecode=bytes.fromhex(entry["bytecode"].removeprefix("0x")),
                        source_sha256=entry["source_sha256"])
    except (OSError, ValueError, KeyError) as exc:
        raise SettlementError(f"cannot load the anchor contract from {ARTIFACT}",
                              reason="artifact") from exc


def deploy_anchor(node: Web3 | str, deployer: DigestSigner,
                  policy: SendPolicy | None = None) -> tuple[bytes, TxResult]:
    """Deploy EvEdgeAnchor (``edge-agent fleet anchor-deploy``); returns its address."""
    return Sender(connect(node), deployer, policy).deploy(load_anchor().bytecode,
                                                          "deploy anchor")


@dataclass(frozen=True, slots=True)
class AnchorTx:
    """A root on chain: the transaction, where it landed, and its inclusion proof."""

    tx_hash: bytes
    block: int
    chain_id: int
    contract: bytes
    inclusion: dict[str, object]


class AnchorClient:
    """Submits roots to one anchor contract with one key (blocking: run it in a thread)."""

    def __init__(self, node: Web3 | str, contract: bytes, key: DigestSigner,
                 policy: SendPolicy | None = None) -> None:
        self.w3 = connect(node)
        self.contract = contract
        self.sender = Sender(self.w3, key, policy)
        self._abi = self.w3.eth.contract(address=Web3.to_checksum_address(contract),
                                         abi=load_anchor().abi)

    def anchored_at(self, root: bytes) -> int:
        """Block time of the first anchoring of ``root`` by our key (0: never)."""
        fn = self._abi.functions.anchoredAt(self.sender.address, root)
        at: int = self.sender.call(fn.call, "anchoredAt")
        return at

    def submit(self, root: bytes, leaves: int, first_ns: int, last_ns: int) -> AnchorTx:
        data = bytes.fromhex(self._abi.encode_abi(
            "anchor", args=[root, leaves, first_ns, last_ns])[2:])
        result = self.sender.transact(self.contract, data, "anchor")
        return self._prove(result.tx_hash, result.block_number)

    def _prove(self, txh: bytes, block_number: int) -> AnchorTx:
        receipt = self._receipt(txh)
        eth = self.w3.eth
        block = self.sender.call(lambda: eth.get_block(block_number), "eth_getBlockByNumber")
        hashes = [bytes(h) for h in block["transactions"]]  # type: ignore[arg-type]  # hashes (not full_transactions)
        inclusion = make_inclusion(block, [self._receipt(h) for h in hashes],
                                   int(receipt["transactionIndex"]),
                                   self._in_process_header(block_number))
        return AnchorTx(txh, block_number, self.sender.chain_id, self.contract, inclusion)

    def _receipt(self, txh: bytes) -> TxReceipt:
        eth = self.w3.eth
        return self.sender.call(lambda: eth.get_transaction_receipt(HexBytes(txh)),
                                "eth_getTransactionReceipt")

    def _in_process_header(self, number: int) -> bytes | None:
        """The in-process chain's header as py-evm hashes it: eth-tester's JSON block pads
        extraData to 32 bytes, so its fields do not hash to its own block hash."""
        from web3 import EthereumTesterProvider

        provider = self.w3.provider
        if not isinstance(provider, EthereumTesterProvider) or provider.ethereum_tester is None:
            return None
        import rlp

        chain = provider.ethereum_tester.backend.chain
        header: bytes = rlp.encode(chain.get_canonical_block_header_by_number(number))
        return header


if __name__ == "__main__":
    ARTIFACT.write_text(json.dumps(compile_anchor(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {ARTIFACT}")
