"""One plant model: the physics of a charging session, run once, seen through three paths.

The plant owns the wallbox (:class:`~hil.sim.evse.WallboxModel`), one car per connector
(:class:`CarModel`) and one kWh meter per connector, and serves them as a real site does:

- the station's kWh meter over Modbus TCP (hil/sim/meter.py's MeterSimulator, through its
  public API: the plant sets its power, the meter integrates it exactly);
- the wallbox over Modbus TCP (:class:`~hil.sim.evse.WallboxServer`, any charger map);
- each car over CAN (a python-can bus; ``udp_multicast`` crosses processes): broadcast
  frames of ``plant.dbc`` (pack voltage and current, SoC, lifetime energy counters, OBC
  losses) that the product's ``dbc`` source decodes. This is the car's OWN view: its BMS
  measures the battery side with its own current sensor (a gain error and noise), never
  the station's meter, so station and car disagree by the charger's losses and the
  sensors' errors, as on a real rig.

Physics (all between two updates, at constant power; updates happen at every wallbox
write, every plug/unplug/V2G change and every tick):

- AC power = phases x voltage x min(offered current, the car's on-board charger limit)
  while the pilot is in C/D (IEC 61851-1: the car draws at most what the PWM offers);
  with V2G export set, the car feeds back (negative power) within the same limit;
- charger losses = fixed + proportional part (a typical 11 kW OBC: ~120 W + 3 %); the
  battery gets AC minus losses when charging, gives export plus losses when feeding back;
- battery: energy (exact, Fractions of Wh) -> SoC; pack voltage = open-circuit voltage
  (linear in SoC) + R x I; the car stops asking for energy at its target SoC (state B);
- sensor noise is seeded (``random.Random(seed)``), so a run can be repeated.

Use it in-process (the demo, tests)::

    plant = Plant(PlantConfig(...))
    ports = await plant.start()        # {"meter": port, "wallbox": port}
    plant.plug(1); plant.set_export(1, 3000); plant.energy(1)
    await plant.stop()

or as its own process (two ``edge-agent run`` processes against one plant, as on a rig)::

    python -m hil.sim.plant --config plant.toml

which prints one JSON line ``{"ready": true, "meter": PORT, "wallbox": PORT}`` and then
takes one command per stdin line (``plug N``, ``unplug N``, ``export N W``, ``demand N W``,
``demand N none``, ``fault N TEXT``, ``fault N none``, ``silent on|off``, ``state``),
answering each with a JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import random
import signal
import sys
import time
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from importlib import resources
from pathlib import Path
from typing import Any

from agent.errors import ConfigError
from agent.options import Table
from hil.sim.evse import Fault, WallboxModel, WallboxServer
from hil.sim.meter import ChargingProfile, MeterSimulator

DBC_PATH = Path(str(resources.files("hil.sim").joinpath("plant.dbc")))
BMS_HV, BMS_ENERGY, OBC_STATUS = 0x3F0, 0x3F1, 0x3F2


class ScaledClock:
    """Monotonic seconds running ``scale`` times faster than real time."""

    def __init__(self, scale: float = 1.0) -> None:
        if scale <= 0:
            raise ValueError("time scale must be > 0")
        self.scale = scale
        self.origin = time.monotonic()

    def __call__(self) -> float:
        return self.origin + (time.monotonic() - self.origin) * self.scale


@dataclass(frozen=True, slots=True)
class CarSpec:
    connector: int = 1
    battery_wh: int = 60_000
    soc_pct: float = 40.0
    target_soc_pct: float = 100.0
    obc_max_current_a: float = 16.0       # per phase: 11 kW on 3 x 230 V
    phases: int = 3
    voltage_v: float = 230.0              # the grid's phase voltage
    loss_fixed_w: float = 120.0
    loss_fraction: float = 0.03
    ocv_empty_v: float = 330.0
    ocv_full_v: float = 400.0
    resistance_ohm: float = 0.08
    current_gain: float = 1.002           # the BMS current sensor reads 0.2 % high
    voltage_noise_v: float = 0.3
    current_noise_a: float = 0.05
    plugged: bool = True
    bus: Mapping[str, object] | None = None   # python-can Bus(**bus); None: no CAN
    seed: int = 1

    def __post_init__(self) -> None:
        if self.battery_wh <= 0 or not 0 <= self.soc_pct <= 100 or self.phases not in (1, 3):
            raise ValueError("battery_wh > 0, soc_pct in 0..100, phases 1 or 3")


@dataclass(frozen=True, slots=True)
class PlantConfig:
    wallbox_map: str = "phoenix-ev-eth"
    meter_map: str = "sdm630"
    connectors: int = 1
    max_current_a: float = 32.0
    cars: tuple[CarSpec, ...] = (CarSpec(),)
    meter_import_wh: int = 1_000_000
    time_scale: float = 1.0
    tick_s: float = 0.1                   # wall seconds between physics ticks / CAN frames
    host: str = "127.0.0.1"
    meter_port: int = 0
    wallbox_port: int = 0
    serve_meter: bool = True


@dataclass(slots=True)
class CarModel:
    """One car's battery and charger: the physics, no I/O."""

    spec: CarSpec
    energy_wh: Fraction = Fraction(0)      # in the battery now
    charged_wh: Fraction = Fraction(0)     # the BMS's lifetime counters (its own sensor)
    consumed_wh: Fraction = Fraction(0)
    ac_power_w: int = 0
    export_w: int = 0                      # V2G request: feed this much back
    demand_w: int | None = None            # the car asks at most this (None: its OBC limit)
    rng: random.Random = field(default_factory=random.Random)

    def __post_init__(self) -> None:
        self.energy_wh = Fraction(self.spec.battery_wh) * Fraction(self.spec.soc_pct) / 100
        self.rng = random.Random(self.spec.seed)

    @property
    def soc_pct(self) -> float:
        return float(self.energy_wh * 100 / self.spec.battery_wh)

    @property
    def wants_energy(self) -> bool:
        return self.export_w > 0 or (self.soc_pct < self.spec.target_soc_pct
                                     and self.demand_w != 0)

    def loss_w(self, ac_power_w: int) -> float:
        if ac_power_w == 0:
            return 0.0
        return self.spec.loss_fixed_w + self.spec.loss_fraction * abs(ac_power_w)

    def dc_power_w(self) -> float:
        """Battery side: AC minus losses (charging) or minus export and losses (V2G)."""
        return self.ac_power_w - self.loss_w(self.ac_power_w)

    def ac_power_for(self, offered_a: float, delivering: bool) -> int:
        if not delivering:
            return 0
        current = min(offered_a, self.spec.obc_max_current_a)
        limit = round(self.spec.phases * self.spec.voltage_v * current)
        if self.export_w > 0:
            return -min(self.export_w, limit) if self.soc_pct > 0 else 0
        return limit if self.demand_w is None else min(limit, self.demand_w)

    def advance(self, seconds: Fraction) -> None:
        """Integrate ``seconds`` at the current power."""
        if seconds <= 0 or self.ac_power_w == 0:
            return
        dc = Fraction(self.dc_power_w())
        delta = dc * seconds / 3600
        self.energy_wh = min(max(self.energy_wh + delta, Fraction(0)),
                             Fraction(self.spec.battery_wh))
        sensed = delta * Fraction(self.spec.current_gain)
        if sensed > 0:
            self.charged_wh += sensed
        else:
            self.consumed_wh -= sensed

    def pack_voltage_v(self) -> float:
        ocv = self.spec.ocv_empty_v + (self.spec.ocv_full_v - self.spec.ocv_empty_v) * \
            self.soc_pct / 100
        return ocv + self.spec.resistance_ohm * self.dc_power_w() / ocv

    def sensed(self) -> dict[str, float | int]:
        """What the car's sensors report now (noise and gain error included)."""
        voltage = self.pack_voltage_v()
        current = self.dc_power_w() / voltage * self.spec.current_gain
        if self.ac_power_w != 0:
            current += self.rng.gauss(0.0, self.spec.current_noise_a)
        return {"PackVoltage": voltage + self.rng.gauss(0.0, self.spec.voltage_noise_v),
                "PackCurrent": current, "SoC": self.soc_pct,
                "Charging": int(self.ac_power_w > 0),
                "ChargedEnergy": int(self.charged_wh), "ConsumedEnergy": int(self.consumed_wh),
                "PowerLoss": round(self.loss_w(self.ac_power_w))}


