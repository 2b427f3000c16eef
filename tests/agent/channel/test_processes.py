"""Charging sessions between two ``edge-agent run`` OS processes (issue 13's end-to-end
tests): the station reads the plant's meter (``modbus-tcp``) and drives its wallbox
(``modbus-evse``), the car counts its own energy from its battery's CAN frames (``dbc``);
mosquitto; anvil as the settlement node; the driver's ``edge-agent charge``. Balances are
read on chain and checked against the signed tariff. kill -9 is SIGKILL of the agent's
process: nothing is flushed or closed. Marked ``anvil`` (fails, never skips, without it)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.agent.channel.procs import MINTED, PRICE, Chain, Site2, free_port
from tests.agent.settlement.conftest import ANVIL_HINT, find_anvil

pytestmark = pytest.mark.anvil


@pytest.fixture(scope="module")
def chain() -> Iterator[Chain]:
    """anvil on a free loopback port with the contracts deployed (one per module; every
    test has its own device keys, so their balances are apart)."""
    import subprocess
    import time

    import requests

    binary = find_anvil()
    if binary is None:
        pytest.fail(ANVIL_HINT)
    port = free_port()
    proc = subprocess.Popen([binary, "--host", "127.0.0.1", "--port", str(port), "--silent",
                             "--accounts", "1"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                requests.post(url, json={"jsonrpc": "2.0", "id": 1, "method": "eth_chainId",
                                         "params": []}, timeout=1).raise_for_status()
                break
            except requests.RequestException:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("anvil did not start")
                time.sleep(0.05)
        yield Chain.deploy(url)
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def make_site(chain: Chain, mosquitto, tmp_path: Path) -> Iterator:  # type: ignore[no-untyped-def]
    made: list[Site2] = []

    def make(**options: object) -> Site2:
        site = Site2(tmp_path, mosquitto.url, chain, **options)  # type: ignore[arg-type]
        made.append(site)
        return site

    yield make
    for site in made:
        site.close()


def started(site: Site2) -> str:
    result = site.charge("start", "--station", "cs-1", "--connector", "1")
    answer = json.loads(result.stdout)
    assert result.returncode == 0 and answer["ok"], (result.stdout, result.stderr)
    return str(answer["channel"])


def check_paid(site: Site2, chain: Chain) -> dict[str, object]:
    """One session, the same final state on both sides, paid at the tariff, and on chain
    the station holds exactly what was paid (nothing twice), the car the rest."""
    (cs,), (ev,) = site.sessions("cs"), site.sessions("ev")
    assert cs["channel_id"] == ev["channel_id"]
    assert (cs["nonce"], cs["t_ev"]) == (ev["nonce"], ev["t_ev"])
    assert cs["t_ev"] == cs["energy_wh"] * PRICE // 1000 > 0
    assert chain.balance(site.cs_keys) == cs["t_ev"]
    assert chain.balance(site.ev_keys) == MINTED - cs["t_ev"]
    return cs


def test_a_whole_session_between_two_agent_processes(make_site, chain: Chain) -> None:
    site = make_site()
    site.start()
    channel = started(site)
    site.energy_at_least(20)
    stopped = site.charge("stop")
    assert stopped.returncode == 0, stopped.stdout
    site.settled("cs", "ev")
    cs = check_paid(site, chain)
    assert cs["channel_id"] == channel and cs["end_reason"] == "vehicle-stop"
    (ev,) = site.sessions("ev")
    assert ev["end_reason"] == "driver-stop"
    # the plant: the wallbox was switched off, and the car's own count saw the energy
    state = site.plant.state()
    assert state["ac_power_w"] == 0 and state["state"] == "B"
    assert state["car_charged_wh"] > 0.9 * (state["meter_import_wh"] - 1_000_000)
