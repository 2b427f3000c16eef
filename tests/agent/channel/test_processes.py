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

from tests.agent.channel.procs import MINTED, PRICE, Chain, Site2
from tests.agent.settlement.conftest import running_anvil

pytestmark = pytest.mark.anvil


@pytest.fixture(scope="module")
def chain() -> Iterator[Chain]:
    """anvil on a free loopback port with the contracts deployed (one per module; every
    test has its own device keys, so their balances are apart)."""
    with running_anvil() as url:
        yield Chain.deploy(url)


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


def test_station_killed_mid_session_resumes_and_settles_once(make_site, chain: Chain) -> None:
    site = make_site()
    site.start()
    channel = started(site)
    site.energy_at_least(10)
    site.station.kill9()
    before = site.session("ev")
    site.station.start()                     # the same config and state directory
    site.wait_serving(site.station)
    site.energy_at_least(before["energy_wh"] + 10)   # it metered and was paid on
    assert site.charge("stop").returncode == 0
    site.settled("cs", "ev")
    cs = check_paid(site, chain)
    assert cs["channel_id"] == channel and cs["nonce"] > before["nonce"]


def test_vehicle_killed_mid_session_resumes_and_settles_once(make_site, chain: Chain) -> None:
    site = make_site()
    site.start()
    channel = started(site)
    site.energy_at_least(10, "ev")
    site.vehicle.kill9()
    before = site.session("cs")
    site.vehicle.start()
    site.wait_serving(site.vehicle)
    site.energy_at_least(before["energy_wh"] + 10, "ev")
    stopped = site.charge("stop")                  # the new process's control socket
    assert stopped.returncode == 0, stopped.stdout
    site.settled("cs", "ev")
    cs = check_paid(site, chain)
    assert cs["channel_id"] == channel and cs["nonce"] > before["nonce"]


def test_station_killed_as_the_cooperative_close_goes_out_settles_once(make_site, chain: Chain
                                                                      ) -> None:
    """kill -9 of the station as soon as it knows the session ended (its settlement job
    is being written or its cooperative close is on its way): restarted, the job goes on
    from what the ledger says, and the channel is settled once."""
    site = make_site()
    site.start()
    started(site)
    site.energy_at_least(10)
    assert site.charge("stop").returncode == 0
    site.until(lambda: any(s["end_reason"] for s in site.sessions("cs")), 30,
               "the station's session ended")
    site.station.kill9()
    site.station.start()
    site.wait_serving(site.station)
    site.settled("cs", "ev")
    check_paid(site, chain)


def test_station_killed_while_settling_resumes_the_unilateral_close(make_site, chain: Chain
                                                                    ) -> None:
    """The car is gone for good (kill -9): the station stops delivery at the credit window,
    closes on chain with the latest co-signed state and waits out the dispute window; it is
    killed while waiting, restarted, and settles once the window is over."""
    site = make_site(station_channel={"stall_timeout_s": 1.0})
    site.start()
    started(site)
    site.energy_at_least(10)
    site.vehicle.kill9()
    site.settlement("cs", "closing")               # the unilateral close is on chain
    site.station.kill9()
    site.station.start()
    site.wait_serving(site.station)
    chain.pass_time(3601)                          # past the dispute window (chain time)
    site.settled("cs")
    cs = site.session("cs")
    assert cs["end_reason"] == "credit-window"
    assert cs["t_ev"] == cs["energy_wh"] * PRICE // 1000 > 0
    assert chain.balance(site.cs_keys) == cs["t_ev"]
    assert chain.balance(site.ev_keys) == MINTED - cs["t_ev"]


def test_vehicle_killed_while_settling_resumes_the_unilateral_close(make_site, chain: Chain
                                                                    ) -> None:
    """The station is gone (kill -9): the driver stops, the car closes on chain with its
    latest co-signed state; it is killed while waiting out the dispute window, restarted,
    and settles."""
    site = make_site()
    site.start()
    started(site)
    site.energy_at_least(10, "ev")
    site.station.kill9()
    assert site.charge("stop").returncode == 0
    site.settlement("ev", "closing")
    site.vehicle.kill9()
    site.vehicle.start()
    site.wait_serving(site.vehicle)
    chain.pass_time(3601)
    site.settled("ev")
    ev = site.session("ev")
    assert ev["t_ev"] == ev["energy_wh"] * PRICE // 1000 > 0
    assert chain.balance(site.cs_keys) == ev["t_ev"]
    assert chain.balance(site.ev_keys) == MINTED - ev["t_ev"]


def test_cable_pulled_mid_session_ends_and_settles(make_site, chain: Chain) -> None:
    site = make_site()
    site.start()
    started(site)
    site.energy_at_least(10)
    assert site.plant.command("unplug 1")["state"]["1"]["state"] == "A"
    site.settled("cs", "ev")
    cs = check_paid(site, chain)
    assert cs["end_reason"] == "cable-pulled"
    assert site.session("ev")["end_reason"] == "station-close"


def test_a_price_limit_below_the_tariff_is_refused_and_nothing_opens(make_site, chain: Chain
                                                                    ) -> None:
    site = make_site()
    site.start()
    result = site.charge("start", "--station", "cs-1", "--connector", "1",
                         "--max-price", str(PRICE - 1))
    answer = json.loads(result.stdout)
    assert result.returncode == 1 and answer["reason"] == "price-above-limit", answer
    assert site.sessions("cs") == [] and site.sessions("ev") == []
    assert chain.balance(site.ev_keys) == MINTED     # no deposit left the car
    assert site.plant.state()["ac_power_w"] == 0
