"""Shared fixtures: one in-process chain per module, parties with ether and tokens, a raw
contract caller that bypasses the client's own checks (so the contract's are tested)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator

import pytest
from web3 import Web3

from agent.channel.state import ChannelState, sign_digest
from agent.keys import SettlementKey
from agent.settlement import artifacts
from agent.settlement.chain import InProcessChain
from agent.settlement.client import SettlementClient
from agent.settlement.model import ChannelRecord, TxResult
from agent.settlement.rpc import Sender

TOKENS = 1_000_000
MAX = 2**256 - 1


class Raw:
    """Calls the channel contract with exactly the arguments given."""

    def __init__(self, w3: Web3, contract: bytes, key: SettlementKey) -> None:
        self.key, self.contract = key, contract
        self.sender = Sender(w3, key)
        self.abi = w3.eth.contract(abi=artifacts.load("EvEdgeChannel").abi)

    def __call__(self, fn: str, *args: object) -> TxResult:
        data = self.abi.encode_abi(fn, args=list(_abi(a) for a in args))
        return self.sender.transact(self.contract, bytes.fromhex(data[2:]), fn)


def _abi(value: object) -> object:
    if isinstance(value, ChannelRecord):  # what callers pass back: the channel's Terms
        return (Web3.to_checksum_address(value.ev), Web3.to_checksum_address(value.cs),
                value.window)
    if isinstance(value, ChannelState):
        return (value.nonce, value.t_ev, value.t_cs, value.wh, value.final)
    if isinstance(value, bytes) and len(value) == 20:
        return Web3.to_checksum_address(value)
    return value


@dataclasses.dataclass
class Parties:
    chain: InProcessChain
    ev: SettlementKey
    cs: SettlementKey
    other: SettlementKey
    contract: bytes = b""     # default: the chain's channel contract

    @property
    def address(self) -> bytes:
        return self.contract or self.chain.contract

    def raw(self, key: SettlementKey) -> Raw:
        return Raw(self.chain.w3, self.address, key)

    def client(self, key: SettlementKey) -> SettlementClient:
        return SettlementClient(self.chain.w3, self.address, key)

    def state(self, channel_id: bytes, nonce: int, t_ev: int, t_cs: int = 0, wh: int = 0,
              final: bool = False) -> ChannelState:
        return ChannelState(self.chain.chain_id, self.address, channel_id, nonce,
                            t_ev, t_cs, wh, final)

    def sigs(self, state: ChannelState) -> tuple[bytes, bytes]:
        digest = state.digest()
        return (sign_digest(self.ev.private_key, digest),
                sign_digest(self.cs.private_key, digest))

    def balance(self, key: SettlementKey | bytes) -> int:
        address = key if isinstance(key, bytes) else key.address
        return self.client(self.ev).balance(address)


def fund_party(chain: InProcessChain, key: SettlementKey) -> None:
    chain.fund(key.address, tokens=TOKENS)
    token = chain.w3.eth.contract(abi=artifacts.load("EvEdgeToken").abi)
    data = token.encode_abi("approve", args=[Web3.to_checksum_address(chain.contract), MAX])
    Sender(chain.w3, key).transact(chain.token, bytes.fromhex(data[2:]), "approve")


@pytest.fixture(scope="module")
def module_parties() -> Parties:
    chain = InProcessChain.start(min_window_s=1)
    keys = [SettlementKey.generate() for _ in range(3)]
    for key in keys:
        fund_party(chain, key)
    return Parties(chain, *keys)


@pytest.fixture
def parties(module_parties: Parties) -> Iterator[Parties]:
    """The module's chain, rolled back after each test."""
    snap = module_parties.chain.snapshot()
    yield module_parties
    module_parties.chain.revert(snap)


def new_salt() -> bytes:
    return os.urandom(32)


# --- anvil (a real node, from npm: @foundry-rs/anvil-linux-amd64) -------------------------

ANVIL_HINT = ("anvil not found. Install it once with: npm install --prefix .venv/npm "
              "--no-save @foundry-rs/anvil-linux-amd64@1.7.1  (or set EVEDGE_ANVIL=/path/to/anvil; "
              "or deselect with -m 'not anvil')")


