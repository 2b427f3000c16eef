"""A charging site of OS processes, as on a real rig: the plant (``python -m hil.sim.plant``:
kWh meter and wallbox on Modbus TCP, the car's battery on a udp_multicast CAN bus), two
``edge-agent run`` processes (station: ``modbus-tcp`` meter + ``modbus-evse`` wallbox;
vehicle: its own battery signals through ``dbc``), mosquitto, and anvil as the JSON-RPC node.
The driver is ``edge-agent charge start|stop`` (its own process, through the vehicle's
control socket). Everything runs in real time (``time_scale = 1``) at 22 kW, with small pay
steps so that a session of a few dozen payments takes seconds.

Readiness is read from what the agents publish about themselves (their status files, the
control socket), never from sleeps. Every process is stopped by its pid in ``close()``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w
from web3 import Web3

from agent.fleet_keys import FleetRegistry
from agent.keys import DeviceKeys, KeyStore, SettlementKey
from agent.settlement.chain import Deployment, advance_time, deploy_contracts, mint
from agent.settlement.client import SettlementClient
from agent.settlement.rpc import connect
from hil.session.site import CHARGER_ID, METER_ID, Site, multicast_bus

ROOT = Path(__file__).resolve().parents[3]
EDGE_AGENT = str(Path(sys.executable).with_name("edge-agent"))
PRICE = 300_000            # per kWh, the token's smallest unit
DEPOSIT = 5_000_000
MINTED = 4 * DEPOSIT
ETHER = 10**18


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("0.0.0.0", 0))
        return int(sock.getsockname()[1])


@dataclass
class Chain:
    """anvil with the token and channel contract deployed once per test module."""

    url: str
    w3: Web3
    deployer: SettlementKey
    deployment: Deployment

    @classmethod
    def deploy(cls, url: str) -> Chain:
        w3 = connect(url)
        deployer = SettlementKey.generate()
        fund_ether(w3, deployer.address)
        return cls(url, w3, deployer, deploy_contracts(w3, deployer, min_window_s=1))

    def balance(self, keys: DeviceKeys) -> int:
        client = SettlementClient(self.url, self.deployment.channel, keys.settlement,
                                  from_block=self.deployment.block)
        return client.balance(keys.settlement.address)

    def pass_time(self, seconds: int) -> None:
        advance_time(self.w3, seconds)   # evm_increaseTime + evm_mine


def fund_ether(w3: Web3, address: bytes) -> None:
    w3.provider.make_request("anvil_setBalance",  # type: ignore[arg-type]
                             [Web3.to_checksum_address(address), hex(10 * ETHER)])


@dataclass
class Proc:
    name: str
    argv: list[str]
    log: Path
    popen: subprocess.Popen[bytes] | None = None
    starts: int = 0
    started_ns: int = 0

    def start(self) -> Proc:
        self.starts += 1
        self.started_ns = time.time_ns()
        out = self.log.open("ab")
        self.popen = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT,
                                      cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        out.close()
        return self

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def kill9(self) -> None:
        """SIGKILL: no clean-up of any kind, as a power cut."""
        assert self.popen is not None
        os.kill(self.popen.pid, signal.SIGKILL)
        self.popen.wait(10)

    def stop(self) -> None:
        if self.popen is None or self.popen.poll() is not None:
            return
        self.popen.terminate()
        try:
            self.popen.wait(20)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(10)

    def tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return f"--- {self.name} ---\n" + "\n".join(text.splitlines()[-lines:])


class Plant:
    """``python -m hil.sim.plant`` with its stdin as the rig's hands on the cable."""

    def __init__(self, site: Site, tmp: Path) -> None:
        config = tmp / "plant.toml"
        config.write_bytes(tomli_w.dumps(site.plant_toml()).encode())
        self.popen = subprocess.Popen([sys.executable, "-m", "hil.sim.plant", "--config",
                                       str(config)], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, cwd=ROOT)
        assert self.popen.stdout is not None
        ready = json.loads(self.popen.stdout.readline() or b"{}")
        if not ready.get("ready"):
            self.close()
            raise RuntimeError(f"plant did not start: {ready}")
        self.ports: dict[str, int] = {"meter": ready["meter"], "wallbox": ready["wallbox"]}

    def command(self, line: str) -> dict[str, Any]:
        assert self.popen.stdin is not None and self.popen.stdout is not None
        self.popen.stdin.write(line.encode() + b"\n")
        self.popen.stdin.flush()
        answer: dict[str, Any] = json.loads(self.popen.stdout.readline())
        assert answer.get("ok"), answer
        return answer

    def state(self) -> dict[str, Any]:
        state: dict[str, Any] = self.command("state")["state"]["1"]
        return state

    def close(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)


