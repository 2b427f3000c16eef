"""``hil-ecu``: an ``obd-can`` source wired to an in-process ECU simulator on a python-can
virtual bus. Needs no hardware and no files: the demo's vehicle source. Config::

    [[sources]]
    id = "car"
    kind = "hil-ecu"
    # all optional:
    pids = { SPEED = 1.0, ODOMETER = 5.0, HYBRID_BATTERY_REMAINING = 5.0 }
    addressing = 11
    ecus = 2
    vin = "WP0ZZZ99ZTS390000"
    time_scale = 1.0      # profile seconds per wall second (10 = a 150 s loop in 15 s)
    profile = "vw-meb"    # the simulated car also answers this UDS profile's DIDs

It emits at least ``Vehicle.Speed``, ``Vehicle.TraveledDistance`` and
``Vehicle.Powertrain.TractionBattery.StateOfCharge.Current``. ``source.simulator`` is the
running :class:`~hil.sim.ecu.EcuSimulator` (set ``.ignition = False`` to park the car).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Self

import can

from agent.options import Table
from firmware_adapters.base import Clock, Emit, system_clock
from firmware_adapters.obd.can_driver import ObdCanSource, poll_settings_for_can
from firmware_adapters.obd.options import POLL_KEYS
from firmware_adapters.obd.requester import CAN_11, Addressing
from hil.sim.ecu import EcuSimCore, EcuSimulator

HIL_PIDS = {"SPEED": 1.0, "RPM": 1.0, "ODOMETER": 2.0, "HYBRID_BATTERY_REMAINING": 2.0,
            "AMBIANT_AIR_TEMP": 30.0, "CONTROL_MODULE_VOLTAGE": 30.0}


class HilEcuSource(ObdCanSource):
    kind = "hil-ecu"

    def __init__(self, source_id: str, poll: Mapping[str, object], *,
                 addressing: Addressing = CAN_11, core: EcuSimCore | None = None,
                 time_scale: float = 1.0, window_ns: int = 50_000_000, slack_km: float = 0.5,
                 clock: Clock = system_clock) -> None:
        channel = f"hil-ecu-{source_id}-{uuid.uuid4().hex[:8]}"
        super().__init__(source_id, {"interface": "virtual", "channel": channel}, poll,
                         addressing=addressing, window_ns=window_ns, slack_km=slack_km,
                         clock=clock)
        self.core = core or EcuSimCore(addressing=addressing.bits)
        self.time_scale = time_scale
        self.simulator: EcuSimulator | None = None
        self._sim_bus: can.BusABC | None = None

    @classmethod
    def from_options(cls, source_id: str, options: Mapping[str, object], where: str) -> Self:
        o = Table.source(options, where, source_id)
        o.reject_unknown(POLL_KEYS | {"addressing", "ecus", "vin", "time_scale", "max_pids"})
        table = dict(options)
        table.setdefault("pids", HIL_PIDS)
        table.setdefault("dtc_period_s", 60.0)
        # the car's own time runs time_scale faster: so does the silence that means "asleep"
        scale = Table(table, where, o.prefix).float("time_scale", 1.0, min=0.01, max=1000.0)
        table.setdefault("sleep_hold_s", 5.0 / scale)
        o = Table(table, where, o.prefix)
        bits = o.choice("addressing", 11, (11, 29))
        poll = poll_settings_for_can(o)
        core = EcuSimCore(addressing=bits, ecus=o.int("ecus", 1, min=1, max=2),  # type: ignore[arg-type]
                          vin=o.nonempty_str("vin", "WP0ZZZ99ZTS390000"),
                          uds=poll["profile"])  # type: ignore[arg-type]
        return cls(source_id, poll, addressing=Addressing(bits),  # type: ignore[arg-type]
                   core=core, time_scale=o.float("time_scale", 1.0, min=0.01, max=1000.0),
                   window_ns=o.int("response_timeout_ms", 50, min=10, max=10_000) * 1_000_000,
                   slack_km=o.float("slack_km", 0.5, min=0.0, max=100.0))

    async def _open(self) -> None:
        if self.simulator is None:
            self._sim_bus = can.Bus(**self.bus_config)
            scale, t0 = self.time_scale, time.monotonic()
            self.simulator = EcuSimulator(self._sim_bus, self.core,
                                          clock=lambda: (time.monotonic() - t0) * scale).start()
        await super()._open()

    def stop_simulator(self) -> None:
        """Stop the simulator thread; ``run`` calls it when it ends (cancelled or not)."""
        if self.simulator is not None:
            self.simulator.stop()
            self.simulator = None
        if self._sim_bus is not None:
            self._sim_bus.shutdown()
            self._sim_bus = None

    def attach_state(self, directory: Path) -> None:
        """As a real source does; and the simulated car, restarted with the agent, goes on
        from the odometer the agent saw last (a real car does not reset its odometer when
        the agent restarts). ``core.odometer_offset_km`` still injects a tampered cluster."""
        super().attach_state(directory)
        saved = self.odometer_keeper.saved if self.odometer_keeper else None
        if saved is not None and self.simulator is None:
            self.core.profile = replace(self.core.profile, odometer_start_km=saved)

    async def run(self, emit: Emit) -> None:
        try:
            await super().run(emit)
        finally:
            self.stop_simulator()
