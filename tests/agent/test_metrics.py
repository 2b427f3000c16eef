"""Prometheus endpoint: real HTTP requests over loopback; the exposition is checked with the
official parser (prometheus_client) as the peer."""

from __future__ import annotations

import asyncio
import http.client
import socket

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.errors import ConfigError
from agent.metrics import CONTENT_TYPE, MetricsConfig, MetricsServer, render_metrics
from agent.options import Table
from agent.status import (
    AgentStatus,
    ChannelStatus,
    ErrorRecord,
    SourceStatus,
    SpoolStatus,
    UplinkStatus,
)

S = 10**9


def snapshot(readings: int = 100) -> AgentStatus:
    return AgentStatus(
        device_id='cs-"7"\n', role="station", pid=1, state="running", started_ns=1700 * S,
        updated_ns=1800 * S, interval_s=2.0, version="0.1.0",
        sources=(SourceStatus("meter0", "modbus-tcp", "running", readings, 2.5,
                              {"timeout": 4, "crc": 1}, requests={"pids": 250}),),
        spool=SpoolStatus(3, 2048, 1 << 20, 77, None, 5),
        uplink=UplinkStatus("connected", "127.0.0.1:1883", None, 70, 2, 1),
        channels=(ChannelStatus("ab" * 32, "ev-1", "OPEN", 9, 1500, 450, 10),),
        errors=(ErrorRecord(1, "source[meter0]", "timeout", "x"),
                ErrorRecord(2, "source[meter0]", "timeout", "y")),
    )


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_exposition_parses_with_the_reference_parser() -> None:
    text = render_metrics(snapshot())
    assert text.endswith("\n")
    got = samples(text)
    assert got[("edge_agent_info", (("device", 'cs-"7"\n'), ("role", "station"),
                                    ("version", "0.1.0")))] == 1
    assert got[("edge_agent_source_readings_total", (("source", "meter0"),))] == 100
    assert got[("edge_agent_source_rate_hz", (("source", "meter0"),))] == 2.5
    assert got[("edge_agent_source_faults_total", (("reason", "timeout"), ("source", "meter0")))] == 4
    # Requests are work, not faults: their own counter, never among the faults.
    assert got[("edge_agent_source_requests_total", (("kind", "pids"), ("source", "meter0")))] == 250
    assert not [k for k in got if k[0] == "edge_agent_source_faults_total"
                and ("reason", "pids") in k[1]]
    assert got[("edge_agent_spool_envelopes", ())] == 3
    assert got[("edge_agent_spool_dropped_total", ())] == 5
    assert got[("edge_agent_next_seq", ())] == 77
    assert got[("edge_agent_uplink_connected", (("broker", "127.0.0.1:1883"),))] == 1
    assert got[("edge_agent_channel_paid", (("channel", "ab" * 32),
                                            ("direction", "station_to_vehicle")))] == 10
    assert got[("edge_agent_recent_errors", (("reason", "timeout"),
                                             ("where", "source[meter0]")))] == 2
    assert got[("edge_agent_start_time_seconds", ())] == 1700.0


def test_non_finite_rates_use_the_format_spelling() -> None:
    odd = AgentStatus("d", "vehicle", 1, "running", 0, 0, 2.0, sources=(
        SourceStatus("a", "dbc", "running", 0, float("nan")),
        SourceStatus("b", "dbc", "running", 0, float("inf"))))
    text = render_metrics(odd)
    assert 'edge_agent_source_rate_hz{source="a"} NaN' in text
    assert 'edge_agent_source_rate_hz{source="b"} +Inf' in text
    got = samples(text)
    assert got[("edge_agent_source_rate_hz", (("source", "b"),))] == float("inf")


def test_minimal_snapshot_renders() -> None:
    bare = AgentStatus("d", "vehicle", 1, "starting", 0, 0, 2.0)
    got = samples(render_metrics(bare))
    assert got[("edge_agent_running", ())] == 0
    assert not any(name.startswith("edge_agent_spool") for name, _ in got)


