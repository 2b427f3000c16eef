"""An OBD-II ECU simulator on a python-can bus, answering from a driving/charging profile.

The answering logic (:class:`EcuSimCore`) is sans-I/O: CAN frames and a time in seconds in,
frames out. Its value encoders are written from SAE J1979 here, independently of
``firmware_adapters.obd.pids`` (so a formula error on one side shows up as a test failure,
not as two errors cancelling out). :class:`EcuSimulator` runs the core on a bus in a thread;
``python -m hil.sim.ecu`` runs it as its own process::

    python -m hil.sim.ecu --interface udp_multicast --channel 239.74.163.2 \\
        --bus-option port=43113 --addressing 11 --ecus 2

In that process SIGUSR1 turns the ignition off (the ECUs stop answering), SIGUSR2 turns it on
again, SIGTERM/SIGINT stop it. It prints ``ready`` on stdout once its bus is open.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import can

from firmware_adapters.obd.isotp import pad, segment
from firmware_adapters.obd.uds import Profile, load_profile
from hil.sim import uds as sim_uds

# -------------------------------------------------------------------------- the profile


@dataclass(frozen=True, slots=True)
class Segment:
    duration_s: float
    speed_from_kmh: float
    speed_to_kmh: float
    charging_kw: float = 0.0


# One 150 s loop: drive off, cruise, brake, stand, charge at 11 kW (an AC wallbox).
DEFAULT_PROFILE: tuple[Segment, ...] = (
    Segment(20, 0, 50), Segment(40, 50, 50), Segment(15, 50, 0), Segment(15, 0, 0),
    Segment(60, 0, 0, 11.0),
)


@dataclass(frozen=True, slots=True)
class VehicleState:
    speed_kmh: float
    rpm: float
    soc_pct: float
    odometer_km: float
    charging: bool
    charged_kwh: float = 0.0  # energy into the battery since the profile started
    used_kwh: float = 0.0  # energy taken from it (driving)
    power_kw: float = 0.0  # into the battery: + charging, - driving


@dataclass(frozen=True, slots=True)
class DrivingProfile:
    """Piecewise-linear speed over a repeating loop; odometer and SoC integrate it exactly."""

    segments: tuple[Segment, ...] = DEFAULT_PROFILE
    odometer_start_km: float = 12_345.6
    soc_start_pct: float = 60.0
    battery_kwh: float = 60.0
    consumption_kwh_per_km: float = 0.18
    rpm_per_kmh: float = 150.0  # single-speed EV motor

    def state(self, t: float) -> VehicleState:
        loop_s = sum(s.duration_s for s in self.segments if s.duration_s > 0)
        if loop_s <= 0:  # no time in the profile: stand still at the start values
            return VehicleState(0.0, 0.0, self.soc_start_pct, self.odometer_start_km, False)
        loops, rest = divmod(max(0.0, t), loop_s)
        km, charged, used = (x * loops for x in self._integrate(loop_s))
        speed, charging, power = 0.0, False, 0.0
        for seg in self.segments:
            if seg.duration_s <= 0:
                continue  # a zero-length step (two points at one instant): nothing to integrate
            dt = min(rest, seg.duration_s)
            v_end = seg.speed_from_kmh + (seg.speed_to_kmh - seg.speed_from_kmh) * (
                dt / seg.duration_s)
            d = (seg.speed_from_kmh + v_end) / 2 * dt / 3600
            km += d
            charged += seg.charging_kw * dt / 3600
            used += d * self.consumption_kwh_per_km
            rest -= dt
            if rest <= 0:
                speed, charging = v_end, seg.charging_kw > 0
                power = seg.charging_kw - v_end * self.consumption_kwh_per_km
                break
        soc = min(100.0, max(0.0, self.soc_start_pct + (charged - used) / self.battery_kwh * 100))
        return VehicleState(speed, speed * self.rpm_per_kmh, soc, self.odometer_start_km + km,
                            charging, charged, used, power)

    def _integrate(self, seconds: float) -> tuple[float, float, float]:
        km = charged = used = 0.0
        for seg in (s for s in self.segments if s.duration_s > 0):
            d = (seg.speed_from_kmh + seg.speed_to_kmh) / 2 * seg.duration_s / 3600
            km += d
            charged += seg.charging_kw * seg.duration_s / 3600
            used += d * self.consumption_kwh_per_km
        return km, charged, used


# -------------------------------------------------------------------------- encoders (J1979)


def _pct(x: float) -> bytes:
    return bytes((round(min(100.0, max(0.0, x)) * 255 / 100),))


def _temp(c: float) -> bytes:
    return bytes((round(min(215, max(-40, c))) + 40,))


def _hv_battery(s: VehicleState) -> bytes:
    """PID 9A (J1979-DA): A = 0x06 (voltage and current supported, no charging state),
    B = charging state (0), C-D voltage at 1/64 V, E-F current at 0.1 A, signed, positive
    while discharging (VSS counts charging as positive, hence the minus)."""
    values = sim_uds.physical(s)
    volts = values["Vehicle.Powertrain.TractionBattery.CurrentVoltage"]
    amps = values["Vehicle.Powertrain.TractionBattery.CurrentCurrent"]
    return bytes((0x06, 0x00)) + round(volts * 64).to_bytes(2, "big") + \
        round(-amps * 10).to_bytes(2, "big", signed=True)


ENCODERS: dict[int, Callable[[VehicleState, float], bytes]] = {
    0x04: lambda s, t: _pct(min(100.0, s.speed_kmh)),                 # engine/motor load
    0x05: lambda s, t: _temp(40 + s.speed_kmh / 5),                   # coolant
    0x0C: lambda s, t: round(s.rpm * 4).to_bytes(2, "big"),           # rpm x 4
    0x0D: lambda s, t: bytes((round(min(255, s.speed_kmh)),)),        # km/h
    0x0F: lambda s, t: _temp(25),                                     # intake air
    0x11: lambda s, t: _pct(s.speed_kmh),                             # throttle (pedal)
    0x1C: lambda s, t: b"\x06",                                       # EOBD (J1979 table)
    0x1F: lambda s, t: round(min(65535, t)).to_bytes(2, "big"),       # run time s
    0x42: lambda s, t: round(14.2 * 1000).to_bytes(2, "big"),         # 12 V net, mV
    0x46: lambda s, t: _temp(18),                                     # ambient
    0x51: lambda s, t: b"\x08",                                       # fuel type: electric
    0x5B: lambda s, t: _pct(s.soc_pct),                               # EV battery charge
    0x9A: lambda s, t: _hv_battery(s),                                # HV battery V, A
    0xA6: lambda s, t: round(s.odometer_km * 10).to_bytes(4, "big"),  # 0.1 km
}
SECOND_ECU_PIDS = (0x0D, 0x46)  # a gateway/BMS that also answers some functional requests


def bitmap(base: int, pids: Sequence[int]) -> bytes:
    bits = 0
    for pid in pids:
        if base < pid <= base + 32:
            bits |= 1 << (32 - (pid - base))
    if any(p > base + 32 for p in pids):
        bits |= 1  # the next bitmap PID is supported
    return bits.to_bytes(4, "big")


def encode_dtc(code: str) -> bytes:
    return bytes(((("PCBU".index(code[0]) << 6) | int(code[1]) << 4 | int(code[2], 16)),
                  int(code[3:5], 16)))


# -------------------------------------------------------------------------- the core


@dataclass(slots=True)
class EcuSimCore:
    """Answers OBD-II requests for ``ecus`` ECUs (ECU 0: everything in ENCODERS)."""

    profile: DrivingProfile = field(default_factory=DrivingProfile)
    vin: str = "WP0ZZZ99ZTS390000"
    addressing: int = 11
    ecus: int = 1
    dtcs: list[str] = field(default_factory=lambda: ["P0A80"])
    ignition: bool = True
    odometer_offset_km: float = 0.0  # HIL fault injection: a tampered cluster
    uds: Profile | None = None  # manufacturer ECUs answering UDS 0x22 (a profile's DIDs)
    response_pending: int = 0  # "7F <sid> 78" frames before each answer (ISO 14229-1)
    calibration_ids: tuple[str, ...] = ("EVEDGE-SIM-0001", "EVEDGE-BMS-0002")
    ecu_name: str = "ECM-EngineControl"
    _pending: dict[int, list[bytes]] = field(default_factory=dict)  # tester id -> CFs

    def pids_of(self, ecu: int) -> tuple[int, ...]:
        return tuple(ENCODERS) if ecu == 0 else SECOND_ECU_PIDS

    def state(self, t: float) -> VehicleState:
        state = self.profile.state(t)
        return replace(state, odometer_km=state.odometer_km + self.odometer_offset_km)

    def _ids(self, ecu: int) -> tuple[int, int]:
        """(physical request id, response id) of an ECU (ISO 15765-4 s6.3)."""
        if self.addressing == 11:
            return 0x7E0 + ecu, 0x7E8 + ecu
        return 0x18DA00F1 | (0x10 + ecu) << 8, 0x18DAF100 | (0x10 + ecu)

    @property
    def functional_id(self) -> int:
        return 0x7DF if self.addressing == 11 else 0x18DB33F1

    def _send(self, resp_id: int, key: int, answer: bytes) -> list[tuple[int, bytes]]:
        """Frames of one answer (after any response-pending frames); CFs wait for FC."""
        out = [(resp_id, pad(bytes((3, 0x7F, answer[0] - 0x40 if answer[0] != 0x7F
                                    else answer[1], 0x78))))] * self.response_pending
        frames = segment(answer)
        out.append((resp_id, pad(frames[0]) if len(frames) == 1 else frames[0]))
        if len(frames) > 1:
            self._pending[key] = frames[1:]
        return out

    def _handle_uds(self, arb_id: int, data: bytes, t: float) -> list[tuple[int, bytes]] | None:
        """A frame to one of the profile's ECUs; None when it is not addressed to one."""
        if self.uds is None:
            return None
        resp_id = sim_uds.routes(self.uds).get(arb_id)
        if resp_id is None:
            return None
        if data[0] >> 4 == 3:  # flow control: the rest of a multi-frame answer
            return [(resp_id, f) for f in self._pending.pop(resp_id, [])]
        size = data[0] & 0xF
        if data[0] >> 4 != 0 or not 0 < size <= min(7, len(data) - 1):
            return []
        req = data[1:1 + size]
        if req[0] != 0x22 or len(req) != 3:
            return self._send(resp_id, resp_id, bytes((0x7F, req[0], 0x11)))
        did = int.from_bytes(req[1:3], "big")
        match = [d for d in self.uds.dids if d.did == did and d.route.request_id == arb_id]
        if not match:  # ISO 14229-1: requestOutOfRange for a DID the ECU does not have
            return self._send(resp_id, resp_id, bytes((0x7F, 0x22, 0x31)))
        return self._send(resp_id, resp_id, sim_uds.answer(match[0],
                                                            sim_uds.physical(self.state(t))))

    def handle(self, arb_id: int, data: bytes, t: float) -> list[tuple[int, bytes]]:
        if not self.ignition or not data:
            return []
        uds = self._handle_uds(arb_id, data, t)
        if uds is not None:
            return uds
        out: list[tuple[int, bytes]] = []
        for ecu in range(self.ecus):
            req_id, resp_id = self._ids(ecu)
            if arb_id == req_id and data[0] >> 4 == 3:  # flow control: send the rest
                out += [(resp_id, f) for f in self._pending.pop(ecu, [])]
                continue
            if arb_id not in (req_id, self.functional_id) or data[0] >> 4 != 0:
                continue
            size = data[0] & 0xF
            if len(data) > 8 or not 0 < size <= min(7, len(data) - 1):
                continue  # not a classic-CAN single frame: ignore, as an ECU would
            answer = self.answer(ecu, data[1:1 + size], t, physical=arb_id == req_id)
            if answer is not None:
                out += self._send(resp_id, ecu, answer)
        return out

    def answer(self, ecu: int, req: bytes, t: float, physical: bool) -> bytes | None:
        sid = req[0]

        def nrc(code: int) -> bytes | None:  # ISO 15765-4: no negative answer to functional
            return bytes((0x7F, sid, code)) if physical else None

        if sid == 0x01:
            if len(req) < 2:
                return nrc(0x13)
            state = self.state(t)
            body = b""
            for pid in req[1:]:
                if pid % 0x20 == 0:
                    body += bytes((pid,)) + bitmap(pid, self.pids_of(ecu))
                elif pid == 0x01 and ecu == 0:  # MIL on with stored DTCs; monitors complete
                    body += bytes((0x01, (0x80 if self.dtcs else 0) | len(self.dtcs),
                                   0x07, 0xE5, 0x00))
                elif pid in self.pids_of(ecu):
                    body += bytes((pid,)) + ENCODERS[pid](state, t)
            return b"\x41" + body if body else nrc(0x31)
        if ecu != 0:
            return None
        if sid == 0x02:  # freeze frame 0, stored with the first DTC (J1979 s6.2)
            return self._freeze_frame(req[1:], t) or nrc(0x31)
        if sid == 0x09 and req[1:] == b"\x02":
            return b"\x49\x02\x01" + self.vin.encode("ascii")
        if sid == 0x09 and req[1:] == b"\x04":
            return b"\x49\x04" + bytes((len(self.calibration_ids),)) + b"".join(
                c.encode("ascii").ljust(16, b"\x00") for c in self.calibration_ids)
        if sid == 0x09 and req[1:] == b"\x0a":
            return b"\x49\x0a\x01" + self.ecu_name.encode("ascii").ljust(20, b"\x00")
        if sid in (0x03, 0x07, 0x0A):
            codes = self.dtcs if sid in (0x03, 0x0A) else []
            return bytes((sid + 0x40, len(codes))) + b"".join(map(encode_dtc, codes))
        if sid == 0x04:
            self.dtcs.clear()
            return b"\x44"
        return nrc(0x11)

    def _freeze_frame(self, pairs: bytes, t: float) -> bytes | None:
        if not self.dtcs or len(pairs) % 2:
            return None
        body = b""
        state = self.state(t)
        for i in range(0, len(pairs), 2):
            pid, frame = pairs[i], pairs[i + 1]
            if frame != 0:
                continue
            if pid == 0x02:
                body += b"\x02\x00" + encode_dtc(self.dtcs[0])
            elif pid in ENCODERS and pid not in (0x01, 0x9A):
                body += bytes((pid, 0)) + ENCODERS[pid](state, t)
        return b"\x42" + body if body else None


