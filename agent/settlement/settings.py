"""The ``[settlement]`` config table (DESIGN s6: "the node URL is config")::

    [settlement]
    node = "http://127.0.0.1:8545"   # the rich-client node's JSON-RPC; absent: in-process chain
    contract = "0x..."               # EvEdgeChannel address on that chain
    from_block = 0                   # first block to scan for its logs (its deployment block)
    confirmations = 1                # blocks on top of the including one, plus one
    retries = 3                      # per JSON-RPC call, on connection errors only
    timeout_s = 120                  # per transaction, mined and confirmed
    watch_dir = "/var/lib/edge-agent/watch"   # `channel watch`: hand-offs (*.handoff files)
    watch_store = "/var/lib/edge-agent/watchtower.store"  # `channel watch`: what it guards
                                     # (default: <state_dir>/watchtower.store)
    poll_s = 2.0                     # `channel watch`: seconds between polls
    margin_s = 600                   # `channel watch`: warn when a stale close leaves less
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from agent.options import Table

_ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}$")


@dataclass(frozen=True, slots=True)
class SendPolicy:
    confirmations: int = 1       # 1 = the including block is enough (dev nodes automine)
    retries: int = 3             # attempts per JSON-RPC call on connection errors
    retry_delay_s: float = 0.2   # doubles per attempt
    timeout_s: float = 120.0     # per transaction: mined and confirmed
    poll_s: float = 0.05
    gas_margin_pct: int = 25

    def __post_init__(self) -> None:
        if self.confirmations < 1 or self.retries < 1 or self.timeout_s <= 0:
            raise ValueError("confirmations and retries must be >= 1, timeout_s > 0")


@dataclass(frozen=True, slots=True)
class SettlementConfig:
    node: str | None = None
    contract: bytes | None = None
    from_block: int = 0
    policy: SendPolicy = SendPolicy()
    watch_dir: Path | None = None
    watch_store: Path | None = None
    poll_s: float = 2.0
    margin_s: int = 600

    @classmethod
    def from_table(cls, table: Table) -> SettlementConfig:
        node = table.opt_str("node")
        if node is not None and not node.startswith(("http://", "https://")):
            raise table.error("node", "an http:// or https:// JSON-RPC URL", node)
        contract_text = table.opt_str("contract")
        if contract_text is not None and not _ADDRESS.match(contract_text):
            raise table.error("contract", "a 0x-prefixed 20-byte hex address", contract_text)
        watch = table.opt_str("watch_dir")
        watch_store = table.opt_str("watch_store")
        value = cls(
            node=node,
            contract=bytes.fromhex(contract_text[2:]) if contract_text else None,
            from_block=table.int("from_block", 0, min=0),
            policy=SendPolicy(confirmations=table.int("confirmations", 1, min=1, max=1000),
                              retries=table.int("retries", 3, min=1, max=100),
                              timeout_s=table.float("timeout_s", 120.0, min=1.0)),
            watch_dir=Path(watch) if watch else None,
            watch_store=Path(watch_store) if watch_store else None,
            poll_s=table.float("poll_s", 2.0, min=0.05),
            margin_s=table.int("margin_s", 600, min=0),
        )
        table.reject_unknown()
        return value
