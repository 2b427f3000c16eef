"""Envelope sealing throughput beside PyNaCl's raw Ed25519 sign rate, measured in one run.

Prints one JSON line. For each batch size (1, 10, 100) it seals envelopes of vehicle-like
readings (Reading -> CBOR -> COSE_Sign1 -> SHA-256 chain link); the reference is
``nacl.signing.SigningKey.sign`` over a message of the same size as the batch-1
Sig_structure. Rounds are interleaved and the best round of each kept, so background load
hits both sides alike.

    .venv/bin/python bench/envelope.py [--seconds 0.5] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import nacl.signing

from agent.envelope import Sealer
from agent.keys import IdentityKey
from agent.readings import Reading


def rate(func, seconds: float) -> float:
    count, start = 0, time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(50):
            func()
        count += 50
        now = time.perf_counter()
        if now >= deadline:
            return count / (now - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    identity = IdentityKey.generate()
    sealer = Sealer(identity, "dev-bench-0001", os.urandom(16))
    now = time.time_ns()
    batches = {size: [Reading("Vehicle.Speed", 50.5 + i, "km/h", now + i, source="obd0")
                      for i in range(size)] for size in (1, 10, 100)}
    one = sealer.seal_readings(batches[1])
    message = bytes(len(one.data) - 64)  # ~ the Sig_structure the sealer signs
    raw_key = nacl.signing.SigningKey.generate()

    best: dict[str, float] = {}
    for _ in range(args.rounds):
        figures = {"raw": rate(lambda: raw_key.sign(message), args.seconds)}
        for size, batch in batches.items():
            figures[f"b{size}"] = rate(lambda b=batch: sealer.seal_readings(b), args.seconds)
        for name, value in figures.items():
            best[name] = max(best.get(name, 0.0), value)

    result = {
        "bench": "envelope",
        "raw_sign_per_s": round(best["raw"]),
        "raw_sign_message_bytes": len(message),
        "b1_envelopes_per_s": round(best["b1"]),
        "b1_ratio_to_raw_sign": round(best["b1"] / best["raw"], 3),
        "b10_envelopes_per_s": round(best["b10"]),
        "b10_readings_per_s": round(best["b10"] * 10),
        "b100_envelopes_per_s": round(best["b100"]),
        "b100_readings_per_s": round(best["b100"] * 100),
        "b1_envelope_bytes": len(one.data),
        "targets": {"b1_ratio_to_raw_sign": 0.6, "b100_readings_per_s": 200_000},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