class Plant:
    def __init__(self, config: PlantConfig | None = None,
                 clock: Callable[[], float] | None = None) -> None:
        self.config = config = config or PlantConfig()
        self.clock = clock or ScaledClock(config.time_scale)
        self.wallbox = WallboxModel(config.connectors, config.max_current_a)
        self.cars: dict[int, CarModel] = {}
        for spec in config.cars:
            if not 1 <= spec.connector <= config.connectors or spec.connector in self.cars:
                raise ValueError(f"car on connector {spec.connector}: no such free connector")
            self.cars[spec.connector] = CarModel(spec)
            self.wallbox[spec.connector].plugged = spec.plugged
        self.meter = MeterSimulator(dict.fromkeys(range(1, config.connectors + 1),
                                                  config.meter_map),
                                    clock=self.clock, import_wh=config.meter_import_wh,
                                    export_wh=0)
        self.wallbox_server = WallboxServer(config.wallbox_map, self.wallbox,
                                            power_of=self.power_w, clock=self.clock)
        self.wallbox_server.on_change = self.update
        self._at = Fraction(self.clock())
        self._profiles: dict[int, tuple[ChargingProfile, float]] = {}
        self._slow_due = 0.0                    # plant time of the next 1 Hz frames
        self._buses: dict[int, Any] = {}
        self._task: asyncio.Task[None] | None = None
        self.ports: dict[str, int] = {}
        self.frames_sent = 0
        self.update()

    # ------------------------------------------------------------------ physics

    def update(self) -> None:
        """Integrate up to now at the powers of the last update, then set new powers."""
        now = Fraction(self.clock())
        elapsed = now - self._at
        self._at = now
        for connector, car in self.cars.items():
            car.advance(elapsed)
            if connector in self._profiles:
                profile, t0 = self._profiles[connector]
                demand = profile.power_at(float(now) - t0)
                car.demand_w, car.export_w = max(0, demand), max(0, -demand)
            c = self.wallbox[connector]
            c.car_requests = car.wants_energy
            power = car.ac_power_for(c.offered_a, c.delivering)
            if power != car.ac_power_w:
                car.ac_power_w = power
                self.meter.set_power(power, unit=connector)

    def power_w(self, connector: int) -> int:
        """The AC power on ``connector`` (what its meter and the wallbox report)."""
        self.update()
        car = self.cars.get(connector)
        return car.ac_power_w if car is not None else 0

    def plug(self, connector: int = 1, plugged: bool = True) -> None:
        self.update()
        self.wallbox[connector].plugged = plugged
        self.update()

    def unplug(self, connector: int = 1) -> None:
        self.plug(connector, False)

    def set_export(self, connector: int, watts: int) -> None:
        """V2G: the car on ``connector`` feeds ``watts`` back (0: charge again)."""
        if watts < 0:
            raise ValueError("export watts must be >= 0")
        self.update()
        self.cars[connector].export_w = watts
        self.update()

    def set_profile(self, connector: int, profile: ChargingProfile | None) -> None:
        """What the car on ``connector`` asks for from now on, in plant time: positive W it
        wants to draw (at most what the EVSE offers and its OBC takes), negative W it feeds
        back (V2G), 0 it wants nothing (state B), as a car's BMS does over a session. None:
        as much as it can take (and no export)."""
        self.update()
        car = self.cars[connector]
        if profile is None:
            self._profiles.pop(connector, None)
            car.demand_w, car.export_w = None, 0
        else:
            self._profiles[connector] = (profile, self.clock())
        self.update()

    def set_fault(self, connector: int, fault: str | None) -> None:
        self.update()
        self.wallbox[connector].fault = fault
        self.update()

    def energy(self, connector: int = 1) -> dict[str, int | float]:
        """The truth and each path's view: meter counters, the car's counters, SoC."""
        self.update()
        car = self.cars[connector]
        imported, exported = self.meter.energy_wh(connector)
        return {"meter_import_wh": imported, "meter_export_wh": exported,
                "car_charged_wh": int(car.charged_wh), "car_consumed_wh": int(car.consumed_wh),
                "battery_wh": int(car.energy_wh), "soc_pct": round(car.soc_pct, 3),
                "ac_power_w": car.ac_power_w, "state": self.wallbox[connector].state.value}

    # ------------------------------------------------------------------ serving

    async def start(self) -> dict[str, int]:
        """Serve the meter and the wallbox, open the cars' buses, start ticking."""
        c = self.config
        if c.serve_meter:
            self.ports["meter"] = await self.meter.start_tcp(c.host, c.meter_port)
        self.ports["wallbox"] = await self.wallbox_server.start_tcp(c.host, c.wallbox_port)
        for connector, car in self.cars.items():
            if car.spec.bus is not None:
                import can  # the vehicle extra; only a plant with a CAN car needs it

                self._buses[connector] = can.Bus(**dict(car.spec.bus))
        self._task = asyncio.create_task(self._tick(), name="plant-tick")
        return dict(self.ports)

    async def _tick(self) -> None:
        while True:
            self.update()
            # BMS_Energy and OBC_Status are 1 Hz frames of the car's own time (plant.dbc): at
            # time_scale > 1 they come more often in wall time, at most once a tick.
            now = self.clock()
            slow = now >= self._slow_due
            if slow:
                self._slow_due = now + 1.0
            self._broadcast(every_second=slow)
            await asyncio.sleep(self.config.tick_s)

    def _broadcast(self, every_second: bool) -> None:
        if not self._buses:
            return
        import can

        db = _database()
        for connector, bus in self._buses.items():
            values = self.cars[connector].sensed()
            frames = [BMS_HV] + ([BMS_ENERGY, OBC_STATUS] if every_second else [])
            for frame_id in frames:
                message = db.get_message_by_frame_id(frame_id)
                data = message.encode({s.name: _fit(s, values[s.name])
                                       for s in message.signals})
                try:
                    bus.send(can.Message(arbitration_id=frame_id, data=data,
                                         is_extended_id=False))
                    self.frames_sent += 1
                except (can.CanError, OSError):
                    pass  # a bus hiccup: the next tick sends fresh values

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for bus in self._buses.values():
            bus.shutdown()
        self._buses.clear()
        await self.wallbox_server.stop()
        await self.meter.stop()


