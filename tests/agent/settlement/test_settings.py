"""The [settlement] config table: defaults, values, and errors that say where."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.errors import ConfigError
from agent.options import Table
from agent.settlement.settings import SendPolicy, SettlementConfig


def load(data: dict[str, object]) -> SettlementConfig:
    return SettlementConfig.from_table(Table(data, "agent.toml", "settlement"))


def test_defaults_mean_no_node() -> None:
    config = load({})
    assert config.node is None and config.contract is None
    assert config.policy == SendPolicy() and config.policy.confirmations == 1


def test_values() -> None:
    config = load({"node": "https://node.example:8545", "contract": "0x" + "Ab" * 20,
                   "from_block": 12, "confirmations": 3, "retries": 5, "timeout_s": 30,
                   "watch_dir": "/var/lib/edge-agent/watch", "poll_s": 0.5})
    assert config.contract == b"\xab" * 20 and config.from_block == 12
    assert (config.policy.confirmations, config.policy.retries, config.policy.timeout_s) == \
        (3, 5, 30.0)
    assert config.watch_dir == Path("/var/lib/edge-agent/watch") and config.poll_s == 0.5


@pytest.mark.parametrize("data,key", [
    ({"node": "ws://x"}, "settlement.node"),
    ({"contract": "0x1234"}, "settlement.contract"),
    ({"confirmations": 0}, "settlement.confirmations"),
    ({"retries": "3"}, "settlement.retries"),
    ({"timeout_s": 0}, "settlement.timeout_s"),
    ({"noed": "http://x"}, "settlement.noed"),
])
def test_errors_name_file_and_key(data: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        load(data)
    assert str(err.value).startswith(f"agent.toml: {key}:")
