"""verify_mqtt (``edge-agent verify --mqtt URL``) against a real mosquitto."""

import asyncio

from agent.envelope import Sealer
from agent.fleet_keys import FleetRegistry
from agent.keys import IdentityKey, SettlementKey, provisioning_record
from agent.live_verify import verify_mqtt
from agent.readings import Reading
from agent.topics import event_topic, telemetry_topic
from agent.uplink import MqttConfig, Uplink

KEY = IdentityKey(bytes(range(32)))


def registry() -> FleetRegistry:
    reg = FleetRegistry()
    reg.add_record(provisioning_record("dev-a", KEY, SettlementKey.generate(), 1))
    return reg


async def run(url: str, messages: list[bytes], **options):
    subscribed = asyncio.Event()
    verifying = asyncio.create_task(verify_mqtt(url, registry(), subscribed=subscribed,
                                                **options))
    async with Uplink(MqttConfig.from_url(url, "dev-a")) as up:
        await asyncio.wait_for(up.wait_connected(), 5)
        await asyncio.wait_for(subscribed.wait(), 10)  # its SUBACKs (no persistent session)
        for data in messages:
            await up.publish(telemetry_topic("dev-a"), data)
        await up.publish(event_topic("dev-a"), b"garbage, not an envelope")
    return await asyncio.wait_for(verifying, 20)


def stream(n: int) -> list[bytes]:
    sealer = Sealer(KEY, "dev-a", bytes(16))
    return [sealer.seal_readings([Reading("Vehicle.Speed", i, "km/h", i + 1)]).data
            for i in range(n)]


def test_verify_mqtt_reports_duplicates_gaps_and_garbage(mosquitto):
    data = stream(10)
    sent = data[:3] + [data[2]] + data[5:]  # seq 2 twice (redelivery), 3..4 missing
    report = asyncio.run(run(mosquitto.url, sent, idle_s=1.0, timeout_s=15))
    device = report.devices["dev-a"]
    assert (device.envelopes, device.duplicates, device.gaps) == (8, 1, 2)
    assert device.gap_ranges == [(3, 4)]
    assert report.failures["malformed-cbor"] == 1
    assert not report.ok


def test_verify_mqtt_stops_after_n_envelopes_and_a_clean_stream_is_ok(mosquitto):
    report = asyncio.run(run(mosquitto.url, stream(5), envelopes=5, idle_s=None,
                             timeout_s=15))
    assert report.ok and report.envelopes == 5
