"""The asyncio session over a real mosquitto (tests/conftest.py starts it on loopback)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent.channel.mux import Route, serving
from agent.channel.protocol import Phase
from agent.channel.session import run_station, run_vehicle
from agent.channel.state import ChannelState, check_state_signature
from agent.channel.store import ChannelStore
from agent.errors import ChannelError
from agent.keys import IdentityKey, SettlementKey
from agent.uplink import MqttConfig, Uplink
from tests.agent.channel.harness import CHAIN_ID, CONTRACT, Setup

ROOT = Path(__file__).resolve().parents[3]


@contextlib.asynccontextmanager
async def uplink(port: int, name: str) -> AsyncIterator[Route]:
    """One side's transport: its own uplink, and a mux routing the channel's inbox."""
    async with Uplink(MqttConfig(host="127.0.0.1", port=port, client_id=name)) as up, \
            serving(up) as mux:
        yield mux.transport()


async def _session(port: int, tmp: Path, *, vehicle_stops: bool) -> tuple:
    # Tolerance above the credit window: the estimate task may lag by up to a window of
    # energy on a loaded machine, which is not a disagreement.
    setup = Setup(credit_window_wh=50, tolerance_wh=100)
    cs, ev = setup.station(), setup.vehicle()
    delivering = asyncio.Event()
    stop = asyncio.Event()
    delivered = [0]

    def charger(allowed: bool) -> None:
        delivering.set() if allowed else delivering.clear()

    async def meter():  # type: ignore[no-untyped-def]
        wh = 2_000_000
        yield wh, 0
        for _ in range(200):
            await delivering.wait()
            wh += 5
            delivered[0] += 5
            yield wh, 0
        if vehicle_stops:
            stop.set()
            await asyncio.Event().wait()  # the vehicle's CLOSE request ends the session

    async def estimate():  # type: ignore[no-untyped-def]
        while True:  # the car's own view: what was delivered, a little behind
            yield max(0, delivered[0] - 5)
            await asyncio.sleep(0.002)

    funded_with: list = []

    async def fund(params):  # type: ignore[no-untyped-def]  # the settlement step
        funded_with.append(params)
        await asyncio.sleep(0.01)
        return b"\xab" * 32  # e.g. the deposit transaction's hash

    with ChannelStore(tmp / "cs") as cs_store, ChannelStore(tmp / "ev") as ev_store:
        async with uplink(port, "t-cs") as cs_up, uplink(port, "t-ev") as ev_up:
            cs_closed, ev_closed = await asyncio.wait_for(asyncio.gather(
                run_station(cs_up, cs, cs_store, meter(), charger=charger, linger_s=0.1),
                run_vehicle(ev_up, ev, ev_store, estimate=estimate(), stop=stop,
                            fund=fund)), 60)
    assert funded_with == [cs.params] and cs.funding_ref == b"\xab" * 32
    return cs_closed, ev_closed, setup, cs, ev


@pytest.mark.parametrize("vehicle_stops", [False, True])
def test_session_over_mosquitto(mosquitto, tmp_path: Path, vehicle_stops: bool) -> None:
    cs_closed, ev_closed, setup, cs, ev = asyncio.run(
        _session(mosquitto.port, tmp_path, vehicle_stops=vehicle_stops))
    assert cs_closed == ev_closed and cs_closed.state.final
    assert cs_closed.state.wh == 1000 and cs_closed.state.t_ev == 1000 * 300 // 1000
    check_state_signature(cs_closed.state, cs_closed.sig_ev, setup.ev_key.address)
    check_state_signature(cs_closed.state, cs_closed.sig_cs, setup.cs_key.address)
    assert cs.phase is ev.phase is Phase.CLOSED
    assert not cs.counters and not ev.counters  # nothing rejected on a clean run
    # The stores alone rebuild the closed channel.
    restored = setup.vehicle(ChannelStore(tmp_path / "ev").records())
    assert restored.phase is Phase.CLOSED and restored.cosigned.state == cs_closed.state


# ------------------------------------------------------------------------ end to end


def _spawn(config: dict, path: Path) -> subprocess.Popen[bytes]:
    path.write_text(json.dumps(config))
    os.chmod(path, 0o600)
    log = (path.with_suffix(".log")).open("wb")
    return subprocess.Popen([sys.executable, "-m", "tests.agent.channel.peer", str(path)],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(5)


def _configs(port: int, tmp_path: Path, price: int) -> tuple[dict, dict, SettlementKey,
                                                              SettlementKey]:
    ev_id, cs_id = IdentityKey.generate(), IdentityKey.generate()
    ev_key, cs_key = SettlementKey.generate(), SettlementKey.generate()
    common = dict(port=port, chain_id=CHAIN_ID, contract=CONTRACT.hex(),
                  salt=os.urandom(32).hex(), price_per_kwh=price, export_price_per_kwh=0,
                  deposit_ev=20_000, deposit_cs=1_000, credit_window_wh=100, pay_step_wh=10)
    station_cfg = common | dict(
        role="cs", identity_seed=cs_id.seed().hex(), settlement_secret=cs_key.secret().hex(),
        peer_identity=ev_id.public.hex(), peer_address=ev_key.address.hex(),
        store=str(tmp_path / "cs.store"), result=str(tmp_path / "cs.json"), target_wh=30_000)
    vehicle_cfg = common | dict(
        role="ev", identity_seed=ev_id.seed().hex(), settlement_secret=ev_key.secret().hex(),
        peer_identity=cs_id.public.hex(), peer_address=cs_key.address.hex(),
        store=str(tmp_path / "ev.store"), result=str(tmp_path / "ev.json"))
    return station_cfg, vehicle_cfg, ev_key, cs_key


def _check_exact_close(tmp_path: Path, procs: list, price: int, ev_key: SettlementKey,
                       cs_key: SettlementKey) -> tuple[dict, dict, ChannelState]:
    logs = {n: (tmp_path / f"{n}.log").read_text(errors="replace")[-3000:] for n in ("cs", "ev")}
    assert [p.returncode for p in procs] == [0] * len(procs), logs
    cs = json.loads((tmp_path / "cs.json").read_text())
    ev = json.loads((tmp_path / "ev.json").read_text())
    assert cs["state"] == ev["state"] and cs["sig_ev"] == ev["sig_ev"]
    assert cs["sig_cs"] == ev["sig_cs"]
    state = ChannelState.decode(bytes.fromhex(cs["state"]))
    assert state.final and state.wh == 30_000 == cs["meter_delta_wh"]
    assert state.t_ev == 30_000 * price // 1000 and state.t_cs == 0
    balances = (20_000 - state.t_ev + state.t_cs, 1_000 + state.t_ev - state.t_cs)
    assert balances == (20_000 - state.t_ev, 1_000 + state.t_ev)
    check_state_signature(state, bytes.fromhex(cs["sig_ev"]), ev_key.address)
    check_state_signature(state, bytes.fromhex(cs["sig_cs"]), cs_key.address)
    return cs, ev, state


def _wait(procs: list, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    for proc in procs:
        proc.wait(max(1.0, deadline - time.monotonic()))


def test_end_to_end_30_kwh_separate_processes(mosquitto, tmp_path: Path) -> None:
    """Vehicle and station agents in separate processes over mosquitto charge 30 kWh in
    10 Wh pay steps metered by the simulated meter over Modbus TCP; the final co-signed
    state pays tariff x metered energy exactly: t_ev = wh * price_per_kwh // 1000."""
    price = 317
    station_cfg, vehicle_cfg, ev_key, cs_key = _configs(mosquitto.port, tmp_path, price)
    procs = [_spawn(vehicle_cfg, tmp_path / "ev.cfg"), _spawn(station_cfg, tmp_path / "cs.cfg")]
    try:
        _wait(procs, 150)
    finally:
        for proc in procs:
            _stop(proc)
    cs, ev, state = _check_exact_close(tmp_path, procs, price, ev_key, cs_key)
    assert state.t_ev == 9510
    assert cs["counters"] == {} and ev["counters"] == {}
    assert ev["resumed_at_nonce"] is None
    assert state.nonce > 30  # paid as it went, not in one lump at the end


