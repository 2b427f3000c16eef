"""One simulated charging site as config tables: the plant (hil/sim/plant.py) and the
``[[sources]]`` / ``[[chargers]]`` / ``[channel.energy]`` tables that point the two agents
at it, as a user would write them for a real site.

The station reads the plant's kWh meter with ``modbus-tcp`` and drives its wallbox with
``modbus-evse``; the car reads its own battery with ``dbc`` (hil/sim/plant.dbc) on the
plant's CAN bus (``virtual`` in one process, ``udp_multicast`` across processes). The car
counts its energy with its BMS's lifetime charged-energy counter (``method = "counter"``),
which is battery side: the on-board charger's losses (about 4 % at 11 kW: 120 W + 3 %) are
not in it. ``energy_scale`` (default 1.04, about 1 / the charger's efficiency) brings it to
the AC side the meter measures; the audit tolerance (``tolerance_ppm``, 2 % by default)
covers what remains (the fixed loss at low power, the BMS sensor's 0.2 % gain error).

Used by the rig (hil/session/rig.py), the channel-service tests and the OS-process tests.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hil.sim.plant import DBC_PATH, CarSpec, PlantConfig

METER_ID, CHARGER_ID, BMS_ID = "meter0", "wallbox", "bms0"
CHARGED_WH = "Vehicle.Powertrain.TractionBattery.AccumulatedChargedEnergy"
ENERGY_SCALE = 1.04          # battery-side count -> AC side (the OBC's ~4 % losses)

# The plant's CAN frames -> the car's readings (VSS). The 10 Hz pack signals are rate
# limited: one signed reading a second is plenty for telemetry.
SIGNALS: dict[str, object] = {
    "BMS_Energy.ChargedEnergy": {"name": CHARGED_WH, "change_only": True},
    "BMS_Energy.ConsumedEnergy": {
        "name": "Vehicle.Powertrain.TractionBattery.AccumulatedConsumedEnergy",
        "change_only": True},
    "BMS_HV.PackVoltage": {"name": "Vehicle.Powertrain.TractionBattery.CurrentVoltage",
                           "min_interval_s": 1.0},
    "BMS_HV.PackCurrent": {"name": "Vehicle.Powertrain.TractionBattery.CurrentCurrent",
                           "min_interval_s": 1.0},
    "BMS_HV.SoC": {"name": "Vehicle.Powertrain.TractionBattery.StateOfCharge.Current",
                   "min_interval_s": 1.0},
    "OBC_Status.PowerLoss": {"name": "Vehicle.Powertrain.TractionBattery.Charging.PowerLoss",
                             "change_only": True},
}

_buses = itertools.count()


def virtual_bus() -> dict[str, object]:
    """A python-can virtual bus of its own (one process)."""
    return {"interface": "virtual", "channel": f"plant-{os.getpid()}-{next(_buses)}"}


def multicast_bus(port: int) -> dict[str, object]:
    """A python-can udp_multicast bus (crosses processes); ``port`` keeps parallel runs
    apart."""
    return {"interface": "udp_multicast", "channel": "239.74.163.3", "port": port}


@dataclass(frozen=True, slots=True)
class Site:
    wallbox_map: str = "phoenix-ev-eth"
    meter_map: str = "sdm630"
    time_scale: float = 1.0
    soc_pct: float = 40.0
    obc_max_current_a: float = 16.0        # 11 kW on 3 x 230 V; 32 A: 22 kW
    bus: Mapping[str, object] = field(default_factory=virtual_bus)
    meter_interval_s: float = 0.1
    meter_timeout_s: float = 0.5
    seed: int = 1

    def plant(self, *, meter_port: int = 0, wallbox_port: int = 0) -> PlantConfig:
        return PlantConfig(
            wallbox_map=self.wallbox_map, meter_map=self.meter_map, connectors=1,
            cars=(CarSpec(connector=1, soc_pct=self.soc_pct, seed=self.seed,
                          obc_max_current_a=self.obc_max_current_a, bus=dict(self.bus)),),
            time_scale=self.time_scale, tick_s=0.05, meter_port=meter_port,
            wallbox_port=wallbox_port)

    def plant_toml(self) -> dict[str, Any]:
        """The same site as ``python -m hil.sim.plant --config`` reads it."""
        return {"time_scale": self.time_scale,
                "meter": {"map": self.meter_map},
                "wallbox": {"map": self.wallbox_map, "connectors": 1},
                "car": [{"connector": 1, "soc_pct": self.soc_pct, "seed": self.seed,
                         "obc_max_current_a": self.obc_max_current_a, "bus": dict(self.bus)}]}

    def meter_source(self, port: int, **extra: object) -> dict[str, Any]:
        return {"id": METER_ID, "kind": "modbus-tcp", "host": "127.0.0.1", "port": port,
                "unit": 1, "map": self.meter_map, "interval_s": self.meter_interval_s,
                "timeout_s": self.meter_timeout_s, **extra}

    def charger(self, port: int) -> dict[str, Any]:
        return {"id": CHARGER_ID, "kind": "modbus-evse", "map": self.wallbox_map,
                "host": "127.0.0.1", "port": port, "connectors": [1], "timeout_s": 0.5,
                "backoff_max_s": 1.0}

    def car_source(self) -> dict[str, Any]:
        bus = dict(self.bus)
        table: dict[str, Any] = {"id": BMS_ID, "kind": "dbc", "dbc": str(DBC_PATH),
                                 "interface": bus.pop("interface"),
                                 "channel": bus.pop("channel"), "signals": SIGNALS}
        if bus:   # udp_multicast's port ...: python-can Bus arguments
            table["bus_options"] = bus
        return table

    @staticmethod
    def energy() -> dict[str, Any]:
        """``[channel.energy]``: the car's own count, its BMS's charged-energy counter."""
        return {"source": BMS_ID, "method": "counter", "reading": CHARGED_WH,
                "scale": ENERGY_SCALE}
