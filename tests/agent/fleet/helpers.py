"""Devices that seal real envelopes, and a registry that knows them (fleet tests)."""

from __future__ import annotations

from agent.envelope import SealedEnvelope, Sealer
from agent.fleet import registry as fleet_registry
from agent.fleet.db import Database
from agent.fleet.registry import RegistrySnapshot
from agent.fleet.store import Verified
from agent.keys import IdentityKey, SettlementKey, provisioning_record
from agent.readings import Reading


class Device:
    def __init__(self, name: str, seed: int = 1) -> None:
        self.name = name
        self.key = IdentityKey(bytes([seed]) * 32)
        self.settlement = SettlementKey(bytes([seed]) * 31 + b"\x01")
        self.sealer = Sealer(self.key, name, bytes(16))
        self.record = provisioning_record(name, self.key, self.settlement, 1)

    def envelopes(self, n: int, name: str = "Vehicle.Speed", start_value: int = 0,
                  ts0: int = 1_000) -> list[SealedEnvelope]:
        return [self.sealer.seal_readings([Reading(name, start_value + i, "km/h", ts0 + i)])
                for i in range(n)]


def register(db: Database, *devices: Device) -> RegistrySnapshot:
    for device in devices:
        fleet_registry.add_record(db, device.record)
    return fleet_registry.load(db)


def verified(snapshot: RegistrySnapshot, envelopes: list[SealedEnvelope]) -> list[Verified]:
    return [Verified(snapshot.open(e.data), e.data, 1) for e in envelopes]