def _request(port: int, method: str, target: str) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, target)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def _raw(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_http_get_serves_the_live_counters() -> None:
    asyncio.run(_test_http_get_serves_the_live_counters())


async def _test_http_get_serves_the_live_counters() -> None:
    counter = {"readings": 100}
    async with MetricsServer(lambda: snapshot(counter["readings"]), port=0) as server:
        status, headers, body = await asyncio.to_thread(_request, server.port, "GET", "/metrics")
        assert status == 200 and headers["Content-Type"] == CONTENT_TYPE
        assert int(headers["Content-Length"]) == len(body)
        assert samples(body.decode())[("edge_agent_source_readings_total",
                                       (("source", "meter0"),))] == 100
        counter["readings"] = 250                    # the next scrape sees the new value
        _, _, body = await asyncio.to_thread(_request, server.port, "GET", "/metrics?x=1")
        assert b'edge_agent_source_readings_total{source="meter0"} 250' in body
        status, headers, body = await asyncio.to_thread(_request, server.port, "HEAD", "/metrics")
        assert status == 200 and body == b"" and int(headers["Content-Length"]) > 100
        assert (await asyncio.to_thread(_request, server.port, "GET", "/"))[0] == 404
        status, headers, _ = await asyncio.to_thread(_request, server.port, "POST", "/metrics")
        assert status == 405 and headers["Allow"] == "GET, HEAD"
        assert server.counters["200"] == 3


def test_hostile_clients_get_400_and_the_server_goes_on() -> None:
    asyncio.run(_test_hostile_clients_get_400_and_the_server_goes_on())


async def _test_hostile_clients_get_400_and_the_server_goes_on() -> None:
    async with MetricsServer(snapshot, port=0) as server:
        garbage = await asyncio.to_thread(_raw, server.port, b"\x00\xffnot http\r\n\r\n")
        assert garbage.startswith(b"HTTP/1.1 400 ")
        truncated = await asyncio.to_thread(_raw, server.port, b"GET /metrics HTTP/1.1\r\n")
        assert truncated.startswith(b"HTTP/1.1 400 ")
        huge = await asyncio.to_thread(_raw, server.port, b"GET /" + b"a" * 20000 + b" HTTP/1.1")
        assert huge.startswith(b"HTTP/1.1 400 ")
        assert server.counters["bad-request"] == 3
        status, _, _ = await asyncio.to_thread(_request, server.port, "GET", "/metrics")
        assert status == 200


def test_a_failing_snapshot_gives_500_not_a_dead_server(caplog) -> None:
    with caplog.at_level("ERROR", logger="edge_agent.metrics"):
        asyncio.run(_test_a_failing_snapshot_gives_500_not_a_dead_server())
    # the bug is logged with its traceback, not swallowed
    failed = [r for r in caplog.records if r.name == "edge_agent.metrics"]
    assert failed and failed[0].exc_info is not None
    assert "runtime bug" in caplog.text


async def _test_a_failing_snapshot_gives_500_not_a_dead_server() -> None:
    calls = {"n": 0}

    def flaky() -> AgentStatus:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("runtime bug")
        return snapshot()

    async with MetricsServer(flaky, port=0) as server:
        assert (await asyncio.to_thread(_request, server.port, "GET", "/metrics"))[0] == 500
        assert (await asyncio.to_thread(_request, server.port, "GET", "/metrics"))[0] == 200
        assert server.counters["render-failed"] == 1


def test_serve_runs_under_a_task_group_until_cancelled() -> None:
    asyncio.run(_test_serve_runs_under_a_task_group_until_cancelled())


async def _test_serve_runs_under_a_task_group_until_cancelled() -> None:
    server = MetricsServer(snapshot, port=0)
    task = asyncio.create_task(server.serve(), name="metrics")
    for _ in range(200):
        if server._server is not None:
            break
        await asyncio.sleep(0.01)
    status, _, _ = await asyncio.to_thread(_request, server.port, "GET", "/metrics")
    assert status == 200
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    with pytest.raises(ConnectionRefusedError):
        await asyncio.to_thread(_request, server.port, "GET", "/metrics")


def test_config_is_loopback_only() -> None:
    assert MetricsConfig.from_table(Table({}, "s.toml", "metrics")) == MetricsConfig()
    config = MetricsConfig.from_table(Table({"enabled": True, "host": "::1", "port": 9999},
                                            "s.toml", "metrics"))
    assert config == MetricsConfig(True, "::1", 9999)
    for bad in ({"host": "0.0.0.0"}, {"host": "192.168.1.5"}, {"host": "example.org"},
                {"port": 70000}, {"enabled": "yes"}, {"prot": 1}):
        with pytest.raises(ConfigError, match=r"s\.toml: metrics\."):
            MetricsConfig.from_table(Table(bad, "s.toml", "metrics"))
