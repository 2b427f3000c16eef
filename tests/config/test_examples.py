"""The shipped example configs (config/*.toml) and the configuration reference.

Each example must parse, every section must pass the validation of the part that owns it,
every source must build with the runtime's own ``build_sources`` without opening anything
(the examples name hardware this machine does not have), and ``edge-agent config check``
must say ok. The commented-out alternatives in the examples (the ELM327 adapter, the
simulated meter) are uncommented and checked the same way, so they cannot rot.
docs/configuration.md must name every key the code accepts, per table: the key sets are
read from the code, not listed here. And config/hil.toml, which needs no hardware, is run
as shipped (ports swapped) against a real mosquitto, and its envelopes are verified.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import signal
import subprocess
import sys
import threading
import tomllib
from pathlib import Path

import psutil
import pytest

from agent.channel.settings import (
    COMMON_CHANNEL_KEYS,
    STATION_KEYS,
    VEHICLE_KEYS,
    ConnectorConfig,
    EnergyConfig,
)
from agent.config import BatchConfig, Config, DeviceConfig, load_config, parse_config
from agent.errors import ConfigError
from agent.fleet_keys import FleetRegistry
from agent.keys import KeyStore
from agent.live_verify import verify_mqtt
from agent.metrics import MetricsConfig
from agent.options import Table
from agent.runtime import build_sources
from agent.settlement.settings import SettlementConfig
from agent.spool import SpoolConfig
from agent.status import StatusConfig
from agent.uplink import MqttConfig
from firmware_adapters.modbus.mapfile import load_map
from firmware_adapters.registry import kind_roles, source_class

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = {"vehicle.toml": "vehicle", "station.toml": "station", "hil.toml": "vehicle"}
EDGE_AGENT = str(Path(sys.executable).parent / "edge-agent")
REFERENCE = ROOT / "docs" / "configuration.md"
TEST_DBC = ROOT / "tests" / "data" / "dbc" / "ev_test.dbc"


def example(name: str) -> Path:
    return ROOT / "config" / name


@pytest.fixture(params=sorted(EXAMPLES))
def config(request: pytest.FixtureRequest) -> Config:
    return load_config(example(request.param))


# --- parsing and per-section validation -------------------------------------------------------

@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_parses_with_its_role(name: str) -> None:
    config = load_config(example(name))
    assert config.device.role == EXAMPLES[name]
    assert config.device.id, "examples name their device"
    assert config.sources, "examples have at least one source"


def test_sections_validate_with_their_parts(config: Config) -> None:
    device_id = config.device.id or "unset"
    mqtt = MqttConfig.from_table(config.section("mqtt"), device_id)
    spool = SpoolConfig.from_table(config.section("spool"), config.device.state_dir)
    status = StatusConfig.from_table(config.section("status"))
    metrics = MetricsConfig.from_table(config.section("metrics"))
    assert mqtt.client_id == device_id
    assert spool.max_bytes >= 64 * 1024 and 0.1 <= spool.low_water <= 1.0
    assert spool.path.parent == config.device.state_dir  # the default: next to the keys
    assert status.interval_s > 0
    assert metrics.host in ("127.0.0.1", "::1", "localhost")
    if config.section("channel").data:  # [channel] reads its [settlement] keys too
        from agent.channel.service import ServiceSettings

        assert ServiceSettings.from_config(config) is not None
    elif config.section("settlement").data:
        SettlementConfig.from_table(config.section("settlement"))


@pytest.mark.parametrize("name", ["vehicle.toml", "station.toml"])
def test_fleet_examples_use_tls_with_client_certificates(name: str) -> None:
    config = load_config(example(name))
    mqtt = MqttConfig.from_table(config.section("mqtt"), config.device.id or "x")
    assert mqtt.tls and mqtt.port == 8883
    assert mqtt.ca_file and mqtt.cert_file and mqtt.key_file
    assert mqtt.password is None  # no secret in a shipped file


def test_hil_example_talks_to_a_loopback_broker() -> None:
    config = load_config(example("hil.toml"))
    mqtt = MqttConfig.from_table(config.section("mqtt"), "ev-hil-1")
    assert mqtt.host == "127.0.0.1" and not mqtt.tls
    assert [s.kind for s in config.sources] == ["hil-ecu"]
    assert config.batch.max_age_ms <= 1000


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_every_key_in_an_example_is_commented_with_its_default(name: str) -> None:
    """Each key (or a group of keys on consecutive lines) has a comment block right above
    it that gives its default or says it is required."""
    undocumented, comment = [], []
    for number, line in enumerate(example(name).read_text().splitlines(), 1):
        if line.startswith("#"):
            comment.append(line.lower())
        elif line.startswith("[") or not line.strip():
            comment = []
        elif re.match(r"^[a-z_]+ = ", line):
            text = " ".join(comment)
            if "default" not in text and "required" not in text:
                undocumented.append(f"{name}:{number}: {line}")
    assert not undocumented


# --- sources build, and building opens nothing ------------------------------------------------

def _footprint() -> tuple[int, int, int]:
    me = psutil.Process()
    return me.num_fds(), len(me.net_connections(kind="all")), threading.active_count()


def with_test_dbc(config: Config) -> Config:
    """The example's DBC path names a file on the car; here the test DBC stands in."""
    sources = tuple(dataclasses.replace(s, options={**s.options, "dbc": str(TEST_DBC)})
                    if s.kind == "dbc" else s for s in config.sources)
    return dataclasses.replace(config, sources=sources)


