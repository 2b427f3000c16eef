"""DBC ingest: frames/s our ``dbc`` source decodes at a saturated 1 Mbit/s bus rate, one core.

Prints one JSON line. A sender thread offers frames of the test DBC (three messages, round
robin, values changing every frame) on a python-can virtual bus at ``--fps`` (default 8,000:
a 1 Mbit/s bus full of 8-byte standard frames carries about 8,000 frames/s) for
``--seconds``; the ``dbc`` source (reader thread + cantools decode + Reading construction +
an awaited emit) consumes them. The process is pinned to one CPU, sender included, so the
figure is what one core sustains. ``lost`` = offered - decoded after a 2 s drain. The
reference in the same run is cantools' bare ``decode`` rate on the same frames.

    .venv/bin/python bench/can_ingest.py [--fps 8000] [--seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import threading
import time
import uuid
from pathlib import Path

import can
import cantools

from firmware_adapters.dbc import DbcSource

DBC = Path(__file__).resolve().parent.parent / "tests" / "data" / "dbc" / "ev_test.dbc"
SIGNALS = {
    "VehicleSpeed.Speed": "Vehicle.Speed",
    "BMS_Status.SoC": "Vehicle.Powertrain.TractionBattery.StateOfCharge.Current",
    "BMS_Status.PackVoltage": "Vehicle.Powertrain.TractionBattery.CurrentVoltage",
    "BMS_Status.PackCurrent": "Vehicle.Powertrain.TractionBattery.CurrentCurrent",
    "Cluster_Odometer.Odometer": "Vehicle.TraveledDistance",
}


def frames(db: cantools.database.can.Database, n: int) -> list[can.Message]:
    out = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            m, v = db.get_message_by_name("VehicleSpeed"), {"Speed": i % 130, "Gear": 3}
        elif kind == 1:
            m, v = db.get_message_by_name("BMS_Status"), {
                "SoC": 50 + i % 50, "PackVoltage": 390.0, "PackCurrent": -(i % 200),
                "Charging": 0}
        else:
            m, v = db.get_message_by_name("Cluster_Odometer"), {
                "Odometer": 1000 + i * 0.0001, "AmbientTemp": 18}
        out.append(can.Message(arbitration_id=m.frame_id, is_extended_id=m.is_extended_frame,
                               data=m.encode(v)))
    return out


def send_paced(bus: can.BusABC, msgs: list[can.Message], fps: int) -> float:
    """Send at ``fps`` in 1 ms slots; returns the seconds it took."""
    start = time.perf_counter()
    per_slot = max(1, fps // 1000)
    for i in range(0, len(msgs), per_slot):
        for msg in msgs[i:i + per_slot]:
            bus.send(msg)
        ahead = start + (i + per_slot) / fps - time.perf_counter()
        if ahead > 0:
            time.sleep(ahead)
    return time.perf_counter() - start


async def ingest(fps: int, seconds: float) -> dict[str, float]:
    channel = f"ingest-{uuid.uuid4().hex}"
    db = cantools.database.load_file(str(DBC))
    msgs = frames(db, int(fps * seconds))
    src = DbcSource.from_options("bench", {"dbc": str(DBC), "interface": "virtual",
                                           "channel": channel, "signals": SIGNALS}, "bench")
    readings = 0

    async def emit(item: object) -> None:
        nonlocal readings
        readings += 1

    task = asyncio.create_task(src.run(emit))
    await asyncio.sleep(0.3)  # bus open, reader thread running
    peer = can.Bus(interface="virtual", channel=channel)
    sent: list[float] = []
    thread = threading.Thread(target=lambda: sent.append(send_paced(peer, msgs, fps)))
    start = time.perf_counter()
    thread.start()
    while thread.is_alive():
        await asyncio.sleep(0.05)
    drain_until = time.perf_counter() + 2.0
    while src.counters["frames-decoded"] < len(msgs) and time.perf_counter() < drain_until:
        await asyncio.sleep(0.01)
    elapsed = time.perf_counter() - start
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    peer.shutdown()
    decoded = src.counters["frames-decoded"]
    return {"offered_fps": round(len(msgs) / sent[0], 1),
            "decoded_fps": round(decoded / elapsed, 1),
            "lost": len(msgs) - decoded, "readings": readings}


def cantools_rate(seconds: float = 1.0) -> float:
    db = cantools.database.load_file(str(DBC))
    msgs = frames(db, 3000)
    by_id = {m.frame_id: m for m in db.messages}
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for msg in msgs:
            by_id[msg.arbitration_id].decode(msg.data, decode_choices=False)
        n += len(msgs)
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fps", type=int, default=8000)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    result = asyncio.run(ingest(args.fps, args.seconds))
    result["cantools_decode_fps"] = round(cantools_rate(), 1)
    result["cpus"] = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0
    print(json.dumps(result))


if __name__ == "__main__":
    main()
