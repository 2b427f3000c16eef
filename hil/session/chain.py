"""The in-process chain shared by two agents in one process (demo, rig, tests).

eth-tester (py-evm) is not thread-safe, and each agent's settlement client calls it from
worker threads (asyncio.to_thread): two calls at once can corrupt or deadlock it. A real
node serialises requests itself; here one lock does. ``serialised(chain)`` gives a Web3
over the same chain whose every request holds the lock, and makes the chain use it too.
"""

from __future__ import annotations

import threading
from typing import Any

from web3 import EthereumTesterProvider, Web3

from agent.settlement.chain import InProcessChain


class _LockedProvider(EthereumTesterProvider):
    def __init__(self, tester: Any) -> None:
        super().__init__(tester)
        self._lock = threading.RLock()

    def make_request(self, method: Any, params: Any) -> Any:
        with self._lock:
            return super().make_request(method, params)


def serialised(chain: InProcessChain) -> Web3:
    tester = chain.w3.provider.ethereum_tester  # type: ignore[attr-defined]
    w3 = Web3(_LockedProvider(tester))
    chain.w3 = w3
    return w3