def _build_quietly(config: Config) -> list:
    config = with_test_dbc(config)
    # Import every driver first: importing may open files (it is not what is measured).
    for entry in config.sources:
        source_class(entry.kind)
    before = _footprint()
    runners = build_sources(config)
    after = _footprint()
    assert after == before, f"building sources opened something: {before} -> {after}"
    return runners


def test_every_source_builds_without_opening_hardware(config: Config) -> None:
    runners = _build_quietly(config)
    assert [(r.source.id, r.kind) for r in runners] == \
        [(s.id, s.kind) for s in config.sources]
    for runner in runners:
        assert runner.source.kind == runner.kind
        assert runner.state == "starting" and runner.readings == 0


def test_vehicle_dbc_source_maps_the_signals_it_names() -> None:
    runners = _build_quietly(load_config(example("vehicle.toml")))
    dbc = next(r.source for r in runners if r.kind == "dbc")
    names = sorted(rule.name for _, rules in dbc.decoder.messages.values() for rule in rules)
    assert "Vehicle.TraveledDistance" in names and len(names) == 5


def test_vehicle_example_names_the_dbc_file_on_the_car() -> None:
    """As shipped, the DBC path is the car's: where it is missing, the error says so; where
    it is there (a real gateway), the example builds."""
    config = load_config(example("vehicle.toml"))
    if Path("/etc/edge-agent/car.dbc").exists():
        assert any(r.kind == "dbc" for r in _build_quietly(config))
        return
    with pytest.raises(ConfigError, match=r"sources\.can-broadcast\.dbc: expected the car's DBC "
                       r"file \(its CAN signals.*found \"/etc/edge-agent/car\.dbc\" \(no such file\)"):
        build_sources(config)


def test_station_meters_are_what_the_example_says() -> None:
    runners = _build_quietly(load_config(example("station.toml")))
    by_id = {r.source.id: r.source for r in runners}
    meters = {sid: [m.config for m in source.meters] for sid, source in by_id.items()}
    sdm630 = load_map("sdm630").model
    assert [(m.unit, m.meter_map.model, m.label) for m in meters["rs485"]] == \
        [(1, sdm630, "charge point 1")]
    assert [(m.unit, m.meter_map.model) for m in meters["gateway"]] == [(2, sdm630)]


