"""The hil-meter source: Modbus TCP polling of an in-process simulator the caller drives."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from agent.errors import ConfigError
from agent.readings import Reading
from firmware_adapters.registry import source_class
from hil.sim.meter_source import HilMeterSource
from tests.firmware_adapters.modbus.support import Sink


def test_registry_kind() -> None:
    assert source_class("hil-meter") is HilMeterSource


def test_emits_import_export_and_power_and_follows_the_profile() -> None:
    source = HilMeterSource.from_options(
        "meter0", {"map": "sdm630", "power_w": 11_000, "interval_s": 0.05}, "demo.toml")
    sink = Sink()

    def latest(name: str) -> int | None:
        found = [r.value for r in sink.readings if r.name == name]
        return found[-1] if found else None  # type: ignore[return-value]

    async def main():
        task = asyncio.create_task(source.run(sink))
        try:
            await asyncio.wait_for(source.started.wait(), 10)
            await sink.wait(lambda: latest("1-0:16.7.0") == 11_000)
            source.simulator.set_power(-3_000)
            await sink.wait(lambda: latest("1-0:16.7.0") == -3_000)
            imported, exported = source.simulator.energy_wh()
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        return imported, exported

    imported, exported = asyncio.run(main())
    names = {r.name for r in sink.readings}
    assert {"1-0:1.8.0", "1-0:2.8.0", "1-0:16.7.0"} <= names
    assert all(isinstance(r, Reading) and r.source == "meter0" for r in sink.readings)
    assert latest("1-0:1.8.0") <= imported + 1 and imported >= 12_345_600
    assert sink.problems() == []
    assert source.port is not None


@pytest.mark.parametrize(("options", "key"), [
    ({"map": 3}, "sources.m.map"),
    ({"unit": 300}, "sources.m.unit"),
    ({"profile": [[5, 100]]}, "sources.m.profile"),
    ({"interval_s": 0}, "sources.m.interval_s"),
    ({"colour": "blue"}, "sources.m.colour"),
])
def test_config_errors(options, key) -> None:
    with pytest.raises(ConfigError) as info:
        HilMeterSource.from_options("m", options, "demo.toml")
    assert info.value.key == key and info.value.file == "demo.toml"


def test_profile_option() -> None:
    source = HilMeterSource.from_options("m", {"profile": [[0, 7000], [60, -2000]]}, "x")
    assert source.simulator.meters[1].power_w == 7_000


def test_time_scale_accrues_energy_fast_and_stays_plausible() -> None:
    # 36 kW at 3600x: 10 kWh per real second; the plausibility check runs on the same
    # scaled time, so no step is flagged.
    source = HilMeterSource.from_options(
        "m", {"map": "abb_b23", "power_w": 36_000, "interval_s": 0.05, "time_scale": 3600},
        "demo.toml")
    sink = Sink()

    async def main():
        task = asyncio.create_task(source.run(sink))
        try:
            await sink.wait(lambda: len([r for r in sink.readings
                                         if r.name == "1-0:1.8.0"]) >= 5)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    asyncio.run(main())
    energy = [r.value for r in sink.readings if r.name == "1-0:1.8.0"]
    assert energy == sorted(energy) and energy[-1] - energy[0] >= 1_000
    assert sink.problems() == [] and all(r.flags == () for r in sink.readings)
