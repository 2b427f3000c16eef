"""A simulated wallbox: the EVSE side of IEC 61851-1 (sans-I/O).

:class:`WallboxModel` holds, per connector, what a real EVSE knows: is a cable plugged in,
does the car ask for energy (the vehicle's S2 switch), is delivery enabled, what current is
offered on the pilot, is there a fault. The control pilot state follows from that as
IEC 61851-1:2017 Annex A says it does: A with no vehicle, B with a vehicle that may not or
does not want to charge, C (D with ventilation) while it charges, E for a shorted/missing
pilot, F for an EVSE fault. An offered current below 6 A means "no charging" (IEC 61851-1
Table A.8: PWM below 8 % duty is not a charging current), so such a car stays in B.

The plant (hil/sim/plant.py) runs the physics around it and serves it over Modbus.
"""

from __future__ import annotations

from dataclasses import dataclass

from firmware_adapters.evse.base import CpState

# IEC 61851-1 Table A.8: 6 A is the lowest current a PWM duty cycle may offer.
MIN_CHARGING_CURRENT_A = 6.0


@dataclass(slots=True)
class ConnectorModel:
    max_current_a: float = 32.0
    plugged: bool = False
    car_requests: bool = True      # the car's S2 is closed: it wants energy
    ventilation: bool = False      # the car asks for state D
    enabled: bool = False
    limit_a: float = 16.0
    fault: str | None = None       # an EVSE fault (state F)
    pilot_error: bool = False      # pilot shorted / diode missing (state E)

    @property
    def state(self) -> CpState:
        if self.fault is not None:
            return CpState.F
        if self.pilot_error:
            return CpState.E
        if not self.plugged:
            return CpState.A
        if self.delivering:
            return CpState.D if self.ventilation else CpState.C
        return CpState.B

    @property
    def offered_a(self) -> float:
        """The current the pilot offers the car right now (0 when not enabled)."""
        if not self.enabled or self.fault is not None:
            return 0.0
        return min(self.limit_a, self.max_current_a)

    @property
    def delivering(self) -> bool:
        return (self.plugged and self.car_requests and self.fault is None
                and not self.pilot_error and self.offered_a >= MIN_CHARGING_CURRENT_A)


class WallboxModel:
    """Connectors numbered from 1."""

    def __init__(self, connectors: int = 1, max_current_a: float = 32.0) -> None:
        if not 1 <= connectors <= 8:
            raise ValueError("a wallbox has 1..8 connectors")
        self.connectors = {n: ConnectorModel(max_current_a=max_current_a)
                           for n in range(1, connectors + 1)}

    def __getitem__(self, connector: int) -> ConnectorModel:
        return self.connectors[connector]

    def plug(self, connector: int = 1, plugged: bool = True) -> None:
        self.connectors[connector].plugged = plugged

    def unplug(self, connector: int = 1) -> None:
        self.plug(connector, False)