def test_station_example_charges_at_its_wallbox() -> None:
    """The example's [[chargers]] / [channel] block is live: it builds (no I/O) and its
    connector names the wallbox and a meter source of the file."""
    from agent.channel.service import ServiceSettings
    from agent.runtime import build_chargers

    config = load_config(example("station.toml"))
    (charger,) = build_chargers(config).values()
    assert (charger.kind, charger.map.model, charger.host, charger.connectors) == (  # type: ignore[attr-defined]
        "modbus-evse", load_map_evse("phoenix-ev-eth").model, "192.168.10.30", (1,))
    settings = ServiceSettings.from_config(config)
    assert settings is not None and settings.channel.station is not None
    (connector,) = settings.channel.station.connectors
    assert (connector.charger, connector.meter) == ("wallbox", "gateway")
    assert settings.settlement.node is not None and settings.settlement.contract is not None


def load_map_evse(name: str):  # type: ignore[no-untyped-def]
    from firmware_adapters.evse.maps import load_map as load_charger_map

    return load_charger_map(name)


# --- the commented-out alternatives -----------------------------------------------------------

def commented_sources(path: Path) -> list[str]:
    """Each commented-out ``# [[sources]]`` block of an example, uncommented once."""
    blocks, current = [], None
    for line in path.read_text().splitlines():
        if line.strip() == "# [[sources]]":
            current = []
            blocks.append(current)
        if current is not None:
            if not line.startswith("#"):
                current = None
                continue
            current.append(line[2:] if line.startswith("# ") else line[1:])
    return ["\n".join(block) for block in blocks]


ALTERNATIVES = [(name, index, text) for name in sorted(EXAMPLES)
                for index, text in enumerate(commented_sources(example(name)))]


def test_the_examples_show_their_alternatives() -> None:
    kinds = {name: [re.search(r'^kind = "([^"]+)"', text, re.M).group(1)  # type: ignore[union-attr]
                    for n, _, text in ALTERNATIVES if n == name] for name in EXAMPLES}
    assert kinds == {"vehicle.toml": ["elm327"], "station.toml": [],
                     "hil.toml": ["hil-meter"]}


@pytest.mark.parametrize("name,index,text", ALTERNATIVES,
                         ids=[f"{n}-{i}" for n, i, _ in ALTERNATIVES])
def test_commented_alternative_builds_when_uncommented(name: str, index: int,
                                                       text: str) -> None:
    data = tomllib.loads(text)
    # The alternative's comment says which role it is for (hil.toml's meter: a station).
    role = "station" if kind_roles(data["sources"][0]["kind"]) == {"station"} else "vehicle"
    table = Table({"sources": data["sources"], "device": {"role": role}},
                  f"{name} (commented source {index})")
    config = parse_config(table)
    runners = _build_quietly(config)
    assert [r.kind for r in runners] == [config.sources[0].kind]


def test_a_broken_example_key_is_caught(tmp_path: Path) -> None:
    """The checks above can fail: a typo in a copied example is an error naming the key."""
    text = example("station.toml").read_text().replace("silent_after = 3\n# One meter",
                                                       "silent_aftr = 3\n# One meter")
    broken = tmp_path / "station.toml"
    broken.write_text(text)
    with pytest.raises(ConfigError, match="silent_aftr"):
        build_sources(load_config(broken))


