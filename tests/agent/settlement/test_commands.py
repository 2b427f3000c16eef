"""``edge-agent channel status | close | settle | watch`` against anvil, and their errors."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from web3 import Web3

from agent.channel.state import ChannelState
from agent.errors import ConfigError
from agent.keys import KeyStore, SettlementKey
from agent.settlement.chain import advance_time, deploy_contracts, mint
from agent.settlement.client import SettlementClient
from agent.settlement.commands import register
from agent.settlement.handoff import Handoff
from agent.settlement.model import SignedState
from agent.settlement.rpc import connect
from agent.settlement.watchtower import drop_handoff

from .conftest import new_salt


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="edge-agent")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_channel_commands_need_a_node_and_a_contract(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="need a node"):
        run(["channel", "status", "0x" + "00" * 32])
    with pytest.raises(ConfigError, match="contract"):
        run(["channel", "status", "0x" + "00" * 32, "--node", "http://127.0.0.1:1"])
    with pytest.raises(ConfigError, match="contract"):
        run(["channel", "settle", "0x" + "00" * 32, "--node", "http://127.0.0.1:1",
             "--contract", "0x1234"])
    config = tmp_path / "agent.toml"
    config.write_text('[settlement]\nnode = "ftp://nope"\n')
    with pytest.raises(ConfigError, match="settlement.node"):
        run(["channel", "status", "0x" + "00" * 32, "--config", str(config)])


@pytest.mark.anvil
def test_status_close_settle_watch_on_anvil(anvil_url: str, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    w3 = connect(anvil_url)
    store = KeyStore(tmp_path / "state")
    keys, _ = store.init("ev-1")
    ev_key, cs_key, deployer = keys.settlement, SettlementKey.generate(), SettlementKey.generate()
    for key in (ev_key, cs_key, deployer):
        w3.provider.make_request("anvil_setBalance",
                                 [Web3.to_checksum_address(key.address), hex(10**19)])
    dep = deploy_contracts(w3, deployer, min_window_s=1)
    mint(w3, deployer, dep.token, ev_key.address, 5000)
    config = tmp_path / "agent.toml"
    config.write_text(f'[device]\nrole = "vehicle"\nstate_dir = "{tmp_path / "state"}"\n'
                      f'[settlement]\nnode = "{anvil_url}"\ncontract = "0x{dep.channel.hex()}"\n'
                      f'from_block = {dep.block}\n')
    base = ["--config", str(config)]
    ev = SettlementClient(anvil_url, dep.channel, ev_key, from_block=dep.block)
    salt = new_salt()
    cid = ev.open_channel(ev_key.address, cs_key.address, salt, 20, 1000).channel_id
    cid_hex = "0x" + cid.hex()

    assert run(["channel", "status", cid_hex, "--json", *base]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["status"] == "open" and status["deposit_ev"] == 1000

    def signed(nonce: int, t_ev: int, final: bool = False) -> Path:
        state = ChannelState(ev.chain_id, dep.channel, cid, nonce, t_ev, 0, 0, final)
        path = tmp_path / f"n{nonce}.state"
        path.write_bytes(SignedState(state, ev_key.sign_digest(state.digest()),
                                     cs_key.sign_digest(state.digest())).encode())
        return path

    stale, latest = signed(1, 100), signed(4, 400)
    assert run(["channel", "close", cid_hex, "--state", str(stale), *base]) == 0
    assert "closing at nonce 1" in capsys.readouterr().out
    watch_dir = tmp_path / "watch"
    watch_dir.mkdir()
    latest.rename(watch_dir / latest.name)   # a bare state: not an authenticated hand-off
    assert run(["channel", "watch", "--once", "--states", str(watch_dir), *base]) == 0
    assert json.loads(capsys.readouterr().out)["challenges"] == 0
    handoff = Handoff.make(SignedState.decode((watch_dir / latest.name).read_bytes()),
                           ev_key.address, cs_key.address, salt, cs_key)
    drop_handoff(watch_dir, handoff)
    assert run(["channel", "watch", "--once", "--states", str(watch_dir), *base]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["challenges"] == 1 and out["state-accepted"] == 1
    assert (tmp_path / "state" / "watchtower.store").stat().st_mode & 0o777 == 0o600
    advance_time(w3, 21)
    assert run(["channel", "settle", cid_hex, *base]) == 0
    assert run(["channel", "status", cid_hex, *base]) == 0
    assert "settled" in capsys.readouterr().out
    assert ev.balance(ev_key.address) == 5000 - 400 and ev.balance(cs_key.address) == 400
