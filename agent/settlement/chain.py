"""Deploying the contracts, and the in-process chain that stands in for a node (DESIGN s6).

With no node in config (demo, tests) ``InProcessChain.start()`` runs an Ethereum chain inside
this process (eth-tester on py-evm), deploys the test token and the channel contract, and
funds accounts with ether and tokens. ``deploy_contracts`` does the same deployment on any
node (anvil in the tests), through the same signed-raw-transaction path the agent uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from web3 import EthereumTesterProvider, Web3
from web3.types import RPCEndpoint, Wei

from agent.errors import SettlementError
from agent.keys import SettlementKey
from agent.settlement import artifacts
from agent.settlement.model import TxResult
from agent.settlement.rpc import Sender, SendPolicy
from agent.settlement.txsign import DigestSigner

ETHER = 10**18
DEFAULT_MIN_WINDOW_S = 60
DEFAULT_MAX_WINDOW_S = 30 * 24 * 3600

if TYPE_CHECKING:  # a test dependency, imported only where the chain is built
    from eth_tester import EthereumTester


@dataclass(frozen=True, slots=True)
class Deployment:
    token: bytes
    channel: bytes
    token_tx: TxResult
    channel_tx: TxResult

    @property
    def block(self) -> int:
        """First block to scan for the channel contract's logs."""
        return self.channel_tx.block_number


def deploy_contracts(w3: Web3, deployer: DigestSigner, *, token: bytes | None = None,
                     min_window_s: int = DEFAULT_MIN_WINDOW_S,
                     max_window_s: int = DEFAULT_MAX_WINDOW_S,
                     policy: SendPolicy | None = None) -> Deployment:
    """Deploy EvEdgeToken (unless ``token`` is given) and EvEdgeChannel for it."""
    sender = Sender(w3, deployer, policy)
    token_tx = None
    if token is None:
        compiled = artifacts.load("EvEdgeToken")
        args = _constructor_args(w3, compiled.abi, ["EvEdge Test Token", "EVT", 6])
        token, token_tx = sender.deploy(compiled.bytecode + args, "deploy token")
    compiled = artifacts.load("EvEdgeChannel")
    args = _constructor_args(w3, compiled.abi, [Web3.to_checksum_address(token), min_window_s,
                                                 max_window_s])
    channel, channel_tx = sender.deploy(compiled.bytecode + args, "deploy channel")
    return Deployment(token, channel, token_tx or channel_tx, channel_tx)


def _constructor_args(w3: Web3, abi: list[dict[str, object]], args: list[object]) -> bytes:
    constructor = next(item for item in abi if item["type"] == "constructor")
    inputs = constructor["inputs"]
    assert isinstance(inputs, list)  # the compiler's ABI
    return w3.codec.encode([str(i["type"]) for i in inputs], args)


def mint(w3: Web3, minter: DigestSigner, token: bytes, to: bytes, amount: int) -> TxResult:
    contract = w3.eth.contract(address=Web3.to_checksum_address(token),
                               abi=artifacts.load("EvEdgeToken").abi)
    data = contract.encode_abi("mint", args=[Web3.to_checksum_address(to), amount])
    return Sender(w3, minter).transact(token, bytes.fromhex(data[2:]), "mint")


def advance_time(w3: Web3, seconds: int) -> int:
    """Move the chain's clock forward (dev chains only); returns the new head timestamp."""
    provider = w3.provider
    if isinstance(provider, EthereumTesterProvider):
        latest = w3.eth.get_block("latest")["timestamp"]
        tester = provider.ethereum_tester
        assert tester is not None
        tester.time_travel(latest + seconds)
    else:  # anvil / hardhat dev RPC
        provider.make_request(RPCEndpoint("evm_increaseTime"), [seconds])
        provider.make_request(RPCEndpoint("evm_mine"), [])
    return w3.eth.get_block("latest")["timestamp"]


class InProcessChain:
    """eth-tester + py-evm with the token and channel contract deployed."""

    def __init__(self, w3: Web3, deployer: SettlementKey, deployment: Deployment) -> None:
        self.w3, self.deployer, self.deployment = w3, deployer, deployment

    @classmethod
    def start(cls, *, min_window_s: int = 1,
              max_window_s: int = DEFAULT_MAX_WINDOW_S) -> InProcessChain:
        try:
            from eth_tester import EthereumTester, PyEVMBackend
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise SettlementError("the in-process chain needs the 'chain' extra: "
                                  "pip install 'ev-edge-agent[chain]'",
                                  reason="missing-dependency") from exc
        w3 = Web3(EthereumTesterProvider(EthereumTester(PyEVMBackend())))
        deployer = SettlementKey.generate()
        _send_ether(w3, deployer.address, 100 * ETHER)
        deployment = deploy_contracts(w3, deployer, min_window_s=min_window_s,
                                      max_window_s=max_window_s)
        return cls(w3, deployer, deployment)

    @property
    def token(self) -> bytes:
        return self.deployment.token

    @property
    def contract(self) -> bytes:
        return self.deployment.channel

    @property
    def chain_id(self) -> int:
        return self.w3.eth.chain_id

    def fund(self, address: bytes, *, ether: int = 10 * ETHER, tokens: int = 0) -> None:
        """Give ``address`` ether for gas and ``tokens`` of the deposit token."""
        if ether:
            _send_ether(self.w3, address, ether)
        if tokens:
            mint(self.w3, self.deployer, self.token, address, tokens)

    def advance_time(self, seconds: int) -> int:
        return advance_time(self.w3, seconds)

    def snapshot(self) -> int:
        snapshot_id: int = self._tester().take_snapshot()
        return snapshot_id

    def revert(self, snapshot_id: int) -> None:
        self._tester().revert_to_snapshot(snapshot_id)

    def _tester(self) -> EthereumTester:
        provider = self.w3.provider
        assert isinstance(provider, EthereumTesterProvider) and provider.ethereum_tester
        tester: EthereumTester = provider.ethereum_tester
        return tester


def _send_ether(w3: Web3, to: bytes, amount: int) -> None:
    """From eth-tester's pre-funded account 0 (it signs for its own accounts)."""
    txh = w3.eth.send_transaction({"from": w3.eth.accounts[0],
                                   "to": Web3.to_checksum_address(to), "value": Wei(amount)})
    w3.eth.wait_for_transaction_receipt(txh)