@dataclass
class Site2:
    """Two agents, one plant, one broker, one chain (see the module docstring)."""

    tmp: Path
    broker_url: str
    chain: Chain
    station_channel: dict[str, Any] = field(default_factory=dict)
    vehicle_channel: dict[str, Any] = field(default_factory=dict)
    station_settlement: dict[str, Any] = field(default_factory=dict)
    vehicle_settlement: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.site = Site(time_scale=1.0, obc_max_current_a=32.0,
                         bus=multicast_bus(free_udp_port()))
        registry = FleetRegistry()
        self.cs_keys, record = KeyStore(self.tmp / "cs").init("cs-1")
        registry.add_record(record)
        self.ev_keys, record = KeyStore(self.tmp / "ev").init("ev-1")
        registry.add_record(record)
        registry.save(self.tmp / "fleet.toml")
        chain = self.chain
        for keys in (self.cs_keys, self.ev_keys):
            fund_ether(chain.w3, keys.settlement.address)
        mint(chain.w3, chain.deployer, chain.deployment.token, self.ev_keys.settlement.address,
             MINTED)
        self.plant = Plant(self.site, self.tmp)
        self.station = Proc("station", [EDGE_AGENT, "run", "--config",
                                        str(self._station_config())], self.tmp / "station.log")
        self.vehicle = Proc("vehicle", [EDGE_AGENT, "run", "--config",
                                        str(self._vehicle_config())], self.tmp / "vehicle.log")

    # -- configs, as a user writes them -------------------------------------------------
    def _common(self, name: str, device: str, role: str) -> dict[str, Any]:
        return {
            "device": {"id": device, "role": role, "state_dir": str(self.tmp / name)},
            "mqtt": {"url": self.broker_url, "backoff_initial_s": 0.1, "backoff_max_s": 1.0},
            "batch": {"max_readings": 50, "max_age_ms": 200},
            "status": {"path": str(self.tmp / name / "status.json"), "interval_s": 0.2},
        }

    def _settlement(self, extra: dict[str, Any]) -> dict[str, Any]:
        d = self.chain.deployment
        return {"node": self.chain.url, "contract": "0x" + d.channel.hex(),
                "from_block": d.block, "poll_s": 0.2, "coop_grace_s": 2.0, **extra}

    def _station_config(self) -> Path:
        data = self._common("cs", "cs-1", "station")
        data["sources"] = [self.site.meter_source(self.plant.ports["meter"])]
        data["chargers"] = [self.site.charger(self.plant.ports["wallbox"])]
        data["channel"] = {
            "policy": "registry", "registry": str(self.tmp / "fleet.toml"),
            "price_per_kwh": PRICE, "deposit_ev": DEPOSIT, "dispute_window_s": 3600,
            "credit_window_wh": 20, "pay_step_wh": 2, "close_timeout_s": 2.0,
            "funding_timeout_s": 20.0, "offer_interval_s": 5.0, "stall_timeout_s": 30.0,
            "connectors": [{"id": 1, "charger": CHARGER_ID, "meter": METER_ID,
                            "max_current_a": 32.0}],
            **self.station_channel}
        data["settlement"] = self._settlement(self.station_settlement)
        return write_toml(self.tmp / "station.toml", data)

    def _vehicle_config(self) -> Path:
        data = self._common("ev", "ev-1", "vehicle")
        data["sources"] = [self.site.car_source()]
        data["channel"] = {
            "max_price_per_kwh": 400_000, "max_deposit_ev": DEPOSIT,
            "registry": str(self.tmp / "fleet.toml"), "close_timeout_s": 2.0,
            "answer_timeout_s": 5.0, "energy": self.site.energy(), **self.vehicle_channel}
        data["settlement"] = self._settlement(self.vehicle_settlement)
        return write_toml(self.tmp / "vehicle.toml", data)

    # -- running -----------------------------------------------------------------------
    def start(self) -> None:
        self.station.start()
        self.vehicle.start()
        self.wait_serving(self.station)
        self.wait_serving(self.vehicle)

    def status(self, name: str) -> dict[str, Any]:
        path = self.tmp / name / "status.json"
        try:
            data: dict[str, Any] = json.loads(path.read_text())
        except (OSError, ValueError):
            return {}
        return data

    def wait_serving(self, proc: Proc, timeout_s: float = 60.0) -> None:
        """Until the agent runs and its channel service serves (a fresh status file of this
        process, and for the vehicle its control socket)."""
        name = "cs" if proc is self.station else "ev"
        assert proc.popen is not None
        pid = proc.popen.pid

        socket_path = self.tmp / "ev" / "control.sock"

        def control_socket() -> bool:   # this process's, not one a killed agent left
            try:
                return socket_path.stat().st_mtime_ns >= proc.started_ns
            except FileNotFoundError:
                return False

        def serving() -> bool:
            status = self.status(name)
            return status.get("pid") == pid and status.get("state") == "running" and \
                (name == "cs" or control_socket())
        self.until(serving, timeout_s, f"{proc.name} serving")

    def sessions(self, name: str) -> list[dict[str, Any]]:
        channels: list[dict[str, Any]] = self.status(name).get("channels") or []
        return channels

    def until(self, done: Callable[[], bool], timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not done():
            for proc in (self.station, self.vehicle):
                if proc.popen is not None and proc.popen.poll() not in (None, -9) \
                        and proc.starts and proc.popen.returncode != 0:
                    raise AssertionError(f"{proc.name} exited {proc.popen.returncode}\n"
                                         + proc.tail())
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}\n" + self.station.tail()
                                     + "\n" + self.vehicle.tail())
            time.sleep(0.05)

    def energy_at_least(self, wh: int, name: str = "cs", timeout_s: float = 60.0) -> None:
        self.until(lambda: any(s["energy_wh"] >= wh for s in self.sessions(name)), timeout_s,
                   f"{wh} Wh paid at {name}")

    def session(self, name: str) -> dict[str, Any]:
        (session,) = self.sessions(name)
        return session

    def settlement(self, name: str, state: str, timeout_s: float = 60.0) -> None:
        self.until(lambda: [s["settlement"] for s in self.sessions(name)] == [state],
                   timeout_s, f"settlement {state} at {name}")

    def settled(self, *names: str, timeout_s: float = 60.0) -> None:
        def done() -> bool:
            return all(self.sessions(n) and all(s["settlement"] == "settled"
                                                for s in self.sessions(n)) for n in names)
        self.until(done, timeout_s, f"settlement at {names}")

    def charge(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``edge-agent charge ...`` as the driver types it."""
        return subprocess.run([EDGE_AGENT, "charge", *args, "--config",
                               str(self.tmp / "vehicle.toml"), "--json"],
                              capture_output=True, text=True, timeout=90, cwd=ROOT)

    def close(self) -> None:
        for proc in (self.vehicle, self.station):
            proc.stop()
        self.plant.close()


def write_toml(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(tomli_w.dumps(data).encode())
    return path
