"""``edge-agent channel status | close | settle | watch`` (DESIGN s6).

``register(subparsers)`` adds the ``channel`` command; agent/cli.py calls it. Each action
returns an exit code; errors are our exceptions, which the CLI prints as one line.

Where the node and contract come from: ``--config`` (its ``[settlement]`` table and
``[device] state_dir``), overridden by ``--node``, ``--contract``, ``--state-dir``. The
channel commands need a real node: an in-process chain would vanish with the process.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from agent.errors import ConfigError, SettlementError
from agent.settlement.settings import SettlementConfig

if TYPE_CHECKING:  # web3 is imported only by the commands that talk to a node
    from agent.settlement.client import SettlementClient
    from agent.settlement.model import TxResult

EXIT_OK, EXIT_FAIL = 0, 1


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    channel = subparsers.add_parser(
        "channel", help="settle payment channels on the chain: status, close, settle, watch",
        description="Payment channels on the settlement contract, through the JSON-RPC node "
                    "named in config ([settlement] node, contract).")
    sub = channel.add_subparsers(dest="channel_command", metavar="ACTION", required=True)

    def add(name: str, func: Callable[[argparse.Namespace], int],
            help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(func=func)
        p.add_argument("--config", type=Path, help="agent config with a [settlement] table")
        p.add_argument("--node", help="JSON-RPC URL of the node (overrides config)")
        p.add_argument("--contract", help="channel contract address 0x... (overrides config)")
        p.add_argument("--from-block", type=int, default=None,
                       help="first block to scan for the contract's logs")
        p.add_argument("--state-dir", type=Path, default=None,
                       help="where the device's settlement key lives (keys init)")
        return p

    p = add("status", cmd_status, "show a channel: open / closing (deadline) / settled")
    p.add_argument("channel_id", help="channel id, 0x + 64 hex digits")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p = add("close", cmd_close, "close a channel: cooperatively with a final co-signed state "
            "(settles at once), else unilaterally (starts the dispute window)")
    p.add_argument("channel_id", help="channel id, 0x + 64 hex digits")
    p.add_argument("--state", type=Path, help="co-signed state file (SignedState CBOR); "
                   "without it: the initial state (nothing paid)")
    p.add_argument("--unilateral", action="store_true",
                   help="close unilaterally even with a final state")
    p = add("settle", cmd_settle, "pay out a closing channel after its dispute window")
    p.add_argument("channel_id", help="channel id, 0x + 64 hex digits")
    p = add("watch", cmd_watch, "watchtower: challenge stale closes with the best valid state "
            "handed off to it (*.handoff files in a directory) until interrupted")
    p.add_argument("--states", type=Path, help="directory of *.handoff files "
                   "(default: [settlement] watch_dir)")
    p.add_argument("--store", type=Path, help="the tower's crash-safe store (default: "
                   "[settlement] watch_store, else <state dir>/watchtower.store)")
    p.add_argument("--poll", type=float, default=None, help="seconds between polls")
    p.add_argument("--margin", type=int, default=None,
                   help="warn when a stale close leaves fewer seconds than this")
    p.add_argument("--once", action="store_true", help="poll once and exit")


def _settings(args: argparse.Namespace) -> tuple[SettlementConfig, str, bytes, Path | None]:
    """Config file first, command-line options over it."""
    from agent.config import load_config
    from agent.options import Table

    state_dir = args.state_dir
    table = Table({}, "(command line)", "settlement")
    if args.config is not None:
        config = load_config(args.config)
        table = config.section("settlement")
        state_dir = state_dir or config.device.state_dir
    settings = SettlementConfig.from_table(table)
    node = args.node or settings.node
    if node is None:
        raise ConfigError("channel commands need a node: set [settlement] node or --node "
                          "(an in-process chain would not outlive this command)")
    contract = settings.contract
    if args.contract is not None:
        contract = SettlementConfig.from_table(Table({"contract": args.contract},
                                                     "(command line)")).contract
    if contract is None:
        raise ConfigError("no channel contract: set [settlement] contract or --contract")
    return settings, node, contract, state_dir


def _client(args: argparse.Namespace,
            need_key: bool = True) -> tuple[SettlementClient, SettlementConfig]:
    from agent.keys import KeyStore, SettlementKey
    from agent.settlement.client import SettlementClient

    settings, node, contract, state_dir = _settings(args)
    if need_key:
        if state_dir is None:
            raise ConfigError("no settlement key: give --state-dir or --config")
        from agent.statedir import lock_state_dir  # the agent signs with this key too

        lock_state_dir(state_dir, "this command", reentrant=True)
        key = KeyStore(state_dir).load().settlement
    else:
        key = SettlementKey.generate()  # reads only; never signs anything
    from_block = args.from_block if args.from_block is not None else settings.from_block
    return SettlementClient(node, contract, key, policy=settings.policy,
                            from_block=from_block), settings


def _channel_id(text: str) -> bytes:
    try:
        value = bytes.fromhex(text.removeprefix("0x"))
    except ValueError:
        value = b""
    if len(value) != 32:
        raise ConfigError(key="channel_id", expected="0x + 64 hex digits", found=text)
    return value


def _print_tx(what: str, tx: TxResult) -> None:
    print(f"{what}: tx 0x{tx.tx_hash.hex()} in block {tx.block_number}, gas {tx.gas_used}")


def cmd_status(args: argparse.Namespace) -> int:
    client, _ = _client(args, need_key=False)
    view = client.view(_channel_id(args.channel_id)).describe()
    if args.json:
        print(json.dumps(view))
    else:
        for key, value in view.items():
            print(f"{key + ':':12} {value}")
    return EXIT_OK


def cmd_close(args: argparse.Namespace) -> int:
    from agent.settlement.model import SignedState

    client, _ = _client(args)
    channel_id = _channel_id(args.channel_id)
    if args.state is None:
        _print_tx("closed (initial state)", client.close(channel_id=channel_id))
        return EXIT_OK
    try:
        signed = SignedState.decode(args.state.read_bytes())
    except OSError as exc:
        raise ConfigError(f"cannot read {args.state}: {exc.strerror}") from None
    if signed.state.channel_id != channel_id:
        raise SettlementError("the state file is for another channel", reason="bad-state")
    if signed.state.final and not args.unilateral:
        tx = client.cooperative_close(signed.state, signed.sig_ev, signed.sig_cs)
        _print_tx(f"settled cooperatively at nonce {signed.state.nonce}", tx)
    else:
        tx = client.close(signed.state, signed.sig_ev, signed.sig_cs)
        deadline = client.record(channel_id).deadline
        _print_tx(f"closing at nonce {signed.state.nonce}; settle after {deadline}", tx)
    return EXIT_OK


def cmd_settle(args: argparse.Namespace) -> int:
    client, _ = _client(args)
    _print_tx("settled", client.settle(_channel_id(args.channel_id)))
    return EXIT_OK


def cmd_watch(args: argparse.Namespace) -> int:
    from agent.settlement.towerstore import TowerStore
    from agent.settlement.watchtower import Watchtower, WatchtowerService, handoffs_from_dir

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    client, settings = _client(args)
    directory = args.states or settings.watch_dir
    if directory is None or not directory.is_dir():
        raise ConfigError(key="watch_dir", expected="a directory of *.handoff files",
                          found=str(directory))
    store_path = args.store or settings.watch_store
    if store_path is None:
        state_dir = _settings(args)[3]
        if state_dir is None:
            raise ConfigError(key="watch_store", expected="a path for the tower's store",
                              found=None)
        store_path = Path(state_dir) / "watchtower.store"
    store = TowerStore(store_path)
    try:
        margin = args.margin if args.margin is not None else settings.margin_s
        tower = Watchtower(client.chain_id, client.address, margin_s=margin, store=store)
        service = WatchtowerService(client, tower, from_block=client.from_block,
                                    sources=[handoffs_from_dir(directory)])
        if args.once:
            sent = service.poll_once()
            print(json.dumps({"challenges": len(sent), **dict(tower.counters)}))
            return EXIT_OK
        try:
            service.run(poll_s=args.poll or settings.poll_s)
        except KeyboardInterrupt:
            pass
        return EXIT_OK
    finally:
        store.close()
