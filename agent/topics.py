"""The MQTT topic scheme (DESIGN s4), in one place for the agent, the adapters and the fleet.

::

    evedge/v1/<device>/telemetry             sealed envelopes (QoS 1)
    evedge/v1/<device>/event                 sealed event envelopes (never dropped)
    evedge/v1/<device>/status                retained online/offline/lost (last will)
    evedge/v1/<device>/commit                retained fleet commit mark (agent.fleet_commit)
    evedge/v1/channel/<channel id hex>/<role>  payment-channel messages FROM role (ev | cs)
    evedge/v1/<station>/offer/<connector>    retained, signed connector offer (docs/charging.md)
    evedge/v1/<station>/request              vehicles' signed session requests to a station
    evedge/v1/<vehicle>/answer               the station's signed accept / refusal
    evedge/v1/<vehicle>/command              fleet operator's signed commands to a vehicle

Every level that comes from config or from the wire is checked: an id that holds ``/``, ``+``
or ``#`` would publish into (or subscribe to) another device's topics.
"""

from __future__ import annotations

ROOT = "evedge/v1"
CHANNEL_ROOT = f"{ROOT}/channel"
ROLES = ("ev", "cs")


def level(value: str, what: str = "topic level") -> str:
    """``value`` when it is one non-empty MQTT topic level without wildcards (MQTT 5
    s4.7.1); ValueError otherwise."""
    if not value or any(c in value for c in "/+#\0"):
        raise ValueError(f"{what} {value!r} is not a single MQTT topic level")
    return value


def telemetry_topic(device_id: str) -> str:
    return f"{ROOT}/{level(device_id, 'device id')}/telemetry"


def event_topic(device_id: str) -> str:
    return f"{ROOT}/{level(device_id, 'device id')}/event"


def status_topic(device_id: str) -> str:
    return f"{ROOT}/{level(device_id, 'device id')}/status"


def commit_topic(device_id: str) -> str:
    return f"{ROOT}/{level(device_id, 'device id')}/commit"


def channel_topic(channel_id: str, role: str) -> str:
    """``evedge/v1/channel/<channel id hex>/<role>``: messages FROM ``role`` (ev or cs)."""
    if role not in ROLES:
        raise ValueError(f"channel role {role!r} is not one of {', '.join(ROLES)}")
    return f"{CHANNEL_ROOT}/{level(channel_id, 'channel id')}/{role}"


def offer_topic(station_id: str, connector: int | str) -> str:
    """Retained: the station's signed offer for one connector (``+`` for all of them)."""
    level_ = "+" if connector == "+" else level(str(int(connector)), "connector")
    return f"{ROOT}/{level(station_id, 'station id')}/offer/{level_}"


def request_topic(station_id: str) -> str:
    return f"{ROOT}/{level(station_id, 'station id')}/request"


def answer_topic(vehicle_id: str) -> str:
    return f"{ROOT}/{level(vehicle_id, 'vehicle id')}/answer"


def command_topic(vehicle_id: str) -> str:
    return f"{ROOT}/{level(vehicle_id, 'vehicle id')}/command"


def device_of(topic: str) -> str | None:
    """The device id of a ``evedge/v1/<device>/<kind>`` topic, else None."""
    parts = topic.split("/")
    if len(parts) == 4 and f"{parts[0]}/{parts[1]}" == ROOT and parts[2] != "channel":
        return parts[2]
    return None
