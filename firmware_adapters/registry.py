"""Source kinds named in config -> lazily imported classes.

Importing a driver pulls in its hardware stack (python-can, pymodbus ...), so nothing is
imported until a config names the kind; a missing optional dependency becomes an
AdapterUnavailable that names the extra to install.
"""

from __future__ import annotations

import importlib

from agent.errors import AdapterUnavailable, ConfigError
from firmware_adapters.base import Source

# kind -> (module, class, pip extra that provides its dependencies). The ``hil-*`` kinds
# are simulators shipped in ``hil/``; naming them here by string is the plugin hook (as
# python-can's entry points), not an import of ``hil`` by this package.
SOURCE_KINDS: dict[str, tuple[str, str, str]] = {
    "obd-can": ("firmware_adapters.obd.can_driver", "ObdCanSource", "vehicle"),
    "elm327": ("firmware_adapters.obd.serial_driver", "Elm327Source", "vehicle"),
    "dbc": ("firmware_adapters.dbc", "DbcSource", "vehicle"),
    "modbus-rtu": ("firmware_adapters.modbus.driver", "ModbusRtuSource", "station"),
    "modbus-tcp": ("firmware_adapters.modbus.driver", "ModbusTcpSource", "station"),
    "hil-ecu": ("hil.ecu_source", "HilEcuSource", "vehicle"),
    "hil-meter": ("hil.meter_source", "HilMeterSource", "station"),
}


def source_class(kind: str) -> type[Source]:
    try:
        module_name, cls_name, extra = SOURCE_KINDS[kind]
    except KeyError:
        known = ", ".join(sorted(SOURCE_KINDS)) or "none"
        raise ConfigError(key="sources.kind", expected=f"one of: {known}", found=kind) from None
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise AdapterUnavailable(
            f"source kind {kind!r} needs the {exc.name!r} package: "
            f"pip install 'ev-edge-agent[{extra}]'", reason="missing-dependency") from exc
    return getattr(module, cls_name)
