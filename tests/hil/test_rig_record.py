"""The rig's record carries what the report needs beyond the meter (issue 18): session time,
the vehicle's own signals, and each agent's last envelope checked against the capture. A
drive (``charging = False``: the vehicle agent alone through the product's Runtime, a
simulated ECU on a virtual CAN bus, a real mosquitto) is enough to show it."""

from __future__ import annotations

import asyncio
from pathlib import Path

from agent.envelope import open_envelope
from agent.errors import EdgeAgentError
from agent.fleet_keys import FleetRegistry
from hil.report import SOC, render_html
from hil.session.rig import ECU_ID, Rig, RigSettings


class Drive(Rig):
    """Drives until the verifier has seen the car's state of charge three times."""

    async def timeline(self, tg: asyncio.TaskGroup, stop: asyncio.Event) -> None:
        while self._soc_seen() < 3:
            await asyncio.sleep(0.1)

    def _soc_seen(self) -> int:
        registry = FleetRegistry.load(self.out / "fleet.toml")
        seen = 0
        for data in dict.fromkeys(self.captured):
            try:
                opened = open_envelope(data, registry.lookup)
            except EdgeAgentError:  # not yet verifiable here: counted once it is
                continue
            seen += sum(1 for r in opened.readings if r.name == SOC)
        return seen


def test_a_drive_records_session_time_the_cars_signals_and_its_last_envelope(tmp_path: Path
                                                                              ) -> None:
    rig = Drive(tmp_path / "out", RigSettings(charging=False, timeout_s=120), say=lambda _: None)
    record = asyncio.run(rig.run())
    assert record.time_scale == rig.settings.ecu_time_scale  # the car's clock on a drive
    (tail,) = record.tails
    assert tail.role == "vehicle" and tail.captured and tail.last_seq >= 1
    assert rig.verify_report.devices[tail.device].last_seq == tail.last_seq
    (soc,) = [s for s in record.signals if s.chart == "soc"]
    assert (soc.device, soc.source, soc.name) == (tail.device, ECU_ID, SOC)
    assert sum(1 for r in record.readings if r.name == SOC) >= 3
    page = render_html(record)
    assert 'aria-label="State of charge"' in page and "Last envelopes" in page
