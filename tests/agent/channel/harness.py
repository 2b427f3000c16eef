"""Test helpers: two channel parties with real keys, and an in-memory link between them."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from agent.channel.messages import Tariff, sign_tariff
from agent.channel.protocol import (
    Action,
    Persist,
    Send,
)
from agent.channel.records import Party, Record
from agent.channel.station import StationChannel
from agent.channel.vehicle import VehicleChannel
from agent.keys import IdentityKey, SettlementKey

CHAIN_ID = 31337
CONTRACT = bytes.fromhex("5fbdb2315678afecb367f032d93f642f64180aa3")


@dataclass
class Setup:
    """Keys and configs for one channel; builds fresh or restored parties."""

    tariff: Tariff = field(default_factory=lambda: Tariff(300, 120))
    deposit_ev: int = 10_000_000
    deposit_cs: int = 2_000_000
    credit_window_wh: int = 100
    pay_step_wh: int = 10
    tolerance_wh: int = 50
    require_funding_check: bool = False  # the station's ledger check: its own tests turn it on
    salt: bytes = field(default_factory=lambda: os.urandom(32))
    ev_id: IdentityKey = field(default_factory=IdentityKey.generate)
    cs_id: IdentityKey = field(default_factory=IdentityKey.generate)
    ev_key: SettlementKey = field(default_factory=SettlementKey.generate)
    cs_key: SettlementKey = field(default_factory=SettlementKey.generate)

    @property
    def ev_party(self) -> Party:
        return Party(self.ev_id.public, self.ev_key.address)

    @property
    def cs_party(self) -> Party:
        return Party(self.cs_id.public, self.cs_key.address)

    def station_kwargs(self) -> dict[str, object]:
        return dict(identity=self.cs_id, settlement=self.cs_key, vehicle=self.ev_party,
                    chain_id=CHAIN_ID, contract=CONTRACT, salt=self.salt, tariff=self.tariff,
                    tariff_sig=sign_tariff(self.tariff, self.cs_id),
                    deposit_ev=self.deposit_ev, deposit_cs=self.deposit_cs,
                    dispute_window_s=3600, credit_window_wh=self.credit_window_wh,
                    pay_step_wh=self.pay_step_wh,
                    require_funding_check=self.require_funding_check)

    def vehicle_kwargs(self) -> dict[str, object]:
        return dict(identity=self.ev_id, settlement=self.ev_key, station=self.cs_party,
                    chain_id=CHAIN_ID, contract=CONTRACT, salt=self.salt,
                    max_price_per_kwh=1000, max_deposit_ev=self.deposit_ev,
                    tolerance_wh=self.tolerance_wh)

    def station(self, records: list[Record] | None = None) -> StationChannel:
        if records is None:
            return StationChannel(**self.station_kwargs())  # type: ignore[arg-type]
        return StationChannel.restore(records, **self.station_kwargs())

    def vehicle(self, records: list[Record] | None = None) -> VehicleChannel:
        if records is None:
            return VehicleChannel(**self.vehicle_kwargs())  # type: ignore[arg-type]
        return VehicleChannel.restore(records, **self.vehicle_kwargs())


def split(actions: list[Action]) -> tuple[list[Record], list[bytes], list[Action]]:
    """(records to persist, messages to send, events) of one action list."""
    records = [a.record for a in actions if isinstance(a, Persist)]
    sends = [a.data for a in actions if isinstance(a, Send)]
    events = [a for a in actions if not isinstance(a, Persist | Send)]
    return records, sends, events


class Link:
    """Perfect in-order delivery between a station and a vehicle, with stores as lists."""

    def __init__(self, setup: Setup) -> None:
        self.setup = setup
        self.cs, self.ev = setup.station(), setup.vehicle()
        self.cs_store: list[Record] = []
        self.ev_store: list[Record] = []
        self.events: list[tuple[str, Action]] = []
        self.sent: list[tuple[str, bytes]] = []
        self.now = 0.0
        self.wall: float | None = None  # both parties' wall clock (None: none; charge sets it)

    def run(self, side: str, actions: list[Action]) -> None:
        """Execute actions of ``side`` in order, delivering sends to the other side."""
        queue = [(side, actions)]
        while queue:
            who, acts = queue.pop(0)
            for action in acts:
                if isinstance(action, Persist):
                    (self.cs_store if who == "cs" else self.ev_store).append(action.record)
                elif isinstance(action, Send):
                    self.sent.append((who, action.data))
                    peer = self.ev if who == "cs" else self.cs
                    other = "ev" if who == "cs" else "cs"
                    queue.append((other, peer.receive(action.data, self.now, self.wall)))
                else:
                    self.events.append((who, action))

    def deliver(self, side: str, data: bytes) -> list[Action]:
        """Hand ``data`` to ``side`` and run what it answers; return its actions."""
        party = self.cs if side == "cs" else self.ev
        actions = party.receive(data, self.now, self.wall)
        self.run(side, actions)
        return actions

    def charge(self, steps: int, wh: int = 10, ts_s: int = 1_700_000_000) -> None:
        """Meter ``steps`` increments of ``wh`` at the station (raw register values)."""
        self.wall = ts_s  # the vehicle's clock agrees with the station's
        for _ in range(steps):
            raw = self.cs.base[0] + self.cs.import_wh + wh if self.cs.base else 1_000_000
            exp = self.cs.base[1] + self.cs.export_wh if self.cs.base else 500_000
            self.run("cs", self.cs.meter(raw, exp, ts_s, self.now))

    def of_type(self, side: str, msg_type: int) -> list[bytes]:
        return [d for who, d in self.sent if who == side and d[1] == msg_type]

    def open_and_fund(self) -> None:
        self.run("cs", self.cs.meter(1_000_000, 500_000, 1_700_000_000, self.now))
        self.run("cs", self.cs.open(self.now))
        self.run("ev", self.ev.funded(b"", self.now))
