"""What one poll cycle's readings cost on their way to the spool, at one cycle a second.

The steady-state bench (bench/steady.py) gives an agent's CPU as a whole; this one splits
the pipeline's part of it, in one process, with nothing else running: per cycle, 16
readings (a meter's poll) built; built and sealed into one envelope (deterministic CBOR,
COSE_Sign1, Ed25519, the hash chain); built, sealed and committed to a spool (SQLite, WAL,
``synchronous=FULL``: an fsync per commit) as the agent does. Each stage is run paced, one
cycle a second for ``--seconds`` (the agent's rate: the code runs with cold caches), and
back to back (``--hot`` cycles), so the cost of running cold is seen beside the code's own.
The stages run one after the other, not at once, so they do not disturb each other.

    .venv/bin/python bench/pipeline_stages.py [--seconds 20] [--hot 300]

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from agent.envelope import Sealer
from agent.keys import IdentityKey
from agent.readings import Reading
from agent.spool import Outgoing, Spool, SpoolConfig

READINGS_PER_CYCLE = 16


def _cycle(stage: str, sealer: Sealer, spool: Spool | None) -> Callable[[], None]:
    names = [f"Meter.Quantity{i}" for i in range(READINGS_PER_CYCLE)]

    def cycle() -> None:
        now = time.time_ns()
        readings = [Reading(name, 1_234_567 + i, "mW", now, source="meter0")
                    for i, name in enumerate(names)]
        if stage == "build":
            return
        envelope = sealer.seal_readings(readings)
        if spool is not None:
            spool.commit([Outgoing(envelope, "evedge/v1/bench/telemetry")], sealer)

    return cycle


def _cpu_us_per_cycle(cycle: Callable[[], None], cycles: int, paced: bool) -> float:
    for _ in range(3):  # imports, first-use caches
        cycle()
    started = time.process_time()
    for _ in range(cycles):
        begun = time.monotonic()
        cycle()
        if paced:
            time.sleep(max(0.0, 1.0 - (time.monotonic() - begun)))
    return round((time.process_time() - started) / cycles * 1e6, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=20, help="paced cycles per stage")
    parser.add_argument("--hot", type=int, default=300, help="back-to-back cycles per stage")
    args = parser.parse_args()
    figures: dict[str, object] = {"bench": "pipeline_stages",
                                  "readings_per_cycle": READINGS_PER_CYCLE}
    with tempfile.TemporaryDirectory(prefix="stages-") as tmp:
        for stage in ("build", "seal", "spool"):
            sealer = Sealer(IdentityKey.generate(), "dev-bench-0001", os.urandom(16))
            spool = Spool.open(SpoolConfig(path=Path(tmp) / f"{stage}.sqlite")) \
                if stage == "spool" else None
            cycle = _cycle(stage, sealer, spool)
            print(f"pipeline_stages.py: {stage}: {args.seconds} s paced", flush=True,
                  file=sys.stderr)
            figures[stage] = {
                "cold_cpu_us_per_cycle": _cpu_us_per_cycle(cycle, args.seconds, paced=True),
                "hot_cpu_us_per_cycle": _cpu_us_per_cycle(cycle, args.hot, paced=False)}
            if spool is not None:
                spool.close()
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