def test_end_to_end_vehicle_killed_and_restarted(mosquitto, tmp_path: Path) -> None:
    """SIGKILL the vehicle process mid-charge and start it again: it resumes from its store
    (REESTABLISH, resend of its last signed state), the station held delivery within the
    credit window meanwhile, and the close is still exact."""
    price = 250
    station_cfg, vehicle_cfg, ev_key, cs_key = _configs(mosquitto.port, tmp_path, price)
    vehicle = _spawn(vehicle_cfg, tmp_path / "ev.cfg")
    station = _spawn(station_cfg, tmp_path / "cs.cfg")
    procs = [vehicle, station]
    try:
        store = tmp_path / "ev.store"
        deadline = time.monotonic() + 60
        while not (store.exists() and store.stat().st_size > 40_000):
            assert time.monotonic() < deadline and station.poll() is None
            time.sleep(0.01)
        os.kill(vehicle.pid, signal.SIGKILL)
        vehicle.wait(5)
        killed_at = store.stat().st_size
        time.sleep(0.5)
        restarted = _spawn(vehicle_cfg, tmp_path / "ev.cfg")
        procs = [restarted, station]
        _wait(procs, 150)
    finally:
        for proc in [vehicle, *procs]:
            _stop(proc)
    assert killed_at < 1_000_000  # it really was killed mid-session
    cs, ev, state = _check_exact_close(tmp_path, procs, price, ev_key, cs_key)
    assert state.t_ev == 7500
    assert ev["resumed_at_nonce"] is not None and 0 < ev["resumed_at_nonce"] < state.nonce


