"""``kind = "hil-meter"``: a Modbus TCP meter source wired to an in-process meter simulator.

For the demo and the payment-channel tests: the agent polls a simulated meter over real
Modbus TCP on loopback, exactly as it would poll a real one, while the caller drives the
charging profile::

    source = HilMeterSource.from_options("meter0", {"map": "sdm630", "power_w": 11000}, "demo")
    async with asyncio.TaskGroup() as tg:
        tg.create_task(source.run(emit))        # emits 1-0:1.8.0, 1-0:2.8.0, 1-0:16.7.0 ...
        await source.started.wait()
        source.simulator.set_power(-3000)        # V2G from now on
        source.simulator.energy_wh()             # (import Wh, export Wh) on the meter

Options: ``map`` (a built-in map name or a .toml path, default ``sdm630``), ``unit`` (1),
``power_w`` (constant power) or ``profile`` (array of [seconds, W] steps), ``import_wh`` /
``export_wh`` (counters at start), ``interval_s`` (poll period, default 1.0),
``timeout_s``, ``retries``, ``time_scale`` (simulated seconds per real second, default 1:
with 60, energy accrues a minute's worth each second and the plausibility check uses the
same scaled time, so readings stay consistent).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from typing import Self

from agent.errors import ConfigError
from firmware_adapters.base import Clock, Emit, Source, system_clock
from firmware_adapters.modbus.driver import MeterConfig, ModbusTcpSource
from firmware_adapters.modbus.links import PollConfig, TcpLink
from firmware_adapters.modbus.mapfile import load_map
from hil.sim.meter import ChargingProfile, MeterSimulator


class ScaledClock:
    """Monotonic seconds running ``scale`` times faster than real time (a one-hour
    charging session in a one-minute demo with ``scale = 60``)."""

    def __init__(self, scale: float = 1.0) -> None:
        if scale <= 0:
            raise ValueError("time scale must be > 0")
        self.scale = scale
        self.origin = time.monotonic()

    def __call__(self) -> float:
        return self.origin + (time.monotonic() - self.origin) * self.scale


class HilMeterSource(Source):
    kind = "hil-meter"

    def __init__(self, source_id: str, simulator: MeterSimulator, unit: int = 1,
                 poll: PollConfig | None = None, clock: Clock = system_clock,
                 monotonic_ns: Callable[[], int] | None = None) -> None:
        """``simulator`` may run on any clock (a :class:`ManualClock` for tests that step
        time); pass the same time as ``monotonic_ns`` so the plausibility check's
        power x time agrees with the simulated meter."""
        super().__init__(source_id, clock)
        self.simulator = simulator
        self.unit = unit
        self.poll = poll or PollConfig()
        self.monotonic_ns = monotonic_ns or (lambda: int(simulator.clock() * 1e9))
        self.port: int | None = None
        self.started = asyncio.Event()

    @classmethod
    def from_options(cls, source_id: str, options: Mapping[str, object], where: str) -> Self:
        def bad(key: str, expected: str) -> ConfigError:
            return ConfigError(file=where, key=f"sources.{source_id}.{key}", expected=expected,
                               found=options.get(key))

        known = {"id", "kind", "map", "unit", "power_w", "profile", "import_wh", "export_wh",
                 "interval_s", "timeout_s", "retries", "time_scale"}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(file=where, key=f"sources.{source_id}.{unknown[0]}",
                              expected="a known key", found=unknown[0])
        meter_map = options.get("map", "sdm630")
        if not isinstance(meter_map, str):
            raise bad("map", "a map name or a .toml path")
        ints = {}
        for key, default, low, high in (("unit", 1, 1, 247), ("power_w", 0, -10**7, 10**7),
                                        ("import_wh", 12_345_600, 0, 10**15),
                                        ("export_wh", 0, 0, 10**15), ("retries", 1, 0, 10)):
            value = options.get(key, default)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise bad(key, f"an integer in [{low}, {high}]")
            ints[key] = value
        floats = {}
        for key, default in (("interval_s", 1.0), ("timeout_s", 0.5), ("time_scale", 1.0)):
            value = options.get(key, default)
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise bad(key, "a number > 0")
            floats[key] = float(value)
        if "profile" in options:
            try:
                profile = ChargingProfile.from_pairs(options["profile"])  # type: ignore[arg-type]
            except (TypeError, ValueError):
                raise bad("profile", "an array of [seconds, watts] starting at 0") from None
        else:
            profile = ChargingProfile.constant(ints["power_w"])
        simulator = MeterSimulator({ints["unit"]: load_map(meter_map)}, profile,
                                   clock=ScaledClock(floats["time_scale"]),
                                   import_wh=ints["import_wh"], export_wh=ints["export_wh"])
        poll = PollConfig(interval_s=floats["interval_s"], timeout_s=floats["timeout_s"],
                          retries=ints["retries"])
        return cls(source_id, simulator, ints["unit"], poll)

    async def run(self, emit: Emit) -> None:
        self.port = await self.simulator.start_tcp("127.0.0.1", 0)
        model = self.simulator.meters[self.unit]
        inner = ModbusTcpSource(self.id, TcpLink("127.0.0.1", self.port, self.poll),
                                (MeterConfig(self.unit, model.map, f"HIL {model.map.model}"),),
                                self.poll, self.clock, self.monotonic_ns)
        inner.counters = self.counters
        self.started.set()
        try:
            await inner.run(emit)
        finally:
            await self.simulator.stop()
