"""The rig driven by a scenario: the profile on the simulators, each fault at its time, and
a record of what really happened (fault windows as measured, the events checks look for).

Scope: :class:`ScenarioRig` plugs into the hooks of :class:`hil.session.rig.Rig` (``timeline``,
``session_over``); hil/scenarios/runner.py builds it, judges the record and writes the
report. Faults (hil/scenarios/scenario.py FAULTS) and what the rig does for each::

    broker-outage      mosquitto stopped (SIGTERM), restarted on the same port afterwards
    meter-timeout      the plant's meter stops answering Modbus (Fault.SILENT), then clears
    agent-crash        the target agent's tasks are cancelled mid-flight (no flush, no
                       close) and a new agent is started from its state directory
    ignition-off       the ECU simulator's ignition is off: no OBD-II answer at all
    stale-state-close  at start_s the driver stops the session; each agent is configured to
                       leave the cooperative close to the other ([settlement] submit), so
                       both settlement jobs wait; the rig, holding the station's settlement
                       key, closes the channel on chain with a co-signed state nonces_back
                       old; the agents' jobs see it and challenge with the final state inside
                       the dispute window; the rig advances the chain's clock past the window
                       and the jobs settle

Time: the scenario's timeline is in simulated seconds; the rig runs ``time_scale`` times
faster (the plant's physics and the ECU's profile follow the same scale), so a fault at
``start_s`` happens ``start_s / time_scale`` wall seconds after the session starts (t = 0
is when the channel is funded and active, or when the vehicle agent is up for a drive).
The dispute window is chain time, which is not scaled: the chain's clock is advanced.

Events recorded (``SessionRecord.events``; the codes the checks name):
``uplink-reconnected`` (an agent's uplink connected again; from its connection epoch),
``agent-restarted`` (the restarted agent is running), ``channel-challenged`` (the challenge
transaction was mined), ``source-timeout`` (a source said, in a signed event, that its
device stopped answering: ``meter-silent``, ``meter-read-failed`` for no response,
``vehicle-asleep``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from agent.channel.records import CosignedRecord
from agent.errors import ConfigError, SettlementError
from agent.settlement.client import SettlementClient
from firmware_adapters.base import Source
from hil.report import FaultWindow, SessionEvent, SessionRecord
from hil.scenarios.scenario import Fault, Profile, Scenario
from hil.session.rig import Rig, RigSettings
from hil.session.site import METER_ID
from hil.sim.ecu import DrivingProfile, Segment
from hil.sim.meter import ChargingProfile
from hil.sim.meter import Fault as MeterFault

# Signed events by which a source says its device stopped answering (source-timeout).
TIMEOUT_EVENTS = {"meter-silent": None, "meter-read-failed": ("no-response", "timeout"),
                  "vehicle-asleep": None}
EPOCH_POLL_S = 0.05
Undo = Callable[[asyncio.TaskGroup, asyncio.Event], Awaitable[None]]


def rig_settings(scenario: Scenario, time_scale: float, timeout_s: float | None = None,
                 ) -> RigSettings:
    """The rig for a scenario: nothing ends the session but its duration; a stale close
    opens the channel with that fault's dispute window; a session still running after
    ``timeout_s`` (default: twice its length plus two minutes) ends the run as a FAIL."""
    stale = [f for f in scenario.faults if f.kind == "stale-state-close"]
    return RigSettings(
        energy_wh=0, power_w=0, time_scale=time_scale, ecu_time_scale=time_scale,
        ecu_poll_scale=time_scale,
        charging=scenario.profile.kind == "charging",
        dispute_window_s=max(1, round(stale[0].duration_s)) if stale else 3600,
        # the agent's own timeouts are wall time: keep them short against scaled faults
        meter_interval_s=0.05, meter_timeout_s=0.2, ecu_probe_interval_s=0.2,
        timeout_s=timeout_s or 120.0 + 2 * scenario.duration_s / time_scale,
        partial_on_timeout=True, export_price_per_kwh=scenario.profile.export_price_per_kwh,
        deposit_cs=5_000_000 if scenario.profile.export_price_per_kwh else 0)


def stepped(profile: Profile, end_s: float) -> ChargingProfile:
    """The piecewise-linear power profile as the meter simulator's piecewise-constant steps
    of ``step_s``: the value at each step's midpoint (exact energy on linear pieces), zero
    after ``end_s``."""
    steps: list[tuple[float, float]] = []
    t = 0.0
    while t < end_s:
        width = min(profile.step_s, end_s - t)
        steps.append((t, profile.power_at(t + width / 2)))
        t += width
    steps.append((end_s, 0))
    return ChargingProfile.from_pairs(steps)


def driving(points: tuple[tuple[float, float], ...]) -> DrivingProfile:
    """The scenario's speed points as the ECU simulator's segments."""
    segments = [Segment(points[0][0], points[0][1], points[0][1])] if points[0][0] > 0 else []
    for (t0, v0), (t1, v1) in zip(points, points[1:], strict=False):
        segments.append(Segment(t1 - t0, v0, v1))
    return DrivingProfile(tuple(segments) or (Segment(1.0, points[0][1], points[0][1]),))


class ScenarioRig(Rig):
    def __init__(self, out: Path, scenario: Scenario, time_scale: float,
                 say: Callable[[str], None] = print, timeout_s: float | None = None) -> None:
        super().__init__(out, rig_settings(scenario, time_scale, timeout_s), say)
        self.scenario = scenario
        self.time_scale = time_scale
        self.end_s = scenario.duration_s   # the driver stops the session then
        self.t0: float | None = None          # monotonic time of the scenario's t = 0
        self.started_ns = 0
        self.windows: list[FaultWindow] = []
        self.events: list[SessionEvent] = []

    def record_title(self) -> str:
        return f"HIL scenario {self.scenario.name}: {self.scenario.description}"

    def configure(self, role: str, data: dict[str, Any]) -> None:
        if any(f.kind == "stale-state-close" for f in self.scenario.faults):
            # each leaves the cooperative close to the other: the stale close comes first
            data["settlement"].update(submit="vehicle" if role == "station" else "station",
                                      coop_grace_s=600.0)

    # -- the scenario clock ------------------------------------------------------------
    def now_s(self) -> float:
        """Simulated seconds since t = 0 (0 before the session started)."""
        if self.t0 is None:
            return 0.0
        return (time.monotonic() - self.t0) * self.time_scale

    async def _until(self, t_s: float) -> None:
        assert self.t0 is not None
        delay = self.t0 + t_s / self.time_scale - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)

    def session_over(self, delivered_wh: int) -> bool:
        return self.t0 is not None and self.now_s() >= self.end_s

    def _event(self, where: str, code: str, message: str = "") -> None:
        self.events.append(SessionEvent(time.time_ns(), where, code, message))
        self.say(f"+{self.now_s():6.1f} s  {where}: {code}" + (f" ({message})" if message
                                                                else ""))

    # -- the timeline ------------------------------------------------------------------
    async def timeline(self, tg: asyncio.TaskGroup, stop: asyncio.Event) -> None:
        tg.create_task(self._watch_epochs(), name="hil.epochs")
        await self._start_session()
        async with asyncio.TaskGroup() as faults_tg:
            for fault in self.scenario.faults:
                faults_tg.create_task(self._apply(fault, tg, stop), name=f"fault[{fault.kind}]")
        if not self.settings.charging:
            await self._until(self.scenario.duration_s)

    async def _start_session(self) -> None:
        """t = 0: the channel is active (or the car's agent is up); the profile starts."""
        if self.settings.charging:
            station = self.agents["station"]
            while not any(s.state == "active" for s in station.sessions()):
                await asyncio.sleep(0.02)
        else:
            vehicle = self.agents["vehicle"]
            while vehicle.runtime is None or not vehicle.runtime.ready.is_set():
                await asyncio.sleep(0.02)
        profile = self.scenario.profile
        if self.settings.charging:
            assert self.plant is not None   # the car asks for the profile's power
            self.plant.set_profile(1, stepped(profile, self.end_s))
        elif profile.speed_kmh:
            ecu = self.agents["vehicle"].source("ecu0")
            ecu.core.profile = driving(profile.speed_kmh)  # type: ignore[attr-defined]
        self.t0 = time.monotonic()
        self.started_ns = time.time_ns()
        self.say(f"t = 0: {profile.kind} profile running at x{self.time_scale:g}")

    async def _apply(self, fault: Fault, tg: asyncio.TaskGroup, stop: asyncio.Event) -> None:
        await self._until(fault.start_s)
        start_ns = time.time_ns()
        self._event(fault.target, f"fault-{fault.kind}", f"for {fault.duration_s:g} s")
        undo = await self._begin(fault)
        await self._until(fault.end_s)
        await undo(tg, stop)
        self.windows.append(FaultWindow(fault.kind, start_ns, time.time_ns(), fault.target))

    async def _begin(self, fault: Fault) -> Undo:
        """Put ``fault`` in force; returns what ends it."""
        if fault.kind == "stale-state-close":
            return await self._stale_close(fault)
        if fault.kind == "broker-outage":
            assert self.broker is not None
            broker = self.broker
            await asyncio.to_thread(broker.stop)

            async def undo(_tg: asyncio.TaskGroup, _stop: asyncio.Event) -> None:
                await asyncio.to_thread(broker.start)
                self._event("broker", "broker-restarted", broker.url)
            return undo
        if fault.kind == "agent-crash":
            agent = self.agents[fault.target]
            await agent.kill()

            async def restart(tg: asyncio.TaskGroup, stop: asyncio.Event) -> None:
                runtime = agent.start(tg, stop)
                await runtime.ready.wait()
                self._event(agent.role, "agent-restarted",
                            f"from {agent.config.device.state_dir}, start {agent.starts}")
            return restart
        source = self._source(fault.target)
        if fault.kind == "meter-timeout":
            assert self.plant is not None and fault.target == METER_ID
            simulator = self.plant.meter   # the plant's meter: unit 1 is connector 1
            simulator.inject(1, MeterFault.SILENT)

            async def answer(_tg: asyncio.TaskGroup, _stop: asyncio.Event) -> None:
                simulator.clear(1)
            return answer
        if fault.kind == "ignition-off":
            while source.simulator is None:  # type: ignore[attr-defined]
                await asyncio.sleep(0.01)
            source.simulator.ignition = False  # type: ignore[attr-defined]

            async def ignition_on(_tg: asyncio.TaskGroup, _stop: asyncio.Event) -> None:
                source.simulator.ignition = True  # type: ignore[attr-defined]
            return ignition_on
        raise ConfigError(key="faults.kind", expected="a fault kind the rig injects",
                          found=fault.kind)

    def _source(self, source_id: str) -> Source:
        for agent in self.agents.values():
            for runner in agent.sources:
                if runner.source.id == source_id:
                    return runner.source
        raise ConfigError(key="faults.target", expected="a source id of the rig (meter0, ecu0)",
                          found=source_id)

    async def _watch_epochs(self) -> None:
        """uplink-reconnected: an agent's uplink connected again (its epoch went up)."""
        seen: dict[int, int] = {}
        while True:
            for agent in self.agents.values():
                runtime = agent.runtime
                uplink = runtime.uplink if runtime is not None else None
                if uplink is None:
                    continue
                last = seen.get(id(uplink), 0)
                if uplink.epoch > last:
                    seen[id(uplink)] = uplink.epoch
                    if last >= 1:
                        self._event(agent.role, "uplink-reconnected", f"epoch {uplink.epoch}")
            await asyncio.sleep(EPOCH_POLL_S)

    # -- the stale close ---------------------------------------------------------------
    async def _stale_close(self, fault: Fault) -> Undo:
        """Close on chain with an old co-signed state, as a cheating station would; the
        agents' watch and settlement jobs must challenge it. Ends once the challenge is on
        chain (or the window, in chain time, is over)."""
        assert self.chain is not None and self.node is not None
        station = self.agents["station"]
        await self.charge_stop()
        sessions = lambda: [s for a in self.agents.values() for s in a.sessions()]  # noqa: E731
        while not (len(sessions()) >= 2 and all(s.settlement == "waiting" for s in sessions())):
            await asyncio.sleep(0.05)
        stale = self._stale_state(int(fault.params["nonces_back"]))
        client = SettlementClient(self.node, self.chain.contract, station.keys.settlement)
        tx = await asyncio.to_thread(client.close, stale.state, stale.sig_ev, stale.sig_cs)
        self._event("station", "channel-closed-stale",
                    f"unilateral close at nonce {stale.state.nonce}, block {tx.block_number}")
        channel_id = stale.state.channel_id

        async def challenged(_tg: asyncio.TaskGroup, _stop: asyncio.Event) -> None:
            record = await asyncio.to_thread(client.record, channel_id)
            if record.nonce > stale.state.nonce:
                self._event("vehicle", "channel-challenged",
                            f"nonce {record.nonce} over {stale.state.nonce} within the "
                            f"{self.settings.dispute_window_s} s window")
            assert self.chain is not None
            await asyncio.to_thread(self.chain.advance_time, self.settings.dispute_window_s + 1)
        return challenged

    def _stale_state(self, nonces_back: int) -> CosignedRecord:
        """The station's co-signed state ``nonces_back`` below its latest (or the newest
        older one it kept), from the station's own channel store."""
        station = self.agents["station"]
        role: Any = station.runtime.channel.role if station.runtime and \
            station.runtime.channel else None
        sessions = list(role.sessions.values()) if role is not None else []
        records = [r for s in sessions for r in s.store.records()
                   if isinstance(r, CosignedRecord)]
        if not records:
            raise SettlementError("the station holds no co-signed state",
                                  reason="no-stale-state")
        want = max(r.state.nonce for r in records) - nonces_back
        held = [r for r in records if 0 < r.state.nonce <= want]
        if not held:
            raise SettlementError(f"no co-signed state at or below nonce {want}",
                                  reason="no-stale-state")
        return max(held, key=lambda r: r.state.nonce)

    def finish(self, record: SessionRecord) -> SessionRecord:
        """The record with t = 0 as its start (samples from then on), the measured fault
        windows and the events (the runner's own, and ``source-timeout`` from the devices'
        signed events)."""
        events = list(self.events)
        if self.timed_out:
            events.append(SessionEvent(record.ended_ns, "rig", "run-timeout",
                                       f"the session did not end within "
                                       f"{self.settings.timeout_s:g} s"))
        for opened in getattr(self, "opened", ()):
            for event in opened.events:
                if event.code not in TIMEOUT_EVENTS:
                    continue
                reasons = TIMEOUT_EVENTS[event.code]
                details = dict(event.details)
                if reasons is not None and details.get("reason") not in reasons:
                    continue
                events.append(SessionEvent(event.ts_ns, event.source, "source-timeout",
                                           f"{event.code}: {event.message}"))
        events.sort(key=lambda e: e.t_ns)
        started_ns = self.started_ns or record.started_ns
        return dataclasses.replace(record, started_ns=started_ns,
                                   samples=tuple(s for s in record.samples
                                                 if s.t_ns >= started_ns),
                                   faults=tuple(sorted(self.windows, key=lambda w: w.start_ns)),
                                   events=tuple(events))

