"""``edge-agent hil run SCENARIO`` and ``edge-agent hil list``: run a scenario file on the rig
and judge it.

Public API::

    record = run_scenario(load_scenario("hil/scenarios/broker-outage.toml"), Path("out"),
                          time_scale=10.0)
    record.passed          # True when every expectation held
    record.expectations    # one ExpectationResult (name, check, passed, detail) each

``run_scenario`` drives :class:`hil.scenarios.rig.ScenarioRig` (the demo's rig with the
scenario's profile and faults), judges the record with the scenario scaled to the wall
clock (:meth:`hil.scenarios.scenario.Scenario.scaled`), and writes ``session.json`` and
``session.html`` (hil/report.py) into ``out_dir``. The command prints one PASS/FAIL line
per expectation and the report's path; it exits 0 when all pass, 1 otherwise.

This module imports only the scenario format at load time, so ``edge-agent --help`` does
not pay for the rig (web3, the simulators); ``register(subparsers)`` is what agent/cli.py
calls.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

from agent.errors import ConfigError
from hil.report import SessionRecord, write_report
from hil.scenarios.scenario import Scenario, builtin_scenarios, load_scenario

DEFAULT_TIME_SCALE = 10.0   # a 150 s scenario in ~15 s of charging (+ ~4 s of set-up)


def run_scenario(scenario: Scenario, out_dir: Path, *, time_scale: float = DEFAULT_TIME_SCALE,
                 say: Callable[[str], None] = lambda text: None,
                 timeout_s: float | None = None) -> SessionRecord:
    """Run ``scenario`` on the rig, judge it and write the report into ``out_dir``. A
    session that has not ended after ``timeout_s`` wall seconds (default: twice its scaled
    length plus two minutes) is stopped and judged on what it recorded (a ``run-timeout``
    event, no receipt: it fails)."""
    return asyncio.run(run_scenario_async(scenario, out_dir, time_scale=time_scale, say=say,
                                          timeout_s=timeout_s))


async def run_scenario_async(scenario: Scenario, out_dir: Path, *,
                             time_scale: float = DEFAULT_TIME_SCALE,
                             say: Callable[[str], None] = lambda text: None,
                             timeout_s: float | None = None) -> SessionRecord:
    from hil.scenarios.rig import ScenarioRig  # the rig: web3, simulators (see module doc)

    if not time_scale > 0:
        raise ConfigError(key="time_scale", expected="a number > 0", found=time_scale)
    rig = ScenarioRig(out_dir, scenario, time_scale, say, timeout_s)
    record = rig.finish(await rig.run())
    judged = scenario.scaled(time_scale).judge(record)
    write_report(judged, out_dir)
    return judged


def resolve(name: str) -> Path:
    """A scenario file path, or the name of a built-in one (``broker-outage``)."""
    path = Path(name)
    if path.suffix == ".toml" or path.exists():
        return path
    for builtin in builtin_scenarios():
        if builtin.stem == name:
            return builtin
    names = ", ".join(p.stem for p in builtin_scenarios())
    raise ConfigError(key="scenario", expected=f"a .toml file or one of: {names}", found=name)


# --- the commands ---------------------------------------------------------------------------

def cmd_run(args: argparse.Namespace) -> int:
    scenario = load_scenario(resolve(args.scenario))
    out: Path = args.out or Path("hil-out") / scenario.name
    if out.exists():
        shutil.rmtree(out)
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    # With --json, stdout is the one result object; progress goes to stderr.
    progress = sys.stderr if args.json else sys.stdout
    print(f"hil: {scenario.name}: {scenario.description} ({scenario.duration_s:g} s simulated "
          f"at x{args.time_scale:g}); output in {out}/", flush=True, file=progress)
    started = time.monotonic()
    record = run_scenario(scenario, out, time_scale=args.time_scale,
                          say=lambda text: print(f"  {text}", flush=True, file=progress))
    passed = bool(record.passed)
    if args.json:
        print(json.dumps({
            "scenario": scenario.name, "passed": passed,
            "expectations": [{"name": r.name, "passed": r.passed, "detail": r.detail}
                             for r in record.expectations],
            "timed_out": any(e.code == "run-timeout" for e in record.events),
            "elapsed_s": round(time.monotonic() - started, 1),
            "report": str(out / "session.html")}))
        return 0 if passed else 1
    print()
    for result in record.expectations:
        print(f"{'PASS' if result.passed else 'FAIL'}  {result.name}: {result.detail}")
    for event in record.events:
        if event.code == "run-timeout":
            print(f"note: {event.message}: judged on what was recorded until then")
    print(f"\n{scenario.name}: {'PASS' if passed else 'FAIL'} "
          f"({sum(r.passed for r in record.expectations)}/{len(record.expectations)} "
          f"expectations) in {time.monotonic() - started:.1f} s; report {out / 'session.html'}")
    return 0 if passed else 1


def cmd_list(args: argparse.Namespace) -> int:
    scenarios = [load_scenario(path) for path in builtin_scenarios()]
    if args.json:
        print(json.dumps([{"name": s.name, "duration_s": s.duration_s,
                           "faults": [f.kind for f in s.faults], "description": s.description}
                          for s in scenarios]))
        return 0
    for scenario in scenarios:
        faults = ", ".join(f.kind for f in scenario.faults) or "no fault"
        print(f"{scenario.name:<20} {scenario.duration_s:>5g} s  {faults:<20}  "
              f"{scenario.description}")
    return 0


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, found {text}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0: {text}")
    return value


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``edge-agent hil run|list`` (registered through hil/commands.py)."""
    hil = subparsers.add_parser(
        "hil", help="hardware-in-the-loop scenarios: run one and judge its expectations",
        description="Run a scenario (hil/scenarios/*.toml, or a file) on the rig: broker, "
                    "in-process chain, simulated meter and ECU, both agents, faults on a "
                    "timeline; writes session.html/json with PASS/FAIL per expectation.")
    sub = hil.add_subparsers(dest="hil_command", metavar="ACTION", required=True)
    run = sub.add_parser("run", help="run one scenario; exit 0 when every expectation passes",
                         description="Run one scenario; exit 0 when every expectation passes.")
    scenario = run.add_argument("scenario",
                                help="a built-in scenario name (see `hil list`) or a .toml file")
    # what `edge-agent completion` offers here (a file name works too: complete -o default)
    scenario.completion_words = [p.stem for p in builtin_scenarios()]  # type: ignore[attr-defined]
    run.add_argument("--out", type=Path, default=None,
                     help="directory for the report (default: ./hil-out/<scenario>)")
    run.add_argument("--time-scale", type=_positive, default=DEFAULT_TIME_SCALE,
                     help=f"simulated seconds per wall second (default {DEFAULT_TIME_SCALE:g})")
    run.add_argument("--json", action="store_true",
                     help="print one JSON object with the verdicts (progress on stderr)")
    run.set_defaults(func=cmd_run)
    listing = sub.add_parser("list", help="the built-in scenarios",
                             description="The built-in scenarios.")
    listing.add_argument("--json", action="store_true", help="one JSON array")
    listing.set_defaults(func=cmd_list)
