"""``edge-agent demo``: a self-contained run on embedded defaults.

Stage 1 (foundation): a simulated vehicle source -> batches -> signed, hash-chained envelopes
-> a capture file -> the verifier, with keys provisioned the way a technician would. The
charging session (meter, broker, payment channel, chain) is wired in as those parts land.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import time
from pathlib import Path

from agent.envelope import Batcher, Sealer
from agent.keys import KeyStore
from agent.readings import Reading, TimeStatus
from agent.registry import FleetRegistry
from agent.verify import verify_capture


def simulated_drive(seconds: int, start_ns: int) -> list[Reading]:
    """A 1 Hz drive: speed ramps and settles, odometer integrates it, SoC falls."""
    readings = []
    odometer_m = 12_345_000.0
    for t in range(seconds):
        speed = round(50 + 40 * math.sin(t / 20), 1)
        odometer_m += speed / 3.6
        ts = start_ns + t * 1_000_000_000
        readings += [
            Reading("Vehicle.Speed", speed, "km/h", ts, TimeStatus.SYNCED, "sim0"),
            Reading("Vehicle.TraveledDistance", int(odometer_m // 1000), "km", ts,
                    TimeStatus.SYNCED, "sim0"),
            Reading("Vehicle.Powertrain.TractionBattery.StateOfCharge.Current",
                    round(80 - t * 0.01, 2), "%", ts, TimeStatus.SYNCED, "sim0"),
        ]
    return readings


def run_demo(args: argparse.Namespace) -> int:
    out: Path = args.out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    seconds = int(args.seconds or 120)
    print(f"edge-agent demo: output in {out}/")

    store = KeyStore(out / "vehicle-state")
    keys, record = store.init("demo-vehicle")
    registry = FleetRegistry()
    registry.add_record(record)
    registry.save(out / "fleet.toml")
    print(f"  provisioned device {keys.device_id} (kid {keys.identity.kid.hex()}), "
          f"admitted to {out / 'fleet.toml'} after its proof of possession")

    sealer = Sealer(keys.identity, keys.device_id, os.urandom(16))
    batcher = Batcher(max_readings=30, max_age_ns=5_000_000_000)
    started = time.perf_counter()
    envelopes = []
    for reading in simulated_drive(seconds, time.time_ns()):
        batch = batcher.add(reading, reading.ts_ns)
        if batch:
            envelopes.append(sealer.seal_readings(batch))
    rest = batcher.flush(0, force=True)
    if rest:
        envelopes.append(sealer.seal_readings(rest))
    capture = out / "capture.cbor"
    capture.write_bytes(b"".join(e.data for e in envelopes))
    elapsed = time.perf_counter() - started
    print(f"  sealed {seconds * 3} simulated readings into {len(envelopes)} envelopes "
          f"in {elapsed * 1000:.1f} ms -> {capture}")

    report = verify_capture(capture.read_bytes(), registry)
    print("  verification:")
    for line in report.format().splitlines():
        print(f"    {line}")
    print("  not wired yet in this build: charging session, payment channel, settlement.")
    print(f"  check it yourself: edge-agent verify {capture} --registry {out / 'fleet.toml'}")
    return 0 if report.ok else 1