def _database() -> Any:
    global _DB
    if _DB is None:
        import cantools

        _DB = cantools.database.load_file(str(DBC_PATH), database_format="dbc")
    return _DB


_DB: Any = None


def _fit(signal: Any, value: float | int) -> float | int:
    """Clamp to the signal's range (a DBC signal cannot carry more)."""
    low, high = signal.minimum, signal.maximum
    if low is not None:
        value = max(value, low)
    if high is not None:
        value = min(value, high)
    return value if not isinstance(value, float) or math.isfinite(value) else 0


# --------------------------------------------------------------------------- config


def config_from_table(data: Mapping[str, object], where: str) -> PlantConfig:
    """A plant config file (``--config``); ConfigError naming file and key."""
    top = Table(data, where)
    meter = top.table("meter")
    wallbox = top.table("wallbox")
    connectors = wallbox.int("connectors", 1, min=1, max=8)
    cars = []
    for car in top.tables("car"):
        bus = car.raw("bus", None)
        if bus is not None and not isinstance(bus, Mapping):
            raise car.error("bus", "a table of python-can Bus arguments", bus)
        try:
            cars.append(CarSpec(
                connector=car.int("connector", 1, min=1, max=connectors),
                battery_wh=car.int("battery_wh", 60_000, min=1_000, max=500_000),
                soc_pct=car.float("soc_pct", 40.0, min=0.0, max=100.0),
                target_soc_pct=car.float("target_soc_pct", 100.0, min=0.0, max=100.0),
                obc_max_current_a=car.float("obc_max_current_a", 16.0, min=1.0, max=80.0),
                phases=car.choice("phases", 3, (1, 3)),
                plugged=car.bool("plugged", True),
                current_gain=car.float("current_gain", 1.002, min=0.9, max=1.1),
                seed=car.int("seed", 1), bus=bus))
        except ValueError as exc:
            raise car.error("(car)", "a consistent car", str(exc)) from None
        car.reject_unknown()
    config = PlantConfig(
        wallbox_map=wallbox.nonempty_str("map", "phoenix-ev-eth"),
        meter_map=meter.nonempty_str("map", "sdm630"), connectors=connectors,
        max_current_a=wallbox.float("max_current_a", 32.0, min=6.0, max=80.0),
        cars=tuple(cars) or (CarSpec(),),
        meter_import_wh=meter.int("import_wh", 1_000_000, min=0),
        time_scale=top.float("time_scale", 1.0, min=0.01, max=10_000.0),
        host=top.str("host", "127.0.0.1"), meter_port=meter.int("port", 0, min=0, max=65535),
        wallbox_port=wallbox.int("port", 0, min=0, max=65535))
    for t in (meter, wallbox, top):
        t.reject_unknown()
    return config


