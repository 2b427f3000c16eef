"""The CLI commands that live with the simulators: ``edge-agent demo`` and ``edge-agent hil``.

Registered through the ``edge_agent.commands`` entry point (pyproject.toml), so the core CLI
never imports ``hil`` (DESIGN s2). This module stays light: the rig, the chain and the
simulators are imported only when a command runs, so ``edge-agent --help`` and ``status``
start fast on a Pi.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register_demo(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``edge-agent demo``."""
    p = subparsers.add_parser(
        "demo", help="run a whole simulated session on embedded defaults and verify every "
        "envelope (no hardware, no config)", description="Run a whole simulated charging "
        "session on embedded defaults and verify every envelope (no hardware, no config).")
    p.add_argument("--out", type=Path, default=Path("demo-out"),
                   help="directory for the capture, registry and report (default: ./demo-out)")
    p.add_argument("--energy-wh", type=_energy_wh, default=None,
                   help="energy to charge in Wh, 1 to 200000 (default 3000)")
    p.set_defaults(func=_run_demo)


def _energy_wh(text: str) -> int:
    """A session charges something: 0 or a negative energy is refused before anything runs."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of Wh, found {text}") from None
    if not 1 <= value <= 200_000:
        raise argparse.ArgumentTypeError(f"expected 1 to 200000 Wh, found {value}")
    return value


def _run_demo(args: argparse.Namespace) -> int:
    from hil.session.demo import run_demo

    return run_demo(args)


def register_hil(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``edge-agent hil run|list`` (the runner imports only the scenario format)."""
    from hil.scenarios.runner import register

    register(subparsers)
