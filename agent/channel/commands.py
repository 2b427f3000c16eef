"""``edge-agent charge start | stop | status``: the driver's side of a charging session,
talking to the running vehicle agent through its control socket (agent/channel/control.py).

Registered through the ``edge_agent.commands`` entry point (pyproject.toml). The socket is
``--socket``, else the ``[channel] control_socket`` of ``--config``, else
``<state dir>/control.sock`` of ``--config``'s ``[device] state_dir``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

from agent.errors import ConfigError

EXIT_OK, EXIT_FAIL = 0, 1


def _socket(args: argparse.Namespace) -> Path:
    if args.socket is not None:
        return Path(args.socket)
    if args.config is None:
        raise ConfigError("charge: give --config FILE (the vehicle agent's) or --socket PATH")
    from agent.config import load_config
    from agent.options import Table

    config = load_config(args.config)
    channel: Table = config.section("channel")
    path = channel.data.get("control_socket")
    if isinstance(path, str) and path:
        return Path(path)
    return config.device.state_dir / "control.sock"


def _ask(args: argparse.Namespace, message: dict[str, object], timeout_s: float) -> int:
    from agent.channel.control import request

    answer = request(_socket(args), message, timeout_s)
    if args.json:
        print(json.dumps(answer))
    elif answer.get("ok"):
        _print_ok(message["op"], answer)
    else:
        print(f"refused: {answer.get('reason')}: {answer.get('detail', '')}")
    return EXIT_OK if answer.get("ok") else EXIT_FAIL


def _print_ok(op: object, answer: dict[str, object]) -> None:
    if op == "start":
        print(f"session started at {answer['station']} connector {answer['connector']}: "
              f"channel 0x{answer['channel']}")
    elif op == "stop":
        print(f"stopping the session on channel 0x{answer['channel']} (the final state is "
              "settled on chain by the agents)")
    else:
        sessions = answer.get("sessions") or []
        if not isinstance(sessions, list) or not sessions:
            print("no sessions")
            return
        for s in sessions:
            if isinstance(s, dict):
                print(f"0x{str(s.get('channel'))[:16]}.. {s.get('state')} nonce {s.get('nonce')}"
                      f": {s.get('energy_wh')} Wh, paid {s.get('t_ev')} / received "
                      f"{s.get('t_cs')}, settlement {s.get('settlement') or '-'}"
                      + (f", ended: {s.get('end_reason')}" if s.get("end_reason") else ""))


def cmd_start(args: argparse.Namespace) -> int:
    message: dict[str, object] = {"op": "start", "station": args.station,
                                  "connector": args.connector}
    if args.max_wh is not None:
        message["max_wh"] = args.max_wh
    if args.max_price is not None:
        message["max_price"] = args.max_price
    return _ask(args, message, args.timeout)


def cmd_stop(args: argparse.Namespace) -> int:
    return _ask(args, {"op": "stop"}, args.timeout)


def cmd_status(args: argparse.Namespace) -> int:
    return _ask(args, {"op": "status"}, args.timeout)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1: {text}")
    return value


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    charge = subparsers.add_parser(
        "charge", help="start, stop or show a charging session of the running vehicle agent",
        description="Start, stop or show a charging session of the running vehicle agent "
                    "(through its local control socket).")
    sub = charge.add_subparsers(dest="charge_command", metavar="ACTION", required=True)

    def add(name: str, func: Callable[[argparse.Namespace], int],
            text: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(name, help=text, description=text)
        p.set_defaults(func=func)
        p.add_argument("--config", type=Path, help="the vehicle agent's config file")
        p.add_argument("--socket", type=Path, help="the agent's control socket (overrides "
                       "--config)")
        p.add_argument("--timeout", type=float, default=60.0,
                       help="seconds to wait for the agent's answer (default 60)")
        p.add_argument("--json", action="store_true", help="print the answer as JSON")
        return p

    p = add("start", cmd_start, "ask a station for a session at one of its connectors; "
            "exit 0 when it accepted, 1 with the reason when it refused")
    p.add_argument("--station", required=True, help="the station's device id")
    p.add_argument("--connector", required=True, type=_positive_int, help="connector number")
    p.add_argument("--max-wh", type=_positive_int, help="stop after this much energy (Wh)")
    p.add_argument("--max-price", type=_positive_int,
                   help="refuse a tariff above this (token's smallest unit per kWh)")
    add("stop", cmd_stop, "stop the running session (it is settled on chain by itself)")
    add("status", cmd_status, "the agent's sessions: phase, energy, paid, settlement")

