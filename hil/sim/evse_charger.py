"""``kind = "hil-evse"``: a simulated wallbox, driven over real Modbus TCP.

The charger is the product's ``modbus-evse`` driver talking to an in-process
:class:`~hil.sim.plant.Plant` (a wallbox serving any charger map, with a simulated car on
each connector) on a free loopback port: the same path as a real wallbox, with no hardware.
Config::

    [[chargers]]
    id = "wb0"
    kind = "hil-evse"
    # all optional:
    map = "phoenix-ev-eth"   # any modbus-evse map
    connectors = [1]
    plugged = true           # a car is plugged into every connector at start
    soc_pct = 40.0           # the cars' state of charge at start
    max_current_a = 32.0
    time_scale = 1.0         # plant seconds per wall second
    timeout_s, retries, silent_after, backoff_initial_s, backoff_max_s  (as modbus-evse)

``charger.plant`` is the running plant (``plant.unplug(1)`` pulls the cable,
``plant.wallbox_server.inject(unit, Fault.SILENT)`` silences the wallbox). The plant
starts on the first ``open()`` and stops when ``watch`` ends.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Self

from firmware_adapters.evse.base import (
    EventCallback,
    StatusCallback,
    charger_table,
    connector_list,
)
from firmware_adapters.evse.maps import load_map
from firmware_adapters.evse.modbus import ModbusEvseCharger
from hil.sim.plant import CarSpec, Plant, PlantConfig


class HilEvseCharger(ModbusEvseCharger):
    kind = "hil-evse"

    def __init__(self, charger_id: str, connectors: tuple[int, ...], plant: Plant, *,
                 timeout_s: float = 1.0, retries: int = 1, silent_after: int = 3,
                 backoff_initial_s: float = 0.2, backoff_max_s: float = 10.0) -> None:
        super().__init__(charger_id, connectors, load_map(plant.config.wallbox_map),
                         plant.config.host, 0, timeout_s=timeout_s, retries=retries,
                         silent_after=silent_after, backoff_initial_s=backoff_initial_s,
                         backoff_max_s=backoff_max_s)
        self.plant = plant
        self._started = False

    @classmethod
    def from_options(cls, charger_id: str, options: Mapping[str, object], where: str) -> Self:
        o = charger_table(options, where, charger_id)
        map_name = o.nonempty_str("map", "phoenix-ev-eth")
        charger_map = load_map(map_name)
        connectors = connector_list(o)
        if max(connectors) > charger_map.max_connectors:
            raise o.error("connectors", f"connector numbers 1..{charger_map.max_connectors} "
                          f"({charger_map.model})", list(connectors))
        plugged = o.bool("plugged", True)
        soc = o.float("soc_pct", 40.0, min=0.0, max=100.0)
        plant = Plant(PlantConfig(
            wallbox_map=map_name, connectors=max(connectors),
            max_current_a=o.float("max_current_a", 32.0, min=6.0, max=80.0),
            cars=tuple(CarSpec(connector=n, soc_pct=soc, plugged=plugged, seed=n)
                       for n in connectors),
            time_scale=o.float("time_scale", 1.0, min=0.01, max=1000.0), serve_meter=False))
        charger = cls(charger_id, connectors, plant,
                      timeout_s=o.float("timeout_s", 1.0, min=0.01, max=60.0),
                      retries=o.int("retries", 1, min=0, max=10),
                      silent_after=o.int("silent_after", 3, min=1, max=1000),
                      backoff_initial_s=o.float("backoff_initial_s", 0.2, min=0.01, max=60.0),
                      backoff_max_s=o.float("backoff_max_s", 10.0, min=0.01, max=3600.0))
        o.reject_unknown()
        return charger

    async def open(self) -> None:
        if not self._started:
            self.port = (await self.plant.start())["wallbox"]
            self._started = True
        await super().open()

    async def watch(self, on_status: StatusCallback, interval_s: float,
                    on_event: EventCallback | None = None) -> None:
        try:
            await super().watch(on_status, interval_s, on_event)
        finally:
            await self.stop_plant()

    async def stop_plant(self) -> None:
        if self._started:
            await self.plant.stop()
            self._started = False
