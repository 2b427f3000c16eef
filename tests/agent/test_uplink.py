"""The MQTT uplink against real brokers: mosquitto (plain, TLS, ACL) and amqtt (3.1.1 only)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import ssl
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from paho.mqtt.client import convert_connack_rc_to_reason_code
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from agent.backoff import Backoff
from agent.errors import ConfigError, UplinkError
from agent.keys import IdentityKey
from agent.mqtt_connection import classify_connack, classify_connect_error, classify_puback
from agent.options import Table
from agent.topics import channel_topic, status_topic
from agent.uplink import MqttConfig, Uplink
from hil.broker import AclRule, BrokerOptions, EmbeddedBroker, Mosquitto, make_pki

FAST = {"backoff_initial_s": 0.05, "backoff_max_s": 0.4, "connect_timeout_s": 3.0}


def config(url: str, client_id: str, **options) -> MqttConfig:
    return MqttConfig.from_url(url, client_id, **{**FAST, **options})


async def until(condition, timeout_s: float = 15.0) -> None:
    """Wait for a counter or state to reach a value (checked every 20 ms)."""
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.02)


async def next_message(up: Uplink, timeout_s: float = 5.0):
    return await asyncio.wait_for(anext(up.messages()), timeout_s)


# ----------------------------------------------------------------------------- sans-I/O parts


def test_backoff_grows_exponentially_with_jitter_up_to_the_cap_and_resets():
    backoff = Backoff(0.5, 8.0, random.Random(1))
    delays = [backoff.next() for _ in range(10)]
    ceilings = [min(8.0, 0.5 * 2 ** i) for i in range(10)]
    assert all(c / 2 <= d <= c for d, c in zip(delays, ceilings, strict=True))
    assert max(delays) <= 8.0 and delays[-1] >= 4.0
    assert len({round(d, 6) for d in delays[5:]}) > 1  # jitter: not all at the cap
    backoff.reset()
    assert backoff.next() <= 0.5


def test_config_from_table_and_its_errors(tmp_path):
    table = Table({"url": "mqtts://broker.example:8884", "ca_file": "/etc/ca.pem",
                   "cert_file": "/etc/c.pem", "key_file": "/etc/c.key", "window": 8},
                  "a.toml", "mqtt")
    cfg = MqttConfig.from_table(table, "dev-7")
    assert (cfg.host, cfg.port, cfg.tls, cfg.client_id, cfg.window) == \
        ("broker.example", 8884, True, "dev-7", 8)
    assert cfg.status_topic == status_topic("dev-7") == "evedge/v1/dev-7/status"
    with pytest.raises(ConfigError, match="mqtt.url"):
        MqttConfig.from_table(Table({"url": "http://x"}, "a.toml", "mqtt"), "d")
    with pytest.raises(ConfigError, match="mqtt.windw"):
        MqttConfig.from_table(Table({"url": "mqtt://x", "windw": 3}, "a.toml", "mqtt"), "d")
    with pytest.raises(ConfigError, match="mqtt.url"):  # a CA without TLS is a mistake
        MqttConfig.from_table(Table({"url": "mqtt://x", "ca_file": "c"}, "a.toml", "mqtt"), "d")
    secret = MqttConfig.from_url("mqtt://x", "d", password="hunter2")
    assert "hunter2" not in repr(secret)


def test_channel_topics_follow_the_scheme_and_refuse_wildcards():
    assert channel_topic("ab12", "ev") == "evedge/v1/channel/ab12/ev"
    for bad in ("", "a/b", "+", "#"):
        with pytest.raises(ValueError):
            channel_topic(bad, "cs")


def test_failures_are_classified_by_type_and_reason_code_not_by_text():
    verify = ssl.SSLCertVerificationError(1, "certificate verify failed")
    assert classify_connect_error(verify).reason == "tls-verify"
    assert classify_connect_error(ssl.SSLError(1, "alert")).reason == "tls-handshake"
    assert classify_connect_error(ConnectionRefusedError(111, "x")).reason == "unreachable"
    assert classify_connect_error(socket.gaierror(-2, "x")).reason == "unreachable"
    assert classify_connect_error(TimeoutError()).reason == "timeout"
    # The text says nothing: a plain OSError mentioning SSL is not a TLS failure.
    assert classify_connect_error(OSError(113, "SSL CERTIFICATE_VERIFY_FAILED")).reason \
        == "unreachable"
    with pytest.raises(ValueError):  # not a network failure: a bug, never hidden
        classify_connect_error(ValueError("x"))  # type: ignore[arg-type]

    def connack(value: int) -> ReasonCode:
        return ReasonCode(PacketTypes.CONNACK, identifier=value)

    assert classify_connack(connack(0x84)).reason == "protocol-version"
    for value in (0x86, 0x87, 0x8A, 0x8C):
        assert classify_connack(connack(value)).reason == "not-authorised"
    assert classify_connack(connack(0x80)).reason == "connect-refused"
    # A 3.1.1 broker's return codes, as paho hands them to on_connect (MQTT 5 codes).
    assert classify_connack(convert_connack_rc_to_reason_code(1)).reason == "protocol-version"
    assert classify_connack(convert_connack_rc_to_reason_code(5)).reason == "not-authorised"
    puback = ReasonCode(PacketTypes.PUBACK, identifier=0x87)
    assert classify_puback(puback, "t").reason == "not-authorised"
    assert classify_puback(ReasonCode(PacketTypes.PUBACK, identifier=0x80), "t").reason \
        == "publish-refused"


# ----------------------------------------------------------------------------- mosquitto


def test_publish_returns_on_puback_and_subscribers_get_it_in_order(mosquitto):
    async def main():
        async with Uplink(config(mosquitto.url, "cs-1")) as sub, \
                Uplink(config(mosquitto.url, "ev-1")) as pub:
            await asyncio.wait_for(sub.wait_connected(), 5)
            topic = channel_topic("c0ffee", "ev")
            await sub.subscribe(topic)
            await asyncio.wait_for(pub.wait_connected(), 5)
            await pub.publish(topic, b"first")
            futures = [pub.publish_nowait(topic, b"%d" % i) for i in range(200)]
            await asyncio.gather(*futures)
            got = [await next_message(sub) for _ in range(201)]
        assert [m.payload for m in got] == [b"first"] + [b"%d" % i for i in range(200)]
        assert {m.topic for m in got} == {topic}
        assert pub.counters["published"] == 201

    asyncio.run(main())


def test_two_uplinks_with_one_client_id_are_told(mosquitto, caplog):
    """mosquitto ends a taken-over session by closing the socket (no DISCONNECT 0x8E), so
    two agents with one identity kick each other off: the log says what that looks like."""
    async def main():
        async with Uplink(config(mosquitto.url, "ev-twin")) as one, \
                Uplink(config(mosquitto.url, "ev-twin")) as two:
            await until(lambda: one.counters["short_session_streaks"]
                        + two.counters["short_session_streaks"] > 0)

    with caplog.at_level("WARNING", logger="edge_agent.uplink"):
        asyncio.run(main())
    told = [r.getMessage() for r in caplog.records if "within 5 s" in r.getMessage()]
    assert told and "another client uses our client id 'ev-twin'" in told[0]


def test_exit_ends_the_uplink_even_when_a_cancel_is_swallowed(mosquitto):
    """Python 3.11's asyncio.wait_for (in code the uplink awaits) can swallow a cancel
    that arrives as its future completes (CPython gh-86296); the uplink then served on
    and ``async with Uplink`` never returned (seen as a CI hang). Here the swallow is made
    certain: the subscription that runs at connect time eats the cancel."""
    async def main():
        up = Uplink(config(mosquitto.url, "swallow"))
        subscribe = up._subscribe
        inside = asyncio.Event()

        async def swallowing(client, topic):
            inside.set()
            try:
                await asyncio.sleep(0.5)
            except asyncio.CancelledError:
                pass  # what wait_for does in the race
            await subscribe(client, topic)

        up._subscribe = swallowing
        await up.subscribe("t/swallow")  # not connected yet: subscribed at connect
        async with up:
            await up.wait_connected()
            await inside.wait()  # the uplink task is now inside `swallowing`
        return up.connected

    outcome: dict[str, object] = {}
    thread = threading.Thread(target=lambda: outcome.update(connected=asyncio.run(main())),
                              daemon=True)
    thread.start()
    thread.join(20)
    assert not thread.is_alive(), "async with Uplink did not return"
    assert outcome == {"connected": False}


def test_status_is_retained_online_then_offline_and_the_will_says_lost(mosquitto, tmp_path):
    async def main():
        watch = config(mosquitto.url, "watch")
        async with Uplink(config(mosquitto.url, "dev-s", status_topic=status_topic("dev-s"))):
            async with Uplink(watch) as w:
                await w.subscribe(status_topic("dev-s"))
                message = await next_message(w)
                assert json.loads(message.payload)["state"] == "online"
        async with Uplink(watch) as w:  # after a clean exit, the retained state is offline
            await w.subscribe(status_topic("dev-s"))
            assert json.loads((await next_message(w)).payload)["state"] == "offline"

        # An agent SIGKILLed: the broker publishes its will, retained.
        script = Path(__file__).with_name("telemetry_agent.py")
        proc = subprocess.Popen([sys.executable, str(script), "--url", mosquitto.url,
                                 "--spool", str(tmp_path / "s.sqlite"), "--device", "dev-k",
                                 "--seed", IdentityKey.generate().seed().hex()])
        try:
            async with Uplink(watch) as w:
                await w.subscribe(status_topic("dev-k"))
                states = []
                while "online" not in states:
                    states.append(json.loads((await next_message(w, 20)).payload)["state"])
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(10)
                assert json.loads((await next_message(w, 10)).payload)["state"] == "lost"
        finally:
            proc.kill()
            proc.wait(10)

    asyncio.run(main())


def test_publish_with_retry_survives_a_broker_restart(mosquitto):
    async def main():
        async with Uplink(config(mosquitto.url, "ev-r")) as up:
            await asyncio.wait_for(up.wait_connected(), 5)
            await asyncio.to_thread(mosquitto.kill)
            with pytest.raises(UplinkError) as info:
                up.publish_nowait("evedge/v1/x/event", b"now")
            assert info.value.reason == "disconnected"
            sending = asyncio.create_task(up.publish("evedge/v1/x/event", b"later"))
            await until(lambda: up.counters["error_unreachable"] >= 2)  # it tried, and waits
            assert not sending.done()
            await asyncio.to_thread(mosquitto.start)
            await asyncio.wait_for(sending, 10)
            assert up.epoch >= 2 and up.counters["reconnect_waits"] >= 1

    asyncio.run(main())


def test_half_open_connection_is_noticed_by_keepalive(mosquitto):
    async def main():
        async with Uplink(config(mosquitto.url, "ev-h", keepalive_s=1)) as up:
            await asyncio.wait_for(up.wait_connected(), 5)
            os.kill(mosquitto.pid, signal.SIGSTOP)  # the TCP connection stays open, silent
            try:
                pending = up.publish_nowait("evedge/v1/x/telemetry", b"x")
                with pytest.raises(UplinkError) as info:
                    await asyncio.wait_for(pending, 8)
                assert info.value.reason == "disconnected"
                assert not up.connected
            finally:
                os.kill(mosquitto.pid, signal.SIGCONT)
            await asyncio.wait_for(up.wait_connected(), 10)

    asyncio.run(main())


def test_tls_with_client_certificate(tls_mosquitto, pki):
    async def main():
        tls = {"ca_file": pki.ca, "cert_file": pki.clients["dev1"].cert,
               "key_file": pki.clients["dev1"].key}
        async with Uplink(config(tls_mosquitto.url, "dev1", **tls)) as up:
            await asyncio.wait_for(up.wait_connected(), 5)
            await up.subscribe("evedge/v1/dev1/event")
            await up.publish("evedge/v1/dev1/event", b"over tls")
            assert (await next_message(up)).payload == b"over tls"

    asyncio.run(main())


@pytest.mark.parametrize("case", ["wrong-ca", "wrong-client-cert", "no-client-cert"])
def test_tls_failures_are_clear_and_retried_with_backoff(tls_mosquitto, pki, tmp_path, case):
    rogue = make_pki(tmp_path / "rogue", ["dev1"], ca_name="rogue")
    tls = {"ca_file": pki.ca, "cert_file": pki.clients["dev1"].cert,
           "key_file": pki.clients["dev1"].key}
    if case == "wrong-ca":
        tls["ca_file"], expected = rogue.ca, "tls-verify"
    elif case == "wrong-client-cert":
        tls["cert_file"], tls["key_file"] = rogue.clients["dev1"].cert, rogue.clients["dev1"].key
        expected = "tls-handshake"
    else:
        del tls["cert_file"], tls["key_file"]
        expected = "tls-handshake"

    async def main():
        async with Uplink(config(tls_mosquitto.url, "dev1", protocol="5", **tls)) as up:
            await until(lambda: up.counters["reconnect_waits"] >= 3)
            assert not up.connected
            assert up.last_error is not None and up.last_error.reason == expected
            assert up.counters[f"error_{expected}"] >= 3

    asyncio.run(main())


def test_acl_denied_publish_raises_not_authorised_and_the_uplink_goes_on(broker_factory):
    broker = broker_factory(BrokerOptions(acl=(
        AclRule("ev-a", "readwrite", "evedge/v1/channel/c1/#"),)))

    async def main():
        async with Uplink(config(broker.url, "ev-a", username="ev-a", protocol="5")) as up:
            await asyncio.wait_for(up.wait_connected(), 5)
            await up.subscribe(channel_topic("c1", "cs"))
            # (mosquitto's acl_file grants a SUBSCRIBE and filters on delivery instead.)
            with pytest.raises(UplinkError) as info:
                await up.publish(channel_topic("c2", "ev"), b"PAY", retry=False)
            assert info.value.reason == "not-authorised"
            await asyncio.wait_for(up.wait_connected(), 5)  # it goes on
            await up.publish(channel_topic("c1", "cs"), b"OK")
            assert (await next_message(up)).payload == b"OK"

    asyncio.run(main())


# ----------------------------------------------------------------------------- amqtt


def test_falls_back_to_311_only_on_the_brokers_explicit_refusal_and_retries_5_after():
    """amqtt speaks 3.1.1 only. To an MQTT 5 CONNECT without properties it answers CONNACK
    return code 1 (3.1.1 s3.2.2.3: unacceptable protocol level): the explicit refusal."""
    broker = EmbeddedBroker().start()
    try:
        async def main():
            explicit = config(broker.url, "ev-311", connect_timeout_s=2.0, session_expiry_s=0)
            async with Uplink(explicit) as up:
                await asyncio.wait_for(up.wait_connected(), 15)
                assert up.protocol == 4 and up.downgraded
                assert up.counters["protocol_fallbacks"] == 1
                assert up.counters["error_protocol-version"] == 1
                await up.subscribe(channel_topic("c3", "cs"))
                await up.publish(channel_topic("c3", "cs"), b"hello")
                assert (await next_message(up)).payload == b"hello"
                # After a reconnect MQTT 5 is tried first again (and refused again).
                await asyncio.to_thread(broker.stop)
                await asyncio.to_thread(broker.start)
                await until(lambda: up.epoch >= 2 and up.connected)
                assert up.protocol == 4 and up.counters["protocol_fallbacks"] == 2
                assert up.counters["error_protocol-version"] == 2

            forbidden = config(broker.url, "ev-5", connect_timeout_s=2.0, session_expiry_s=0,
                               protocol="5")
            async with Uplink(forbidden) as up:
                await until(lambda: up.counters["error_protocol-version"] >= 2)
                assert not up.connected and up.counters["protocol_fallbacks"] == 0

        asyncio.run(main())
    finally:
        broker.stop()


def test_no_answer_before_connack_is_retried_on_mqtt_5_never_downgraded():
    """amqtt 0.12 misreads an MQTT 5 CONNECT with properties (our session expiry) and
    waits: no CONNACK. That is a timeout to retry, not a reason to speak 3.1.1."""
    broker = EmbeddedBroker().start()
    try:
        async def main():
            async with Uplink(config(broker.url, "ev-t", connect_timeout_s=0.5)) as up:
                await until(lambda: up.counters["error_timeout"] >= 2)
                assert not up.connected and up.counters["protocol_fallbacks"] == 0
            async with Uplink(config(broker.url, "ev-t", protocol="3.1.1")) as up:
                await asyncio.wait_for(up.wait_connected(), 15)  # configured: it works
                assert up.protocol == 4 and not up.downgraded

        asyncio.run(main())
    finally:
        broker.stop()


def test_broker_helper_stops_mosquitto_by_pid(tmp_path):
    broker = Mosquitto(tmp_path / "b").start()
    pid = broker.pid
    assert pid is not None and Path(f"/proc/{pid}").exists()
    broker.stop()
    assert broker.pid is None and not Path(f"/proc/{pid}").exists()