# --- edge-agent config check ------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_config_check_says_ok(name: str, tmp_path: Path) -> None:
    path = example(name)
    if name == "vehicle.toml":
        # `config check` builds the sources, so it needs the car's DBC file where the config
        # says; on this machine it is not there: one clear line says so ...
        result = subprocess.run([EDGE_AGENT, "config", "check", str(path)],
                                capture_output=True, text=True, timeout=60)
        if not Path("/etc/edge-agent/car.dbc").exists():
            assert result.returncode == 2
            assert "sources.can-broadcast.dbc: expected the car's DBC file" in result.stderr
            assert len(result.stderr.strip().splitlines()) == 1
        # ... and with the DBC file present, the example checks out.
        copy = tmp_path / name
        copy.write_text(path.read_text().replace("/etc/edge-agent/car.dbc", str(TEST_DBC)))
        path = copy
    result = subprocess.run([EDGE_AGENT, "config", "check", str(path)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith(f"{path}: ok ({EXAMPLES[name]}; ")
    assert result.stderr == ""


def test_config_check_finds_a_bad_section_before_run(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(example("hil.toml").read_text().replace("mqtt://127.0.0.1:1883",
                                                           "http://127.0.0.1:1883"))
    result = subprocess.run([EDGE_AGENT, "config", "check", str(bad)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and "mqtt.url: expected mqtt://" in result.stderr


# --- the reference names every key the code accepts -------------------------------------------

def keys_read(from_table, data: dict[str, object], *args: object) -> set[str]:
    """The keys a part's ``from_table`` reads, recorded by running it on ``data``."""
    table = Table(data, "probe", "probe")
    from_table(table, *args)
    return set(table.used)


def source_keys() -> dict[str, set[str]]:
    """Per source kind, the option keys its ``from_options`` accepts (from the code)."""
    from firmware_adapters.modbus import driver as modbus
    from firmware_adapters.obd.can_driver import CAN_KEYS
    from firmware_adapters.obd.options import POLL_KEYS
    from firmware_adapters.obd.serial_driver import ELM_KEYS

    def modbus_keys(kind: str, options: dict[str, object]) -> set[str]:
        # The poll and meter keys are read back from the options reader; the line keys are
        # read by from_options itself (and its unknown-key error does not list them).
        opts = modbus.Table(options, "probe", "probe")
        modbus.poll_config(opts)
        modbus.meter_configs(opts)
        return opts.used - {"id", "kind"} | {"meters", "unit", "map"} | (
            {"port", "baudrate", "bytesize", "parity", "stopbits"} if kind == "modbus-rtu"
            else {"host", "port"})

    return {
        "obd-can": CAN_KEYS | POLL_KEYS,
        "elm327": ELM_KEYS | POLL_KEYS,
        "modbus-rtu": modbus_keys("modbus-rtu", {"map": "sdm630"}),
        "modbus-tcp": modbus_keys("modbus-tcp", {"map": "sdm630"}),
        "dbc": allowed_by_error("dbc"),
        "hil-ecu": allowed_by_error("hil-ecu"),
    }


def allowed_by_error(kind: str) -> set[str]:
    """The accepted keys a source lists in its unknown-key error ("one of a, b, c")."""
    with pytest.raises(ConfigError) as info:
        source_class(kind).from_options("probe", {"no_such_key": 1}, "probe")
    expected = info.value.expected or ""
    assert expected.startswith("one of "), expected
    return set(expected.removeprefix("one of ").split(", "))


def reference_section(heading: str) -> str:
    text = REFERENCE.read_text()
    match = re.search(rf"^##+ [^\n]*{re.escape(heading)}[^\n]*\n(.*?)(?=^#{{2,}} |\Z)", text,
                      re.M | re.S)
    assert match, f"docs/configuration.md has no section for {heading}"
    return match.group(1)


TABLE_PARTS = {
    "[device]": lambda: keys_read(DeviceConfig.from_table, {}),
    "[batch]": lambda: keys_read(BatchConfig.from_table, {}),
    "[mqtt]": lambda: keys_read(MqttConfig.from_table, {"url": "mqtt://127.0.0.1"}, "dev"),
    "[spool]": lambda: keys_read(SpoolConfig.from_table, {}),
    "[status]": lambda: keys_read(StatusConfig.from_table, {}),
    "[metrics]": lambda: keys_read(MetricsConfig.from_table, {}),
    "[settlement]": lambda: keys_read(SettlementConfig.from_table, {}),
}
# The charging tables: heading in docs/configuration.md -> the keys the code accepts.
CHANNEL_PARTS = {
    "`[channel]` station": lambda: set(STATION_KEYS) | COMMON_CHANNEL_KEYS | {"registry"},
    "`[channel]` vehicle": lambda: set(VEHICLE_KEYS) | COMMON_CHANNEL_KEYS | {"registry"},
    "`[[channel.connectors]]`": lambda: {f.name for f in dataclasses.fields(ConnectorConfig)},
    "`[channel.energy]`": lambda: {f.name for f in dataclasses.fields(EnergyConfig)},
    "`[settlement]` session": lambda: {"submit", "coop_grace_s"},
    "`[[chargers]]`": lambda: {"id", "kind"},
}


@pytest.mark.parametrize("heading", sorted(TABLE_PARTS))
def test_reference_names_every_key_of_each_table(heading: str) -> None:
    keys = TABLE_PARTS[heading]()
    assert keys, heading
    section = reference_section(f"`{heading}`")
    missing = sorted(k for k in keys if f"`{k}`" not in section)
    assert not missing, f"docs/configuration.md {heading} does not document {missing}"


@pytest.mark.parametrize("heading", sorted(CHANNEL_PARTS))
def test_reference_names_every_key_of_the_charging_tables(heading: str) -> None:
    keys = CHANNEL_PARTS[heading]()
    section = reference_section(heading)
    missing = sorted(k for k in keys if f"`{k}`" not in section)
    assert keys and not missing, f"docs/configuration.md {heading} does not document {missing}"


@pytest.mark.parametrize("kind", ["obd-can", "elm327", "dbc", "modbus-rtu", "modbus-tcp",
                                  "hil-ecu"])
def test_reference_names_every_option_of_each_source_kind(kind: str) -> None:
    keys = source_keys()[kind]
    section = reference_section(f'`kind = "{kind}"`')
    missing = sorted(k for k in keys if f"`{k}`" not in section)
    assert not missing, f"docs/configuration.md ({kind}) does not document {missing}"


def test_examples_use_only_documented_keys() -> None:
    """Every key set in an example (or its commented alternatives) is in the reference."""
    reference = REFERENCE.read_text()
    for name in EXAMPLES:
        for line in example(name).read_text().splitlines():
            match = re.match(r"^(?:# )?([a-z_]+) = ", line)
            if match:
                assert f"`{match.group(1)}`" in reference, f"{name}: {match.group(1)}"


# --- the HIL example runs as it is ------------------------------------------------------------

def test_hil_example_runs_and_every_envelope_verifies(tmp_path: Path, mosquitto) -> None:
    """config/hil.toml as shipped, with only the broker's port and the metrics port swapped
    for free ones: the agent starts in that directory, streams envelopes that verify, shows
    in `edge-agent status`, and stops cleanly on SIGTERM."""
    text = example("hil.toml").read_text()
    changed = text.replace('url = "mqtt://127.0.0.1:1883"', f'url = "{mosquitto.url}"') \
        .replace("port = 9466", "port = 0")
    assert changed.count(mosquitto.url) == 1 and "port = 0" in changed
    (tmp_path / "hil.toml").write_text(changed)
    _, record = KeyStore(tmp_path / "hil-state").init("ev-hil-1")
    registry = FleetRegistry()
    registry.add_record(record)
    log = (tmp_path / "agent.log").open("w")
    proc = subprocess.Popen([EDGE_AGENT, "run", "--config", "hil.toml"], cwd=tmp_path,
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        report = asyncio.run(verify_mqtt(mosquitto.url, registry, envelopes=3, idle_s=15,
                                         timeout_s=45))
        assert report.ok, report.format()
        assert report.devices["ev-hil-1"].readings > 0
        status = subprocess.run([EDGE_AGENT, "status", "--config", "hil.toml"], cwd=tmp_path,
                                capture_output=True, text=True, timeout=30)
        assert status.returncode == 0 and "car" in status.stdout, status.stdout
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    output = (tmp_path / "agent.log").read_text()
    assert proc.returncode == 0, output
    assert "Traceback" not in output