def load_config(path: Path) -> PlantConfig:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return config_from_table(data, str(path))


# --------------------------------------------------------------------------- process


def command(plant: Plant, line: str) -> dict[str, object]:
    """One control line (``plug 1``, ``export 1 3000`` ...) -> the JSON answer."""
    words = line.split()
    try:
        match words:
            case ["plug", n]:
                plant.plug(int(n))
            case ["unplug", n]:
                plant.unplug(int(n))
            case ["export", n, watts]:
                plant.set_export(int(n), int(watts))
            case ["demand", n, "none"]:
                plant.set_profile(int(n), None)
            case ["demand", n, watts]:
                plant.set_profile(int(n), ChargingProfile.constant(int(watts)))
            case ["fault", n, "none"]:
                plant.set_fault(int(n), None)
            case ["fault", n, *text] if text:
                plant.set_fault(int(n), " ".join(text))
            case ["silent", "on"]:
                for unit in plant.wallbox_server.units:
                    plant.wallbox_server.inject(unit, Fault.SILENT)
            case ["silent", "off"]:
                plant.wallbox_server.clear()
            case ["state"]:
                pass
            case _:
                return {"ok": False, "error": f"unknown command {line.strip()!r}"}
        return {"ok": True, "state": {str(c): plant.energy(c) for c in plant.cars}}
    except (ValueError, KeyError) as exc:
        return {"ok": False, "error": str(exc)}


async def _serve(config: PlantConfig) -> None:
    plant = Plant(config)
    ports = await plant.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    print(json.dumps({"ready": True, **ports}), flush=True)

    async def commands() -> None:
        while line := (await reader.readline()).decode("utf-8", "replace"):
            if line.strip():
                print(json.dumps(command(plant, line)), flush=True)
        stop.set()   # stdin closed: the rig is gone

    task = asyncio.create_task(commands(), name="plant-commands")
    try:
        await stop.wait()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await plant.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hil.sim.plant",
                                     description="Serve one simulated charging site.")
    parser.add_argument("--config", type=Path, help="plant TOML file (default: built-in)")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config) if args.config else PlantConfig()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