def find_anvil() -> str | None:
    import shutil
    from pathlib import Path

    explicit = os.environ.get("EVEDGE_ANVIL")
    if explicit:  # when set, only this one (so CI can pin it, and a wrong path fails)
        return explicit if os.access(explicit, os.X_OK) else None
    root = Path(__file__).resolve().parents[3]
    for candidate in (str(root / ".venv/npm/node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil"),
                      shutil.which("anvil")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


@contextlib.contextmanager
def running_anvil() -> Iterator[str]:
    """anvil on a free loopback port until the block ends, stopped by pid (even on
    failure); its URL. Fails (never skips) when anvil is not installed."""
    import socket
    import subprocess
    import time

    import requests

    binary = find_anvil()
    if binary is None:
        pytest.fail(ANVIL_HINT)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([binary, "--host", "127.0.0.1", "--port", str(port), "--silent",
                             "--accounts", "1"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                requests.post(url, json={"jsonrpc": "2.0", "id": 1, "method": "eth_chainId",
                                         "params": []}, timeout=1).raise_for_status()
                break
            except requests.RequestException:
                if proc.poll() is not None or time.monotonic() > deadline:
                    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                    pytest.fail(f"anvil did not start: {err[-500:]}")
                time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def anvil_url() -> Iterator[str]:
    """anvil for the module's tests."""
    with running_anvil() as url:
        yield url


# --- one adversary test, two chains: eth-tester and anvil ------------------------------------

class AnvilChain:
    """What the tests use of InProcessChain, on an anvil node (its dev RPC funds our keys,
    snapshots and moves the clock)."""

    def __init__(self, url: str) -> None:
        from agent.settlement.chain import deploy_contracts
        from agent.settlement.rpc import connect

        self.w3 = connect(url)
        self.deployer = SettlementKey.generate()
        self._set_balance(self.deployer.address)
        self.deployment = deploy_contracts(self.w3, self.deployer, min_window_s=1)

    def _set_balance(self, address: bytes) -> None:
        self.w3.provider.make_request("anvil_setBalance",
                                      [Web3.to_checksum_address(address), hex(10 * 10**18)])

    @property
    def token(self) -> bytes:
        return self.deployment.token

    @property
    def contract(self) -> bytes:
        return self.deployment.channel

    @property
    def chain_id(self) -> int:
        return self.w3.eth.chain_id

    def fund(self, address: bytes, *, ether: int = 1, tokens: int = 0) -> None:
        from agent.settlement.chain import mint

        if ether:
            self._set_balance(address)
        if tokens:
            mint(self.w3, self.deployer, self.token, address, tokens)

    def advance_time(self, seconds: int) -> int:
        from agent.settlement.chain import advance_time

        return advance_time(self.w3, seconds)

    def snapshot(self) -> str:
        return self.w3.provider.make_request("evm_snapshot", [])["result"]

    def revert(self, snapshot_id: str) -> None:
        self.w3.provider.make_request("evm_revert", [snapshot_id])


def _parties_on(chain: InProcessChain | AnvilChain) -> Parties:
    keys = [SettlementKey.generate() for _ in range(3)]
    for key in keys:
        fund_party(chain, key)  # type: ignore[arg-type]
    return Parties(chain, *keys)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def anvil_parties(anvil_url: str) -> Parties:
    return _parties_on(AnvilChain(anvil_url))


@pytest.fixture(scope="module", params=["eth-tester", pytest.param("anvil", marks=pytest.mark.anvil)])
def backend_parties(request: pytest.FixtureRequest) -> Parties:
    """Three funded parties on eth-tester, then the same on anvil (a real node)."""
    if request.param == "anvil":
        return request.getfixturevalue("anvil_parties")  # type: ignore[no-any-return]
    return _parties_on(InProcessChain.start(min_window_s=1))


@pytest.fixture
def on_both(backend_parties: Parties) -> Iterator[Parties]:
    """``backend_parties`` rolled back after each test."""
    snap = backend_parties.chain.snapshot()
    yield backend_parties
    backend_parties.chain.revert(snap)  # type: ignore[arg-type]


@pytest.fixture
def on_anvil(anvil_parties: Parties) -> Iterator[Parties]:
    snap = anvil_parties.chain.snapshot()
    yield anvil_parties
    anvil_parties.chain.revert(snap)  # type: ignore[arg-type]