async def _abandoned(port: int, tmp: Path) -> tuple:
    setup = Setup(credit_window_wh=50)
    cs, ev = setup.station(), setup.vehicle()
    delivering = asyncio.Event()

    def charger(allowed: bool) -> None:
        delivering.set() if allowed else delivering.clear()

    async def meter():  # type: ignore[no-untyped-def]
        wh = 3_000_000
        yield wh, 0
        while True:
            try:  # the car stopped paying: the driver unplugs after a moment
                await asyncio.wait_for(delivering.wait(), 0.5)
            except TimeoutError:
                return
            wh += 5
            yield wh, 0

    with ChannelStore(tmp / "cs") as cs_store, ChannelStore(tmp / "ev") as ev_store:
        async with uplink(port, "a-cs") as cs_up, uplink(port, "a-ev") as ev_up:
            vehicle = asyncio.create_task(run_vehicle(ev_up, ev, ev_store))
            station = asyncio.create_task(run_station(cs_up, cs, cs_store, meter(),
                                                      charger=charger, close_timeout_s=0.5))
            while ev.nonce < 5:
                await asyncio.sleep(0.005)
            vehicle.cancel()  # the vehicle's agent dies and never comes back
            with pytest.raises(Exception) as info:
                await asyncio.wait_for(station, 30)
            with contextlib.suppress(asyncio.CancelledError):
                await vehicle
    return info.value, cs, ev


def test_station_gives_up_on_a_vanished_vehicle(mosquitto, tmp_path: Path) -> None:
    error, cs, ev = asyncio.run(_abandoned(mosquitto.port, tmp_path))
    assert isinstance(error, ChannelError) and error.reason == "close-timeout"
    assert cs.phase is Phase.CLOSING and cs.cosigned is not None
    # What the station holds is a valid co-signed state to settle unilaterally.
    assert error.nonce == cs.nonce >= ev.nonce >= 5
    check_state_signature(cs.cosigned.state, cs.cosigned.sig_ev, cs.peer.address)
    assert cs.unpaid_wh <= 50  # delivery stopped at the credit window


# ------------------------------------------------------------------------ funding check


async def _unfunded(port: int, tmp: Path) -> tuple[ChannelError, list[bool], list]:
    setup = Setup(credit_window_wh=50)
    cs, ev = setup.station(), setup.vehicle()
    switched: list[bool] = []
    checked: list = []

    async def meter():  # type: ignore[no-untyped-def]
        wh = 1_000_000
        while True:
            yield wh, 0
            wh += 5
            await asyncio.sleep(0.005)

    async def lying_fund(params):  # type: ignore[no-untyped-def]
        return b"\x00" * 32  # says FUNDED, deposited nothing

    async def ledger_says_no(params, reference):  # type: ignore[no-untyped-def]
        checked.append((params, reference))
        from agent.errors import SettlementError
        raise SettlementError("channel is unknown on the ledger", reason="not-funded")

    with ChannelStore(tmp / "cs") as cs_store, ChannelStore(tmp / "ev") as ev_store:
        async with uplink(port, "f-cs") as cs_up, uplink(port, "f-ev") as ev_up:
            vehicle = asyncio.create_task(run_vehicle(ev_up, ev, ev_store, fund=lying_fund))
            try:
                with pytest.raises(ChannelError) as info:
                    await asyncio.wait_for(run_station(
                        cs_up, cs, cs_store, meter(), charger=switched.append,
                        check_funding=ledger_says_no, linger_s=0.1), 30)
            finally:
                vehicle.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await vehicle
    return info.value, switched, checked


def test_station_stops_when_the_ledger_does_not_show_the_funding(mosquitto,
                                                                  tmp_path: Path) -> None:
    error, switched, checked = asyncio.run(_unfunded(mosquitto.port, tmp_path))
    assert error.reason == "funding-not-verified"
    assert checked and checked[0][1] == b"\x00" * 32
    assert switched and switched[-1] is False  # the charger was told to stop
