"""The same end-to-end session against anvil, a real node over JSON-RPC on loopback
(DESIGN s6, s8): deploy, open, deposit, pay (co-signed states), cooperative close; and a
stale unilateral close beaten by the watchtower, then settle after the window.

Marked ``anvil``: it fails (never skips) when the anvil binary is missing."""

from __future__ import annotations

import pytest
from web3 import Web3

from agent.channel.state import ChannelState
from agent.keys import SettlementKey
from agent.settlement.chain import advance_time, deploy_contracts, mint
from agent.settlement.client import SettlementClient
from agent.settlement.model import SignedState, Status
from agent.settlement.rpc import connect
from agent.settlement.watchtower import Watchtower, WatchtowerService

from .conftest import new_salt

pytestmark = pytest.mark.anvil
ETHER = 10**18


def fund(w3: Web3, key: SettlementKey) -> None:
    # anvil's dev RPC: no pre-funded key needed, ours get ether directly
    w3.provider.make_request("anvil_setBalance",
                             [Web3.to_checksum_address(key.address), hex(10 * ETHER)])


def test_session_open_pay_close_settle_on_anvil(anvil_url: str) -> None:
    w3 = connect(anvil_url)
    deployer, ev_key, cs_key, tower_key = (SettlementKey.generate() for _ in range(4))
    for key in (deployer, ev_key, cs_key, tower_key):
        fund(w3, key)
    dep = deploy_contracts(w3, deployer, min_window_s=1)
    for key in (ev_key, cs_key):
        mint(w3, deployer, dep.token, key.address, 10_000)
    ev = SettlementClient(anvil_url, dep.channel, ev_key, from_block=dep.block)
    cs = SettlementClient(anvil_url, dep.channel, cs_key, from_block=dep.block)
    chain_id = ev.chain_id
    assert chain_id == 31337

    def pay(cid: bytes, nonce: int, t_ev: int, final: bool = False) -> SignedState:
        state = ChannelState(chain_id, dep.channel, cid, nonce, t_ev, 0, nonce * 100, final)
        return SignedState(state, ev_key.sign_digest(state.digest()),
                           cs_key.sign_digest(state.digest()))

    # 1. cooperative session
    opened = ev.open_channel(ev_key.address, cs_key.address, new_salt(), 60, 1000)
    cid = opened.channel_id
    cs.deposit(cid, 300)
    states = [pay(cid, n, 90 * n) for n in range(1, 8)]
    final = pay(cid, 8, 700, final=True)
    assert states[-1].state.nonce < final.state.nonce
    tx = cs.cooperative_close(final.state, final.sig_ev, final.sig_cs)
    assert tx.gas_used > 0 and ev.view(cid).status is Status.SETTLED
    assert ev.balance(ev_key.address) == 10_000 - 700
    assert cs.balance(cs_key.address) == 10_000 + 700

    # 2. the EV closes on a stale state; the station's watchtower challenges
    opened = ev.open_channel(ev_key.address, cs_key.address, new_salt(), 30, 1000)
    cid = opened.channel_id
    latest = pay(cid, 5, 450)
    tower = Watchtower(chain_id, dep.channel)
    tower.offer(latest)
    service = WatchtowerService(SettlementClient(anvil_url, dep.channel, tower_key),
                                tower, from_block=opened.tx.block_number)
    stale = pay(cid, 1, 90)
    ev.close(stale.state, stale.sig_ev, stale.sig_cs)
    assert len(service.poll_once()) == 1
    assert ev.record(cid).nonce == 5
    advance_time(w3, 31)
    ev.settle(cid)
    assert ev.balance(ev_key.address) == 10_000 - 700 - 450
    assert cs.balance(cs_key.address) == 10_000 + 700 + 450


class FlakyProxy:
    """A loopback HTTP proxy to the node that answers 503 to the first ``failures``
    requests (a node behind a restarting reverse proxy), then forwards."""

    def __init__(self, target: str, failures: int) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        import requests

        proxy = self
        self.failures, self.seen = failures, 0

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                proxy.seen += 1
                if proxy.seen <= proxy.failures:
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                answer = requests.post(target, data=body, timeout=10,
                                       headers={"Content-Type": "application/json"})
                self.send_response(answer.status_code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer.content)))
                self.end_headers()
                self.wfile.write(answer.content)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


def test_retries_ride_out_a_flaky_node_and_give_up_clearly(anvil_url: str) -> None:
    from agent.errors import SettlementError
    from agent.settlement.rpc import SendPolicy

    w3 = connect(anvil_url)
    deployer = SettlementKey.generate()
    fund(w3, deployer)
    dep = deploy_contracts(w3, deployer, min_window_s=1)
    proxy = FlakyProxy(anvil_url, failures=2)
    try:
        client = SettlementClient(proxy.url, dep.channel, deployer,
                                  policy=SendPolicy(retries=3, retry_delay_s=0.01))
        assert client.view(b"\x01" * 32).status is Status.UNKNOWN   # after two 503s
        proxy.seen, proxy.failures = 0, 3
        with pytest.raises(SettlementError) as err:
            client.view(b"\x01" * 32)
        assert err.value.reason == "node-unavailable" and proxy.seen == 3
        assert proxy.url not in str(err.value)        # URLs may carry API keys: never echoed
    finally:
        proxy.close()


def test_confirmation_depth_waits_for_blocks_on_top(anvil_url: str) -> None:
    import threading

    from agent.errors import SettlementError
    from agent.settlement.rpc import SendPolicy

    w3 = connect(anvil_url)
    deployer = SettlementKey.generate()
    fund(w3, deployer)
    dep = deploy_contracts(w3, deployer, min_window_s=1)
    start = w3.eth.block_number
    stop = threading.Event()

    def miner() -> None:  # once our transaction is in a block, mine one on top of it
        node = connect(anvil_url)
        while not stop.is_set():
            if node.eth.block_number > start:
                node.provider.make_request("evm_mine", [])
                return
            stop.wait(0.01)

    thread = threading.Thread(target=miner)
    thread.start()
    try:
        client = SettlementClient(anvil_url, dep.channel, deployer,
                                  policy=SendPolicy(confirmations=2, timeout_s=20))
        tx = client.open_channel(deployer.address, b"\x05" * 20, new_salt(), 5, 0).tx
        assert tx.block_number == start + 1 and w3.eth.block_number == start + 2
    finally:
        stop.set()
        thread.join()
    # Nobody mines now: a depth of 3 cannot be reached and says so.
    client = SettlementClient(anvil_url, dep.channel, deployer,
                              policy=SendPolicy(confirmations=3, timeout_s=0.5))
    with pytest.raises(SettlementError) as err:
        client.open_channel(deployer.address, b"\x05" * 20, new_salt(), 5, 0)
    assert err.value.reason == "tx-timeout"
