"""The charger interface: states, status values, the registry, config errors."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import pytest

from agent.errors import ConfigError
from agent.readings import Event
from firmware_adapters.evse.base import Charger, ChargerStatus, CpState
from firmware_adapters.registry import charger_class
from hil.sim.evse_charger import HilEvseCharger


def test_cp_state_plugged_and_charging_follow_iec_61851() -> None:
    assert [s.value for s in CpState if s.plugged] == ["B", "C", "D"]
    assert [s.value for s in CpState if s.charging] == ["C", "D"]


def test_status_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        ChargerStatus(0, CpState.A, False, 16.0)
    with pytest.raises(ValueError):
        ChargerStatus(1, "A", False, 16.0)  # type: ignore[arg-type]  # the check under test
    with pytest.raises(ValueError):
        ChargerStatus(1, CpState.A, False, -1.0)


def test_registry_loads_hil_evse_and_names_unknown_kinds() -> None:
    cls = charger_class("hil-evse")
    charger = cls.from_options("wb0", {"id": "wb0", "kind": "hil-evse", "map": "alfen-ng9xx",
                                       "connectors": [1, 2]},
                               "station.toml")
    assert charger.connectors == (1, 2)
    with pytest.raises(ConfigError, match="chargers.kind: expected one of: .*hil-evse"):
        charger_class("no-such-kind")


@pytest.mark.parametrize(("options", "message"), [
    ({"connectors": []}, r"chargers\.wb0\.connectors: expected a non-empty array"),
    ({"connectors": [1, 1]}, r"chargers\.wb0\.connectors: expected .*distinct"),
    ({"connectors": [0]}, r"chargers\.wb0\.connectors"),
    ({"conectors": [1]}, r"chargers\.wb0\.conectors: .*did you mean \"connectors\""),
    ({"max_current_a": 2}, r"chargers\.wb0\.max_current_a: expected a number in \[6.0, 80.0\]"),
])
def test_hil_evse_options_errors_name_file_and_key(options: dict[str, object],
                                                    message: str) -> None:
    with pytest.raises(ConfigError, match=r"^station\.toml: " + message):
        charger_class("hil-evse").from_options("wb0", options, "station.toml")


def test_hil_evse_follows_plug_enable_and_limit_over_modbus() -> None:
    charger = charger_class("hil-evse").from_options("wb0", {"plugged": False},
                                                     "station.toml")
    assert isinstance(charger, HilEvseCharger)
    seen: list[ChargerStatus] = []
    events: list[Event] = []

    async def scenario() -> None:
        try:
            await charger.poll_once(seen.append, events.append)
            charger.plant.plug(1)
            await charger.poll_once(seen.append, events.append)
            await charger.set_current_limit(1, 10.0)
            await charger.set_enabled(1, True)
            await charger.poll_once(seen.append, events.append)
            await charger.poll_once(seen.append, events.append)  # unchanged: not reported
            with pytest.raises(ValueError, match="IEC 61851-1"):
                await charger.set_current_limit(1, 5.0)   # below 6 A: refused
            charger.plant.unplug(1)
            await charger.poll_once(seen.append, events.append)
        finally:
            charger.close()
            await charger.stop_plant()

    asyncio.run(scenario())
    assert [(s.state, s.enabled, s.current_limit_a, s.power_w) for s in seen] == [
        (CpState.A, False, 16.0, 0), (CpState.B, False, 16.0, 0),
        (CpState.C, True, 10.0, 6900), (CpState.A, True, 10.0, 0)]
    assert events == []



class _LostCancelCharger(Charger):
    """A charger whose reply and our cancel arrive in one loop iteration, awaited with
    ``asyncio.wait_for`` as pymodbus awaits its replies: on Python 3.11 wait_for then
    returns the reply and the cancel is gone (CPython gh-86296)."""

    kind = "test-lost-cancel"

    @classmethod
    def from_options(cls, charger_id: str, options: Mapping[str, object],
                     where: str) -> _LostCancelCharger:
        return cls(charger_id, (1,))

    async def open(self) -> None:
        pass

    def close(self) -> None:
        pass

    async def set_enabled(self, connector: int, enabled: bool) -> None:
        pass

    async def set_current_limit(self, connector: int, amps: float) -> None:
        pass

    async def read_status(self, connector: int) -> ChargerStatus:
        loop = asyncio.get_running_loop()
        reply: asyncio.Future[ChargerStatus] = loop.create_future()
        task = asyncio.current_task()
        assert task is not None

        def both() -> None:
            reply.set_result(ChargerStatus(connector, CpState.B, True, 16.0))
            task.cancel()

        loop.call_soon(both)
        return await asyncio.wait_for(reply, 5)


def test_a_cancel_lost_inside_a_library_still_ends_the_watch() -> None:
    charger = _LostCancelCharger("wb0", (1,))

    async def scenario() -> bool:
        watch = asyncio.ensure_future(charger.watch(lambda status: None, 0.01))
        done, _ = await asyncio.wait({watch}, timeout=3)
        if not done:
            watch.cancel()   # a second cancel, to clean up the failing case
            await asyncio.wait({watch}, timeout=3)
        return bool(done) and watch.cancelled()

    assert asyncio.run(scenario()), "the watch polled on after its task was cancelled"
