"""[channel] and [settlement] session keys: the shipped examples validate (the station's
commented block uncommented), and bad values fail with file, key, expected and found."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from agent.channel.service import ServiceSettings
from agent.config import load_config, load_toml, parse_config
from agent.errors import ConfigError

ROOT = Path(__file__).resolve().parents[3]
CONTRACT = "0x5FbDB2315678afecb367f032d93F642f64180aa3"


def station_example(tmp_path: Path) -> Path:
    """config/station.toml with its commented [[chargers]] / [channel] block uncommented."""
    text = (ROOT / "config" / "station.toml").read_text()
    start = text.index("# [[chargers]]")
    end = text.index("\n\n", text.index("# max_current_a"))
    block = "\n".join(re.sub(r"^# ?", "", line) for line in text[start:end].splitlines())
    text = text[:start] + block + text[end:]
    text = text.replace(f'# contract = "{CONTRACT}"', f'contract = "{CONTRACT}"')
    path = tmp_path / "station.toml"
    path.write_text(text)
    return path


def test_station_example_channel_block_validates(tmp_path: Path) -> None:
    config = load_config(station_example(tmp_path))
    settings = ServiceSettings.from_config(config)
    assert settings is not None and settings.channel.station is not None
    station = settings.channel.station
    assert station.tariff.price_per_kwh == 300_000 and len(station.tariff.tou) == 3
    assert [c.charger for c in station.connectors] == ["wallbox"]
    assert settings.channel.submit == "station"


def test_vehicle_example_channel_validates() -> None:
    settings = ServiceSettings.from_config(load_config(ROOT / "config" / "vehicle.toml"))
    assert settings is not None and settings.channel.vehicle is not None
    vehicle = settings.channel.vehicle
    assert vehicle.energy is not None and vehicle.energy.method == "vi"
    assert vehicle.home_station == "cs-berlin-07" and len(vehicle.operator_keys) == 1


BASE_STATION = f"""
[device]
id = "cs-1"
role = "station"
[[sources]]
id = "m"
kind = "hil-meter"
[[chargers]]
id = "wb"
kind = "hil-evse"
[settlement]
contract = "{CONTRACT}"
[channel]
policy = "open"
price_per_kwh = 100
[[channel.connectors]]
id = 1
charger = "wb"
meter = "m"
"""


@pytest.mark.parametrize("change, message", [
    (("price_per_kwh = 100", "price_per_kwh = -1"), "channel.price_per_kwh: expected an integer"),
    (('meter = "m"', 'meter = "x"'), "channel.connectors[0].meter: expected the id of a "
                                     "[[sources]] table"),
    (('charger = "wb"', 'charger = "x"'), "channel.connectors[0].charger: expected the id"),
    (('policy = "open"', 'policy = "registry"'), "channel.registry: expected a fleet registry"),
    (("price_per_kwh = 100", "price_per_kwh = 100\nmax_price_per_kwh = 5"),
     "channel.max_price_per_kwh: expected a key of the station role"),
    (("price_per_kwh = 100", "price_per_kwh = 100\ntou = [[10, 1], [5, 2]]"),
     "channel.tou: expected start minutes unique and increasing"),
    (("price_per_kwh = 100", "price_per_kwh = 100\npay_step_wh = 500"),
     "channel.pay_step_wh: expected at most credit_window_wh"),
    ((f'contract = "{CONTRACT}"', 'submit = "both"'), "settlement.submit: expected one of"),
    ((f'contract = "{CONTRACT}"', "poll_s = 1.0"), "settlement.contract: expected the channel "
                                                   "contract"),
    (("price_per_kwh = 100", "price_per_kwh = 100\ncredit_windoww_wh = 5"),
     'did you mean "credit_window_wh"'),
])
def test_bad_channel_values_name_file_key_expected_found(tmp_path: Path, change: tuple,
                                                         message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(BASE_STATION.replace(*change))
    with pytest.raises(ConfigError) as info:
        ServiceSettings.from_config(parse_config(load_toml(path)))
    assert str(info.value).startswith(str(path)), info.value
    assert message in str(info.value), info.value


def test_a_charger_no_connector_uses_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(BASE_STATION + '\n[[chargers]]\nid = "spare"\nkind = "hil-evse"\n')
    with pytest.raises(ConfigError, match="chargers.spare: expected a charger that a"):
        ServiceSettings.from_config(load_config(path))
