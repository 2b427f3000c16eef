"""The ``[channel]`` table (and the session keys of ``[settlement]``), validated.

Station (``[device] role = "station"``)::

    [channel]
    policy = "registry"              # registry: only vehicles in the fleet registry; open: any
    registry = "/etc/edge-agent/fleet.toml"
    price_per_kwh = 300000           # token's smallest unit per kWh (integer)
    export_price_per_kwh = 0         # paid to the vehicle per kWh fed back (V2G)
    tou = [[0, 250000], [420, 300000]]   # optional time of use: [start minute UTC, price]
    deposit_ev = 20000000            # what a vehicle deposits to open a channel
    deposit_cs = 0                   # what the station deposits (V2G pay-outs come from it)
    dispute_window_s = 3600
    credit_window_wh = 100           # unpaid energy the charger may deliver
    pay_step_wh = 10                 # a METER (and a payment) every this many Wh
    stall_timeout_s = 60             # credit window exhausted this long: the session ends
    funding_timeout_s = 120          # OPEN not funded within this: the session ends
    offer_interval_s = 60            # offers are republished (retained) this often
    [[channel.connectors]]
    id = 1                           # connector number, as offered
    charger = "wallbox"              # a [[chargers]] id that drives it ...
    charger_connector = 1            # ... as its connector number this (default: id)
    meter = "meter0"                 # the [[sources]] id of this connector's kWh meter
    max_current_a = 16.0             # current limit set at the start of a session

Vehicle (``role = "vehicle"``)::

    [channel]
    max_price_per_kwh = 400000       # never pay more (an offer above it is refused)
    max_deposit_ev = 50000000        # never deposit more
    operator_keys = ["<ed25519 hex>"]  # fleet operator keys whose commands are obeyed
    registry = "..."                 # optional: station keys must be in it
    control_socket = "<state_dir>/control.sock"
    home_station = "cs-1"            # optional: start automatically there when plugged in
    home_connector = 1
    plugged_source = "car"           # the source and reading that say "plugged in" (!= 0)
    plugged_reading = "Vehicle.Powertrain.TractionBattery.Charging.IsChargingCableConnected"
    audit_grace_s = 10               # the station's METER above our own count this long: stop
    tolerance_wh = 50                # audit tolerance, plus tolerance_ppm of the energy
    tolerance_ppm = 20000
    [channel.energy]                 # the vehicle's OWN energy count (never the station's)
    source = "car"                   # a [[sources]] id of this vehicle
    method = "counter"               # counter | power | vi | soc
    reading = "..."                  # counter: cumulative Wh / kWh; power: W; soc: %
    voltage = "..."                  # vi: V reading;  current = "..." A reading
    capacity_wh = 64000              # soc only
    scale = 1.0                      # multiply (sign of a current, a charger efficiency)

Both: ``close_timeout_s`` (30: the peer must complete a close within it, else a unilateral
close), ``request_ttl_s`` (120: requests and commands older than this are refused as stale),
``answer_timeout_s`` (10, vehicle). In ``[settlement]``: ``submit`` (who sends the
cooperative close: station | vehicle; default station) and ``coop_grace_s`` (60: how long
the other side waits for it before it submits the final state itself).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from agent.channel.messages import Tariff
from agent.options import Table

_HEX_KEY = re.compile(r"^[0-9a-fA-F]{64}$")
ENERGY_METHODS = ("counter", "power", "vi", "soc")
MAX_PRICE = 1 << 63


@dataclass(frozen=True, slots=True)
class ConnectorConfig:
    id: int
    charger: str
    meter: str
    max_current_a: float
    charger_connector: int = 0   # its number on the charger (0: the same as ``id``)

    @property
    def on_charger(self) -> int:
        """The connector number the charger adapter is driven with."""
        return self.charger_connector or self.id


@dataclass(frozen=True, slots=True)
class EnergyConfig:
    source: str
    method: str
    reading: str = ""
    voltage: str = ""
    current: str = ""
    capacity_wh: int = 0
    scale: float = 1.0


@dataclass(frozen=True, slots=True)
class StationConfig:
    policy: str
    registry: Path | None
    tariff: Tariff
    deposit_ev: int
    deposit_cs: int
    dispute_window_s: int
    credit_window_wh: int
    pay_step_wh: int
    stall_timeout_s: float
    funding_timeout_s: float
    offer_interval_s: float
    connectors: tuple[ConnectorConfig, ...]


@dataclass(frozen=True, slots=True)
class VehicleConfig:
    max_price_per_kwh: int
    max_deposit_ev: int
    operator_keys: tuple[bytes, ...]
    registry: Path | None
    control_socket: Path
    home_station: str | None
    home_connector: int
    plugged_source: str | None
    plugged_reading: str | None
    energy: EnergyConfig | None
    audit_grace_s: float
    tolerance_wh: int
    tolerance_ppm: int
    answer_timeout_s: float
    # the channel core's vehicle policy (agent/channel/vehicle.py; issue 14's defaults)
    min_dispute_window_s: int = 3600
    clock_tolerance_s: int = 120
    export_credit_window_wh: int = 500


@dataclass(frozen=True, slots=True)
class ChannelSettings:
    role: str
    close_timeout_s: float
    request_ttl_s: float
    submit: str
    coop_grace_s: float
    station: StationConfig | None = None
    vehicle: VehicleConfig | None = None

    @classmethod
    def from_tables(cls, channel: Table, settlement: Table, role: str, state_dir: Path,
                    source_ids: frozenset[str], charger_ids: frozenset[str]) -> ChannelSettings:
        """Validate ``[channel]`` for ``role``; ``settlement`` gets its session keys marked
        used (SettlementConfig validates the rest of that table)."""
        submit = settlement.str("submit", "station", choices=("station", "vehicle"))
        coop_grace_s = settlement.float("coop_grace_s", 60.0, min=0.0, max=86_400.0)
        settlement.mark_used("submit", "coop_grace_s")
        close_timeout_s = channel.float("close_timeout_s", 30.0, min=0.1, max=86_400.0)
        request_ttl_s = channel.float("request_ttl_s", 120.0, min=1.0, max=86_400.0)
        station = vehicle = None
        if role == "station":
            station = _station(channel, source_ids, charger_ids)
        else:
            vehicle = _vehicle(channel, state_dir, source_ids)
        _reject_other_role(channel, role)
        channel.reject_unknown()
        return cls(role, close_timeout_s, request_ttl_s, submit, coop_grace_s, station, vehicle)


COMMON_CHANNEL_KEYS = frozenset({"close_timeout_s", "request_ttl_s"})
STATION_KEYS = frozenset({"policy", "price_per_kwh", "export_price_per_kwh", "tou",
                          "deposit_ev", "deposit_cs", "dispute_window_s", "credit_window_wh",
                          "pay_step_wh", "stall_timeout_s", "funding_timeout_s",
                          "offer_interval_s", "connectors"})
VEHICLE_KEYS = frozenset({"max_price_per_kwh", "max_deposit_ev", "operator_keys",
                          "control_socket", "home_station", "home_connector", "plugged_source",
                          "plugged_reading", "energy", "audit_grace_s", "tolerance_wh",
                          "tolerance_ppm", "answer_timeout_s", "min_dispute_window_s",
                          "clock_tolerance_s", "export_credit_window_wh"})


def _reject_other_role(channel: Table, role: str) -> None:
    other = VEHICLE_KEYS if role == "station" else STATION_KEYS
    for key in sorted(set(channel.data) & other):
        raise channel.error(key, f"a key of the {role} role (this one is for the "
                            f"{'vehicle' if role == 'station' else 'station'})", key)


def _price(table: Table, name: str, default: object) -> int:
    return table.int(name, default, min=0, max=MAX_PRICE - 1)


def _tariff(channel: Table) -> Tariff:
    price = channel.int("price_per_kwh", min=0, max=MAX_PRICE - 1)  # required
    export = _price(channel, "export_price_per_kwh", 0)
    tou: list[tuple[int, int]] = []
    for index, item in enumerate(channel.list("tou", [])):
        if not (isinstance(item, list) and len(item) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) for v in item)
                and 0 <= item[0] < 1440 and 0 <= item[1] < MAX_PRICE):
            raise channel.error(f"tou[{index}]", "a [start minute 0..1439, price] pair of "
                                "integers", item)
        tou.append((item[0], item[1]))
    if [m for m, _ in tou] != sorted({m for m, _ in tou}):
        raise channel.error("tou", "start minutes unique and increasing", [m for m, _ in tou])
    return Tariff(price, export, tuple(tou))


def _station(channel: Table, source_ids: frozenset[str],
             charger_ids: frozenset[str]) -> StationConfig:
    tariff = _tariff(channel)
    policy = channel.str("policy", "registry", choices=("registry", "open"))
    registry = channel.opt_str("registry")
    if policy == "registry" and not registry:
        raise channel.error("registry", "a fleet registry file (policy = \"registry\"); or "
                            "policy = \"open\"", None)
    connectors = []
    seen: set[int] = set()
    driven: set[tuple[str, int]] = set()
    for table in channel.tables("connectors"):
        connector = ConnectorConfig(
            id=table.int("id", min=1, max=255), charger=table.str("charger"),
            meter=table.str("meter"),
            max_current_a=table.float("max_current_a", 16.0, min=6.0, max=1000.0),
            charger_connector=table.opt_int("charger_connector", min=1, max=255) or 0)
        table.reject_unknown()
        if connector.id in seen:
            raise table.error("id", "a connector id not used above", connector.id)
        if (connector.charger, connector.on_charger) in driven:
            raise table.error("charger_connector", "a connector of its charger that no other "
                              "[[channel.connectors]] drives", connector.on_charger)
        driven.add((connector.charger, connector.on_charger))
        if connector.charger not in charger_ids:
            raise table.error("charger", "the id of a [[chargers]] table",
                              connector.charger)
        if connector.meter not in source_ids:
            raise table.error("meter", "the id of a [[sources]] table (the connector's "
                              "kWh meter)", connector.meter)
        seen.add(connector.id)
        connectors.append(connector)
    if not connectors:
        raise channel.error("connectors", "at least one [[channel.connectors]] table",
                            "none")
    deposit_ev = channel.int("deposit_ev", 20_000_000, min=1, max=MAX_PRICE - 1)
    credit = channel.int("credit_window_wh", 100, min=1, max=1_000_000)
    step = channel.int("pay_step_wh", 10, min=1, max=1_000_000)
    if step > credit:
        raise channel.error("pay_step_wh", f"at most credit_window_wh ({credit})", step)
    return StationConfig(
        policy=policy, registry=Path(registry) if registry else None, tariff=tariff,
        deposit_ev=deposit_ev,
        deposit_cs=channel.int("deposit_cs", 0, min=0, max=MAX_PRICE - 1),
        dispute_window_s=channel.int("dispute_window_s", 3600, min=1, max=30 * 86_400),
        credit_window_wh=credit, pay_step_wh=step,
        stall_timeout_s=channel.float("stall_timeout_s", 60.0, min=0.1, max=86_400.0),
        funding_timeout_s=channel.float("funding_timeout_s", 120.0, min=0.1, max=86_400.0),
        offer_interval_s=channel.float("offer_interval_s", 60.0, min=0.1, max=86_400.0),
        connectors=tuple(connectors))


def _energy(table: Table, source_ids: frozenset[str]) -> EnergyConfig:
    source = table.str("source")
    if source not in source_ids:
        raise table.error("source", "the id of one of this vehicle's [[sources]]", source)
    method = table.str("method", choices=ENERGY_METHODS)
    needs = {"counter": ("reading",), "power": ("reading",), "vi": ("voltage", "current"),
             "soc": ("reading", "capacity_wh")}[method]
    values: dict[str, str] = {}
    for name in ("reading", "voltage", "current"):
        if name in needs:
            values[name] = table.nonempty_str(name)
        elif name in table.data:
            raise table.error(name, f"no {name} for method = {method!r}", table.data[name])
    capacity = table.int("capacity_wh", 0 if "capacity_wh" not in needs else None,
                         min=0 if "capacity_wh" not in needs else 1, max=10_000_000)
    config = EnergyConfig(source=source, method=method, capacity_wh=capacity,
                          scale=table.float("scale", 1.0, min=-10.0, max=10.0), **values)
    if config.scale == 0:
        raise table.error("scale", "a non-zero factor", 0)
    table.reject_unknown()
    return config


def _vehicle(channel: Table, state_dir: Path, source_ids: frozenset[str]) -> VehicleConfig:
    keys = []
    for index, item in enumerate(channel.list("operator_keys", [])):
        if not isinstance(item, str) or not _HEX_KEY.match(item):
            raise channel.error(f"operator_keys[{index}]", "an Ed25519 public key, 64 hex "
                                "digits", item)
        keys.append(bytes.fromhex(item))
    registry = channel.opt_str("registry")
    energy = _energy(channel.table("energy"), source_ids) if "energy" in channel.data else None
    home = channel.opt_str("home_station")
    plugged_source = channel.opt_str("plugged_source")
    plugged_reading = channel.opt_str("plugged_reading")
    if (plugged_source is None) != (plugged_reading is None):
        raise channel.error("plugged_reading", "plugged_source and plugged_reading together",
                            plugged_reading)
    if plugged_source is not None and plugged_source not in source_ids:
        raise channel.error("plugged_source", "the id of one of this vehicle's [[sources]]",
                            plugged_source)
    if home is not None and plugged_source is None:
        raise channel.error("plugged_source", "the reading that says the car is plugged in "
                            "(home_station starts a session on it)", None)
    socket = channel.opt_str("control_socket")
    return VehicleConfig(
        max_price_per_kwh=_price(channel, "max_price_per_kwh", MAX_PRICE - 1),
        max_deposit_ev=channel.int("max_deposit_ev", 50_000_000, min=1, max=MAX_PRICE - 1),
        operator_keys=tuple(keys), registry=Path(registry) if registry else None,
        control_socket=Path(socket) if socket else state_dir / "control.sock",
        home_station=home, home_connector=channel.int("home_connector", 1, min=1, max=255),
        plugged_source=plugged_source, plugged_reading=plugged_reading, energy=energy,
        audit_grace_s=channel.float("audit_grace_s", 10.0, min=0.0, max=86_400.0),
        tolerance_wh=channel.int("tolerance_wh", 50, min=0, max=1_000_000),
        tolerance_ppm=channel.int("tolerance_ppm", 20_000, min=0, max=1_000_000),
        answer_timeout_s=channel.float("answer_timeout_s", 10.0, min=0.1, max=3600.0),
        min_dispute_window_s=channel.int("min_dispute_window_s", 3600, min=1,
                                         max=30 * 86_400),
        clock_tolerance_s=channel.int("clock_tolerance_s", 120, min=0, max=86_400),
        export_credit_window_wh=channel.int("export_credit_window_wh", 500, min=0,
                                            max=1_000_000))

