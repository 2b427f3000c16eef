"""A streaming agent in its own process, for tests that SIGKILL it (test_telemetry.py).

    python tests/agent/telemetry_agent.py --url mqtt://127.0.0.1:PORT --spool S.sqlite \
        --seed HEX --device dev-a [--rate 2000] [--count N] [--exit-when-drained]

Opens the spool (recovering the chain head), seals readings at ``--rate`` per second into
envelopes and streams them through the real pipeline. Prints one JSON line of counters when
it exits on its own (``--count`` + ``--exit-when-drained``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from agent.config import BatchConfig  # noqa: E402
from agent.envelope import Sealer  # noqa: E402
from agent.keys import IdentityKey  # noqa: E402
from agent.readings import Reading  # noqa: E402
from agent.spool import Spool, SpoolConfig  # noqa: E402
from agent.telemetry import Pipeline, SpoolWorker  # noqa: E402
from agent.uplink import MqttConfig, Uplink, status_topic  # noqa: E402


async def produce(pipeline: Pipeline, rate: int, count: int | None) -> None:
    tick_s = 0.01
    per_tick = max(1, rate // 100)
    n = 0
    while count is None or n < count:
        for _ in range(per_tick if count is None else min(per_tick, count - n)):
            await pipeline.emit(Reading("Vehicle.Speed", n % 250, "km/h", n, source="sim"))
            n += 1
        await asyncio.sleep(tick_s)


async def main(args: argparse.Namespace) -> int:
    spool = Spool.open(SpoolConfig(Path(args.spool), max_bytes=args.max_bytes))
    sealer = Sealer(IdentityKey(bytes.fromhex(args.seed)), args.device, os.urandom(16),
                    next_seq=spool.next_seq, prev_hash=spool.head)
    worker = SpoolWorker(spool)
    config = MqttConfig.from_url(args.url, args.device, status_topic=status_topic(args.device),
                                 backoff_initial_s=0.05, backoff_max_s=0.5, keepalive_s=5,
                                 window=args.window)
    async with Uplink(config) as up:
        pipeline = Pipeline(sealer, worker, up, args.device,
                            batch=BatchConfig(max_readings=args.batch, max_age_ms=50))
        async with asyncio.TaskGroup() as tg:
            seal = tg.create_task(pipeline.run_sealer(), name="telemetry.seal")
            publish = tg.create_task(pipeline.run_publisher(), name="telemetry.publish")
            await produce(pipeline, args.rate, args.count)
            if args.exit_when_drained:
                await pipeline.wait_drained(args.drain_timeout)
                seal.cancel()
                publish.cancel()
    worker.close()
    print(json.dumps(dict(pipeline.counters)), flush=True)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--spool", required=True)
    parser.add_argument("--seed", required=True)
    parser.add_argument("--device", default="dev-a")
    parser.add_argument("--rate", type=int, default=2000)
    parser.add_argument("--count", type=int)
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--max-bytes", type=int, default=64 * 1024 * 1024)
    parser.add_argument("--exit-when-drained", action="store_true")
    parser.add_argument("--drain-timeout", type=float, default=60.0)
    sys.exit(asyncio.run(main(parser.parse_args())))
