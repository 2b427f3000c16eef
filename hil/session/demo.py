"""``edge-agent demo``: one whole charging session on embedded defaults (hil/session/rig.py), with
progress while charging, a receipt whose figures are cross-checked, and an HTML/JSON report.

``edge-agent demo`` reaches this module through hil/commands.py (an ``edge_agent.commands``
entry point, as the source registry finds the ``hil-*`` kinds), so the core package never
depends on the simulators.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import TextIO

from hil.report import write_report
from hil.session.rig import TOKEN_DECIMALS, Rig, RigSettings


def _money(amount: int) -> str:
    return f"{amount / 10**TOKEN_DECIMALS:,.6f} EVT"


def receipt_checks(rig: Rig, record) -> list[tuple[str, bool, str]]:
    """The receipt's figures, each checked against an independent source."""
    r, v = record.receipt, record.verification
    expected_paid = r.paid_wh * r.price_per_kwh // 1000  # floor, the channel's rounding rule
    step = rig.settings.pay_step_wh
    checks = [
        ("paid = tariff x paid energy (floor)", r.paid == expected_paid,
         f"{_money(r.paid)} = {r.paid_wh} Wh x {_money(r.price_per_kwh)}/kWh"),
        # what the meter counted after the last co-signed state (the stop takes a poll to
        # reach the wallbox; at the demo's x120 that is tens of Wh) stays within the credit
        # window the station grants beyond a pay step
        ("unpaid energy within a pay step plus the credit window",
         0 <= r.energy_wh - r.paid_wh < step + rig.settings.credit_window_wh,
         f"metered {r.energy_wh} Wh, paid for {r.paid_wh} Wh"),
        ("station received on chain exactly what was paid", rig.balances["station"] == r.paid,
         f"station balance {_money(rig.balances['station'])}"),
        ("vehicle got its deposit back less the payment",
         rig.balances["vehicle"] == 2 * rig.settings.deposit_ev - r.paid,
         f"vehicle balance {_money(rig.balances['vehicle'])}"),
        ("every envelope verifies", bool(v and v.ok),
         f"{v.envelopes if v else 0} envelopes, {v.readings if v else 0} readings"),
        ("each agent's last envelope reached the capture",
         bool(record.tails) and all(t.captured for t in record.tails),
         ", ".join(f"{t.role} seq {t.last_seq}{'' if t.captured else ' MISSING'}"
                   for t in record.tails)),
    ]
    return checks


class Heartbeat:
    """The demo's console: each step as the rig says it, and a "still ..." line after every
    second without one, so a slow step (deploying the contract, settling) never looks like
    a hang. A thread, because a slow step may block the rig's event loop."""

    INTERVAL_S = 1.0

    def __init__(self, out: TextIO = sys.stdout) -> None:
        self.out = out
        self._last = "starting"
        self._since = time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="demo-heartbeat", daemon=True)

    def say(self, text: str) -> None:
        with self._lock:
            print(f"  {text}", file=self.out, flush=True)
            self._last, self._since = text, time.monotonic()

    def _run(self) -> None:
        quiet_since = time.monotonic()
        while not self._stop.wait(0.25):
            with self._lock:
                now = time.monotonic()
                if now - max(self._since, quiet_since) >= self.INTERVAL_S:
                    step = self._last.split(":")[0]
                    print(f"    ... still {step} ({now - self._since:.0f} s)", file=self.out,
                          flush=True)
                    quiet_since = now

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_demo(args: argparse.Namespace) -> int:
    out: Path = args.out
    if out.exists():
        shutil.rmtree(out)
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    settings = RigSettings()
    if args.energy_wh:
        settings = RigSettings(energy_wh=args.energy_wh)
    print(f"edge-agent demo: a charging session of {settings.energy_wh / 1000:.1f} kWh at "
          f"{settings.power_w / 1000:.0f} kW (simulated time x{settings.time_scale:.0f}); "
          f"output in {out}/", flush=True)
    started = time.monotonic()
    with Heartbeat() as heartbeat:
        heartbeat.say("starting: keys, broker, in-process chain and simulators")
        rig = Rig(out, settings, say=heartbeat.say)
        record = asyncio.run(rig.run())
        heartbeat.say("writing the report")
        data, html = write_report(record, out)
    r, v = record.receipt, record.verification
    print("\nreceipt")
    rows = [
        ("channel", "0x" + r.channel_id),
        ("energy", f"{r.energy_wh / 1000:.3f} kWh metered (signed meter readings), "
                   f"{r.paid_wh / 1000:.3f} kWh paid for"),
        ("tariff", f"{_money(r.price_per_kwh)} per kWh, signed by the station"),
        ("payments", f"{r.payments} co-signed channel states (one per signed meter "
                     f"reading, pay step at least {settings.pay_step_wh} Wh)"),
        ("paid", _money(r.paid)),
        ("settlement", f"cooperative close, tx {r.settlement_tx}, block {r.settlement_block}"),
        ("balances", f"vehicle {_money(rig.balances['vehicle'])}, station "
                     f"{_money(rig.balances['station'])}"),
        ("verification", v.text.splitlines()[-1] if v and v.text else "none"),
        ("report", f"{html} ({data.name} beside it), capture {out / 'capture.cbor'}"),
    ]
    for label, text in rows:
        print(f"  {label:<13} {text}")
    print("\nchecks")
    failed = 0
    for name, ok, detail in receipt_checks(rig, record):
        failed += not ok
        print(f"  {'ok  ' if ok else 'FAIL'} {name}: {detail}")
    print(f"\ndone in {time.monotonic() - started:.1f} s. Verify it yourself: edge-agent verify "
          f"{out / 'capture.cbor'} --registry {out / 'fleet.toml'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(run_demo(argparse.Namespace(out=Path("demo-out"), energy_wh=None)))
