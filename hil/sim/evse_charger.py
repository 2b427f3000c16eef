"""``kind = "hil-evse"``: a simulated wallbox as a charger kind.

Config::

    [[chargers]]
    id = "wb0"
    kind = "hil-evse"
    connectors = [1]
    # optional:
    plugged = true           # a car is plugged into every connector at start
    max_current_a = 32.0

``charger.wallbox`` is the running :class:`~hil.sim.evse.WallboxModel` (tests plug and
unplug cars with it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Self

from agent.errors import AdapterUnavailable
from firmware_adapters.evse.base import Charger, ChargerStatus, charger_table, connector_list
from hil.sim.evse import WallboxModel


class HilEvseCharger(Charger):
    kind = "hil-evse"

    def __init__(self, charger_id: str, connectors: tuple[int, ...],
                 wallbox: WallboxModel | None = None) -> None:
        super().__init__(charger_id, connectors)
        self.wallbox = wallbox or WallboxModel(max(connectors))
        self._open = False

    @classmethod
    def from_options(cls, charger_id: str, options: Mapping[str, object], where: str) -> Self:
        o = charger_table(options, where, charger_id)
        connectors = connector_list(o)
        wallbox = WallboxModel(max(connectors),
                               o.float("max_current_a", 32.0, min=6.0, max=80.0))
        if o.bool("plugged", False):
            for n in connectors:
                wallbox.plug(n)
        o.reject_unknown()
        return cls(charger_id, connectors, wallbox)

    async def open(self) -> None:
        self._open = True

    def close(self) -> None:
        self._open = False

    def _connector(self, connector: int) -> None:
        self._check_connector(connector)
        if not self._open:
            raise AdapterUnavailable(f"{self.id}: not open", reason="line-down")

    async def read_status(self, connector: int) -> ChargerStatus:
        self._connector(connector)
        c = self.wallbox[connector]
        return ChargerStatus(connector, c.state, c.enabled, c.limit_a, fault=c.fault)

    async def set_enabled(self, connector: int, enabled: bool) -> None:
        self._connector(connector)
        self.wallbox[connector].enabled = enabled

    async def set_current_limit(self, connector: int, amps: float) -> None:
        self._connector(connector)
        if not 0 <= amps <= self.wallbox[connector].max_current_a:
            raise ValueError(f"{self.id}: current limit {amps} A out of range")
        self.wallbox[connector].limit_a = amps