# -------------------------------------------------------------------------- the runner


class EcuSimulator:
    """Runs :class:`EcuSimCore` on a python-can bus in a thread. ``start()`` / ``stop()``."""

    def __init__(self, bus: can.BusABC, core: EcuSimCore | None = None,
                 clock: Callable[[], float] = time.monotonic, start_s: float = 0.0) -> None:
        self.bus = bus
        self.core = core or EcuSimCore()
        self.clock = clock
        self._t0 = clock() - start_s  # profile time ``start_s`` now
        self._off_since: float | None = None  # a parked car does not move: profile time
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.requests = 0

    @property
    def ignition(self) -> bool:
        return self.core.ignition

    @ignition.setter
    def ignition(self, on: bool) -> None:
        if not on and self._off_since is None:
            self._off_since = self.clock()
        elif on and self._off_since is not None:
            self._t0 += self.clock() - self._off_since  # stands still while off
            self._off_since = None
        self.core.ignition = on

    def start(self) -> EcuSimulator:
        self._thread = threading.Thread(target=self._run, name="ecu-sim", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                msg = self.bus.recv(timeout=0.05)
            except (can.CanError, OSError):
                continue
            # 11-bit ids fit 0x7FF; an extended frame with a small id is not for any ECU here
            if msg is None or msg.is_extended_id != (msg.arbitration_id > 0x7FF):
                continue
            self.requests += 1
            for arb_id, data in self.core.handle(msg.arbitration_id, bytes(msg.data),
                                                 self.clock() - self._t0):
                try:
                    self.bus.send(can.Message(arbitration_id=arb_id, data=data,
                                              is_extended_id=arb_id > 0x7FF))
                except (can.CanError, OSError):
                    pass


def _bus_option(text: str) -> tuple[str, object]:
    key, _, value = text.partition("=")
    return key, int(value) if value.isdigit() else value


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hil.sim.ecu", description=__doc__.split("\n")[0])
    ap.add_argument("--interface", default="udp_multicast")
    ap.add_argument("--channel", default="239.74.163.2")
    ap.add_argument("--bus-option", action="append", default=[], type=_bus_option,
                    help="extra can.Bus argument KEY=VALUE (e.g. port=43113)")
    ap.add_argument("--addressing", type=int, choices=(11, 29), default=11)
    ap.add_argument("--ecus", type=int, choices=(1, 2), default=1)
    ap.add_argument("--vin", default="WP0ZZZ99ZTS390000")
    ap.add_argument("--odometer-offset-km", type=float, default=0.0)
    ap.add_argument("--profile", help="also answer this UDS profile's DIDs (hyundai-egmp ...)")
    args = ap.parse_args(argv)
    bus = can.Bus(interface=args.interface, channel=args.channel, **dict(args.bus_option))
    core = EcuSimCore(vin=args.vin, addressing=args.addressing, ecus=args.ecus,
                      odometer_offset_km=args.odometer_offset_km,
                      uds=load_profile(args.profile) if args.profile else None)
    sim = EcuSimulator(bus, core).start()
    done = threading.Event()
    signal.signal(signal.SIGUSR1, lambda *_: setattr(sim, "ignition", False))
    signal.signal(signal.SIGUSR2, lambda *_: setattr(sim, "ignition", True))
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    print("ready", flush=True)
    while not done.wait(0.2):
        pass
    sim.stop()
    bus.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
