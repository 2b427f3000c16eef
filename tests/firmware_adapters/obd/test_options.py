"""Config checking of the vehicle sources: every error names the file, key, expectation."""

from __future__ import annotations

import pytest

from agent.errors import ConfigError
from firmware_adapters.obd.can_driver import ObdCanSource
from firmware_adapters.obd.scheduler import NS
from firmware_adapters.obd.serial_driver import Elm327Source
from firmware_adapters.registry import source_class
from hil.sim.ecu_source import HilEcuSource


@pytest.mark.parametrize(("kind", "cls"), [("obd-can", ObdCanSource), ("elm327", Elm327Source),
                                           ("hil-ecu", HilEcuSource)])
def test_registry_resolves_the_vehicle_kinds(kind: str, cls: type) -> None:
    assert source_class(kind) is cls


def test_defaults_and_pid_periods() -> None:
    src = ObdCanSource.from_options("obd0", {"interface": "virtual", "channel": "c",
                                             "pids": {"SPEED": 0.5, "0C": 2, "0xA6": 60}},
                                    "car.toml")
    assert src.poller.periods_ns == {0x0D: NS // 2, 0x0C: 2 * NS, 0xA6: 60 * NS}
    assert src.addressing.bits == 11 and src.target is None
    assert src.window_ns == 100_000_000
    phys = ObdCanSource.from_options("obd0", {"interface": "virtual", "channel": "c",
                                              "addressing": 29, "request": "physical",
                                              "ecu": 0x10}, "car.toml")
    assert phys.addressing.bits == 29 and phys.target == 0x10


@pytest.mark.parametrize(("options", "key"), [
    ({"channel": "c"}, "sources.obd0.interface"),
    ({"interface": "virtual", "channel": "c", "addressing": 12}, "sources.obd0.addressing"),
    ({"interface": "virtual", "channel": "c", "pids": {"NOPE": 1}}, "sources.obd0.pids.NOPE"),
    ({"interface": "virtual", "channel": "c", "pids": {"SPEED": 0}}, "sources.obd0.pids.SPEED"),
    ({"interface": "virtual", "channel": "c", "max_pids": 7}, "sources.obd0.max_pids"),
    ({"interface": "virtual", "channel": "c", "read_vin": "yes"}, "sources.obd0.read_vin"),
    ({"interface": "virtual", "channel": "c", "colour": "red"}, "sources.obd0.colour"),
    ({"interface": "virtual", "channel": "c", "bus_options": {"x": [1]}},
     "sources.obd0.bus_options"),
])
def test_bad_can_options(options: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        ObdCanSource.from_options("obd0", options, "car.toml")
    assert err.value.file == "car.toml" and err.value.key == key


def test_bad_elm_options() -> None:
    with pytest.raises(ConfigError) as err:
        Elm327Source.from_options("elm0", {"port": "/dev/ttyUSB0", "baudrate": 12},
                                  "car.toml")
    assert err.value.key == "sources.elm0.baudrate" and err.value.found == 12
    with pytest.raises(ConfigError):
        Elm327Source.from_options("elm0", {}, "car.toml")
