"""Config: every error names the file, the key, what was expected and what was found."""

import pytest

from agent.config import load_config
from agent.errors import ConfigError


def write(tmp_path, text):
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def test_valid_config(tmp_path):
    config = load_config(write(tmp_path, """
[device]
id = "ev-1"
role = "vehicle"
state_dir = "/tmp/s"
[batch]
max_readings = 10
max_age_ms = 500
[[sources]]
id = "obd0"
kind = "elm327"
port = "/dev/ttyUSB0"
[mqtt]
url = "mqtt://localhost"
"""))
    assert config.device.id == "ev-1" and config.batch.max_readings == 10
    assert config.sources[0].options == {"port": "/dev/ttyUSB0"}
    assert config.section("mqtt").str("url") == "mqtt://localhost"


@pytest.mark.parametrize("text,message", [
    ("[batch]\nmax_readings = -1", "agent.toml: batch.max_readings: expected an integer in [1, 10000], found -1"),
    ("[device]\nrole = 'tractor'", "device.role: expected one of vehicle, station, found \"tractor\""),
    ("[device]\nrolle = 'vehicle'", "device.rolle: expected one of id, registry, role, state_dir, found unknown key \"rolle\"; did you mean \"role\"?"),
    ("[[sources]]\nkind = 'x'", "sources[0].id: expected a value, found nothing (the key is required)"),
    ("[[sources]]\nid='a'\nkind='x'\n[[sources]]\nid='a'\nkind='y'", "sources[1].id: expected a unique source id"),
    ("[device\n", "not valid TOML"),
    ("surprise = 1", "surprise: expected one of batch, channel, chargers, device"),
])
def test_errors_are_one_clear_line(tmp_path, text, message):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.toml")
