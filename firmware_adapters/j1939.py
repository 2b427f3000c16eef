"""``j1939``: SAE J1939 on a python-can bus (e-trucks, e-buses): PGNs decoded with a J1939
DBC (cantools), multi-packet PGNs through the transport protocol, DM1 faults as events.

Sans-I/O core (:class:`J1939Core`): a frame (29-bit id, data) and ``now`` (monotonic ns) in;
complete PGN messages, frames to send and events out. Rules (SAE J1939-21, -71, -73, -81):

* Id: priority (3 bits), EDP/DP, PDU format (PF), PDU specific (PS), source address (SA).
  PF < 240 (PDU1): PS is the destination address and the PGN's low byte is 0; PF >= 240
  (PDU2): broadcast, PS is part of the PGN.
* Transport protocol (-21 s5.10): TP.CM (PGN 0xEC00) opens a session per sender (and
  destination): BAM (control 32, broadcast, no handshake) or RTS (16, to us): size (9..1785
  bytes), number of packets, the PGN carried. TP.DT (PGN 0xEB00): sequence number 1..n + 7
  bytes. Packets must come in order; a missing or repeated one, a wrong count or a gap longer
  than T1 (750 ms; T2 1250 ms after a CTS) drops the session (``j1939-tp-sequence`` /
  ``j1939-tp-timeout``). Connection abort (control 255) ends it (``j1939-tp-abort``). When
  we hold an address and an RTS is for us, we answer CTS (all packets at once, as the
  sender's max allows) and End of Message Acknowledgement; else we only listen.
* Address claim (-81): ``listen-only`` sends nothing; ``claim`` sends Address Claimed
  (PGN 0xEE00, our 8-byte NAME) at start. Another node claiming the same address with a
  lower NAME wins: we go to "cannot claim" (SA 254), send that, and stop answering RTS.
* DM1 (PGN 0xFECA, -73 s5.7.1): lamp bytes, then 4 bytes per DTC: SPN (19 bits: byte 1,
  byte 2, top 3 bits of byte 3), FMI (low 5 bits of byte 3), occurrence count (low 7 bits of
  byte 4). A DTC that becomes active is an event ``j1939-dtc-active`` (SPN, FMI, source);
  one that disappears, ``j1939-dtc-cleared``. ``00 00 00 00`` is "no DTC".

Config::

    [[sources]]
    id = "truck"
    kind = "j1939"
    dbc = "/etc/edge-agent/j1939.dbc"   # a J1939 DBC: PGN ids, signal scalings
    interface = "socketcan"
    channel = "can1"
    address = "listen-only"             # or a source address 0..253 to claim
    name = 0x8000A00000000001           # our 64-bit NAME when claiming
    [sources.signals]                   # PGN.Signal (or Signal) -> VSS name, as for dbc
    "CCVS1.WheelBasedVehicleSpeed" = "Vehicle.Speed"
    "VDHR.HighResolutionTotalVehicleDistance" = "Vehicle.TraveledDistance"
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import can
import cantools
import cantools.database
import cantools.database.errors

from agent.errors import ConfigError, DecodeError
from agent.options import Table
from agent.readings import Event, Reading, TimeStatus
from firmware_adapters.base import Clock, Emit, system_clock
from firmware_adapters.canbus import REOPEN_PAUSE_S, open_bus
from firmware_adapters.dbc import DbcDecoder, _find_signal
from firmware_adapters.obd.can_driver import bus_kwargs
from firmware_adapters.obd.odometer import OdometerMonitor
from firmware_adapters.obd.odometer_file import OdometerSource

PGN_TP_CM, PGN_TP_DT, PGN_ADDRESS_CLAIMED, PGN_REQUEST, PGN_DM1 = 0xEC00, 0xEB00, 0xEE00, \
    0xEA00, 0xFECA
CM_RTS, CM_CTS, CM_EOM_ACK, CM_BAM, CM_ABORT = 16, 17, 19, 32, 255
GLOBAL, NULL_ADDRESS = 0xFF, 0xFE
T1_NS, T2_NS = 750_000_000, 1_250_000_000
MAX_TP_SIZE = 1785  # 255 packets x 7 bytes
NS = 1_000_000_000
# J1939-81 NAME: arbitrary address capable, industry group 0, function 0xA0 (telematics)
DEFAULT_NAME = 0x8000A00000000001


@dataclass(frozen=True, slots=True)
class J1939Id:
    priority: int
    pgn: int
    source: int
    destination: int

    @classmethod
    def parse(cls, arb_id: int) -> J1939Id:
        pf, ps = (arb_id >> 16) & 0xFF, (arb_id >> 8) & 0xFF
        dp = (arb_id >> 24) & 0x3
        pgn = dp << 16 | pf << 8 | (ps if pf >= 240 else 0)
        return cls((arb_id >> 26) & 0x7, pgn, arb_id & 0xFF, GLOBAL if pf >= 240 else ps)

    def arb_id(self) -> int:
        ps = self.destination if (self.pgn >> 8) & 0xFF < 240 else self.pgn & 0xFF
        return self.priority << 26 | (self.pgn & 0x3FF00) << 8 | ps << 8 | self.source


@dataclass(frozen=True, slots=True)
class Message:
    """A complete PGN: single frame, or reassembled by the transport protocol."""

    pgn: int
    source: int
    data: bytes


@dataclass(slots=True)
class _Session:
    pgn: int
    size: int
    packets: int
    bam: bool
    deadline: int
    next_seq: int = 1
    data: bytearray = field(default_factory=bytearray)


@dataclass(slots=True)
class J1939Core:
    """Frames in, messages / frames to send / events out. ``address`` None = listen-only."""

    address: int | None = None
    name: int = 0
    source: str = ""
    counters: Counter[str] = field(default_factory=Counter)
    claimed: bool = False
    _sessions: dict[tuple[int, int], _Session] = field(default_factory=dict)
    _dtcs: dict[int, frozenset[tuple[int, int]]] = field(default_factory=dict)

    def start(self) -> list[tuple[int, bytes]]:
        """Frames to send when the bus opens: our Address Claimed, when claiming."""
        if self.address is None:
            return []
        self.claimed = True
        return [self._claim(self.address)]

    def _claim(self, sa: int) -> tuple[int, bytes]:
        return (J1939Id(6, PGN_ADDRESS_CLAIMED, sa, GLOBAL).arb_id(),
                self.name.to_bytes(8, "little"))

    def receive(self, arb_id: int, data: bytes, now: int
                ) -> tuple[list[Message], list[tuple[int, bytes]]]:
        """One 29-bit frame. Returns complete messages and frames to send. A broken
        transport session raises DecodeError (the source counts it and goes on)."""
        jid = J1939Id.parse(arb_id)
        self.expire(now)
        if jid.pgn == PGN_ADDRESS_CLAIMED:
            return [], self._contend(jid, data)
        if jid.pgn == PGN_TP_CM:
            return self._cm(jid, data, now)
        if jid.pgn == PGN_TP_DT:
            return self._dt(jid, data, now)
        if jid.destination not in (GLOBAL, self.address) and self.address is not None:
            return [], []
        return [Message(jid.pgn, jid.source, bytes(data))], []

    def _contend(self, jid: J1939Id, data: bytes) -> list[tuple[int, bytes]]:
        if not self.claimed or jid.source != self.address or len(data) != 8:
            return []
        theirs = int.from_bytes(data, "little")
        if theirs < self.name:  # the lower NAME has priority (J1939-81 s4.4.3)
            self.claimed = False
            self.counters["j1939-address-lost"] += 1
            return [self._claim(NULL_ADDRESS)]
        return [self._claim(jid.source)]  # we win: claim again

    def _cm(self, jid: J1939Id, data: bytes, now: int
            ) -> tuple[list[Message], list[tuple[int, bytes]]]:
        if len(data) != 8:
            raise DecodeError("TP.CM is 8 bytes", reason="j1939-tp-length")
        control, key = data[0], (jid.source, jid.destination)
        pgn = int.from_bytes(data[5:8], "little")
        if control == CM_ABORT:
            if self._sessions.pop(key, None) is not None:
                raise DecodeError(f"SA {jid.source}: transport aborted (reason {data[1]})",
                                  reason="j1939-tp-abort")
            return [], []
        if control not in (CM_BAM, CM_RTS):
            return [], []  # CTS / EOM from others: not our session
        size, packets = int.from_bytes(data[1:3], "little"), data[3]
        if not 9 <= size <= MAX_TP_SIZE or packets != -(-size // 7):
            raise DecodeError(f"SA {jid.source}: TP.CM size {size} in {packets} packets",
                              reason="j1939-tp-length")
        if key in self._sessions:
            self.counters["j1939-tp-restarted"] += 1  # a new CM ends the old session
        bam = control == CM_BAM
        if not bam and (jid.destination != self.address or not self.claimed):
            return [], []  # an RTS for another node
        self._sessions[key] = _Session(pgn, size, packets, bam, now + (T1_NS if bam else T2_NS))
        if bam:
            return [], []
        cts = bytes((CM_CTS, packets, 1, 0xFF, 0xFF)) + pgn.to_bytes(3, "little")
        return [], [(J1939Id(7, PGN_TP_CM, self.address or 0, jid.source).arb_id(), cts)]

    def _dt(self, jid: J1939Id, data: bytes, now: int
            ) -> tuple[list[Message], list[tuple[int, bytes]]]:
        key = (jid.source, jid.destination)
        s = self._sessions.get(key)
        if s is None:
            self.counters["j1939-tp-orphan-dt"] += 1
            return [], []
        if len(data) != 8 or data[0] != s.next_seq:
            del self._sessions[key]
            raise DecodeError(f"SA {jid.source}: TP.DT {data[:1].hex()} where packet "
                              f"{s.next_seq} was due", reason="j1939-tp-sequence")
        s.data += data[1:]
        s.next_seq += 1
        s.deadline = now + T1_NS
        if s.next_seq <= s.packets:
            return [], []
        del self._sessions[key]
        msg = Message(s.pgn, jid.source, bytes(s.data[:s.size]))
        if s.bam:
            return [msg], []
        ack = bytes((CM_EOM_ACK,)) + s.size.to_bytes(2, "little") + bytes((s.packets, 0xFF)) \
            + s.pgn.to_bytes(3, "little")
        return [msg], [(J1939Id(7, PGN_TP_CM, self.address or 0, jid.source).arb_id(), ack)]

    def expire(self, now: int) -> None:
        """Drop sessions whose next packet is overdue (T1/T2)."""
        for key, s in list(self._sessions.items()):
            if now > s.deadline:
                del self._sessions[key]
                self.counters["j1939-tp-timeout"] += 1

    def dm1(self, msg: Message, ts_ns: int) -> list[Event]:
        """Active DTCs of one source: events for the ones that appeared or went away."""
        active = decode_dm1(msg.data)
        before = self._dtcs.get(msg.source, frozenset())
        self._dtcs[msg.source] = active
        out = [Event("j1939-dtc-active", f"SA {msg.source}: SPN {spn} FMI {fmi} active", ts_ns,
                     self.source, (("sa", msg.source), ("spn", spn), ("fmi", fmi)))
               for spn, fmi in sorted(active - before)]
        out += [Event("j1939-dtc-cleared", f"SA {msg.source}: SPN {spn} FMI {fmi} cleared",
                      ts_ns, self.source, (("sa", msg.source), ("spn", spn), ("fmi", fmi)))
                for spn, fmi in sorted(before - active)]
        return out


def decode_dm1(data: bytes) -> frozenset[tuple[int, int]]:
    """DM1 data -> {(SPN, FMI)}: 2 lamp bytes, then 4 bytes per DTC (J1939-73 s5.7.1). A
    single-frame DM1 is 8 bytes: one DTC and two bytes of 0xFF padding."""
    extra = (len(data) - 2) % 4
    if len(data) < 6 or data[len(data) - extra:] != b"\xff" * extra:
        raise DecodeError(f"DM1 of {len(data)} bytes", reason="j1939-dm1-length")
    out = set()
    for i in range(2, len(data) - extra, 4):
        b = data[i:i + 4]
        if b == b"\x00\x00\x00\x00" or b == b"\xff\xff\xff\xff":
            continue
        out.add((b[0] | b[1] << 8 | (b[2] >> 5) << 16, b[2] & 0x1F))
    return frozenset(out)


def load_dbc(path: str, where: str = "", key: str = "dbc") -> cantools.database.can.Database:
    """A J1939 DBC file; ConfigError naming the key when it is not one."""
    try:
        db = cantools.database.load_file(path, database_format="dbc")
    except (OSError, cantools.database.errors.Error) as exc:
        raise ConfigError(file=where, key=key, expected="a readable J1939 DBC file",
                          found=path) from exc
    if not isinstance(db, cantools.database.can.Database):
        raise ConfigError(file=where, key=key, expected="a CAN (DBC) database", found=path)
    return db


def pgn_decoder(db: cantools.database.can.Database, signals: Mapping[str, object], where: str,
                source: str) -> tuple[DbcDecoder, dict[int, Any]]:
    """The DBC source's decoder keyed by PGN (any SA): messages by PGN, rules by message."""
    decoder = DbcDecoder.from_map(db, signals, where, source)
    by_pgn: dict[int, Any] = {}
    for msg in db.messages:
        if msg.is_extended_frame:
            by_pgn[J1939Id.parse(msg.frame_id).pgn] = msg
    return decoder, by_pgn


class J1939Source(OdometerSource):
    kind = "j1939"

    def __init__(self, source_id: str, bus: Mapping[str, Any], decoder: DbcDecoder,
                 by_pgn: dict[int, Any], *, address: int | None = None, name: int = 0,
                 clock: Clock = system_clock) -> None:
        super().__init__(source_id, clock)
        self.bus_config = dict(bus)
        self.decoder = decoder
        decoder.counters = self.counters
        self.by_pgn = by_pgn
        self.core = J1939Core(address, name, source_id, self.counters)
        self.odometer = OdometerMonitor(source_id)

    @classmethod
    def from_options(cls, source_id: str, options: Mapping[str, object], where: str) -> Self:
        o = Table.source(options, where, source_id)
        o.reject_unknown({"dbc", "signals", "interface", "channel", "bitrate", "bus_options",
                          "address", "name"})
        db = load_dbc(o.nonempty_str("dbc"), where, f"{o.prefix}.dbc")
        mode = o.data.get("address", "listen-only")
        if mode != "listen-only" and (isinstance(mode, bool) or not isinstance(mode, int)
                                      or not 0 <= mode <= 253):
            raise ConfigError(file=where, key=f"{o.prefix}.address",
                              expected='"listen-only" or a source address 0..253', found=mode)
        name = o.int("name", DEFAULT_NAME, min=0, max=2**64 - 1)
        decoder, by_pgn = pgn_decoder(db, o.mapping("signals", {}), where, source_id)
        for key in o.mapping("signals", {}):  # every configured signal has a J1939 PGN
            msg, _ = _find_signal(db, key, where)
            if not msg.is_extended_frame:
                raise ConfigError(file=where, key=f"signals.{key}",
                                  expected="a signal of a 29-bit (J1939) message", found=key)
        return cls(source_id, bus_kwargs(o), decoder, by_pgn,
                   address=None if mode == "listen-only" else int(mode), name=name)

    def handle(self, arb_id: int, data: bytes, now: int, ts_ns: int,
               status: TimeStatus) -> tuple[list[Reading | Event], list[tuple[int, bytes]]]:
        """One frame through the core: readings/events to emit, frames to send."""
        out: list[Reading | Event] = []
        try:
            messages, send = self.core.receive(arb_id, data, now)
        except DecodeError as exc:
            self.counters[exc.reason] += 1
            return self._first(exc, ts_ns), []
        for msg in messages:
            try:
                if msg.pgn == PGN_DM1:
                    out += self.core.dm1(msg, ts_ns)
                    continue
                dbc_msg = self.by_pgn.get(msg.pgn)
                if dbc_msg is None:
                    self.counters["unknown-pgn"] += 1
                    continue
                out += self.decoder.decode(dbc_msg.frame_id, msg.data, True, now, ts_ns, status)
            except DecodeError as exc:
                self.counters[exc.reason] += 1
                out += self._first(exc, ts_ns)
        return out, send

    def _first(self, exc: DecodeError, ts_ns: int) -> list[Reading | Event]:
        if self.counters[exc.reason] == 1:  # first of its kind: an event, then counters
            return [Event("j1939-bad-message", str(exc)[:512], ts_ns, self.id,
                          (("reason", exc.reason),))]
        return []

    async def _run(self, emit: Emit) -> None:
        while True:
            bus = await open_bus(self.bus_config, self.id, self.counters)
            reader = can.AsyncBufferedReader()
            notifier = can.Notifier(bus, [reader], loop=asyncio.get_running_loop())
            try:
                self._send(bus, self.core.start())
                await self._listen(bus, reader, emit)
            finally:
                notifier.stop(timeout=1.0)
                bus.shutdown()
            await asyncio.sleep(REOPEN_PAUSE_S)  # the bus failed under us: a breath, then reopen

    async def _listen(self, bus: can.BusABC, reader: can.AsyncBufferedReader,
                      emit: Emit) -> None:
        while True:
            msg = await reader.get_message()
            if msg.is_error_frame or msg.is_remote_frame or not msg.is_extended_id:
                self.counters["not-j1939"] += 1
                continue
            ts_ns, status = self.clock()
            now = time.monotonic_ns()
            items, send = self.handle(msg.arbitration_id, bytes(msg.data), now, ts_ns, status)
            self._send(bus, send)
            for item in items:
                await emit(item)
                if isinstance(item, Reading):
                    event = self._integrity(item, now)
                    if event is not None:
                        await emit(event)
            self._save_odometer()

    def _send(self, bus: can.BusABC, frames: list[tuple[int, bytes]]) -> None:
        for arb_id, data in frames:
            try:
                bus.send(can.Message(arbitration_id=arb_id, data=data, is_extended_id=True),
                         timeout=0.1)
            except (can.CanError, OSError):
                self.counters["send-error"] += 1

    def _integrity(self, reading: Reading, now: int) -> Event | None:
        if not isinstance(reading.value, int | float):
            return None
        if reading.name == "Vehicle.Speed":
            self.odometer.speed(float(reading.value))
        elif reading.name == "Vehicle.TraveledDistance":
            return self.odometer.odometer(float(reading.value), now, reading.ts_ns)
        return None



PROTOCOL_PGNS: tuple[tuple[int, str, str], ...] = (
    (PGN_TP_CM, "TP.CM", "transport connection management: BAM, RTS, CTS, EOM ack, abort"),
    (PGN_TP_DT, "TP.DT", "transport data packets (sequence number + 7 bytes)"),
    (PGN_ADDRESS_CLAIMED, "Address Claimed", "our NAME when claiming; contention by NAME"),
    (PGN_DM1, "DM1", "active DTCs: SPN/FMI -> j1939-dtc-active / -cleared events"),
)


def markdown_pgns(dbc: str | None = None) -> str:
    """The PGNs the core handles and those of the example DBC (docs/vehicle.md embeds it)."""
    rows = ["| PGN | name | what | signals (unit) |", "|---|---|---|---|"]
    rows += [f"| {pgn} (0x{pgn:04X}) | {name} | {what} | |" for pgn, name, what in PROTOCOL_PGNS]
    db = load_dbc(dbc or str(Path(__file__).with_name("j1939_example.dbc")))
    for msg in sorted(db.messages, key=lambda m: J1939Id.parse(m.frame_id).pgn):
        pgn = J1939Id.parse(msg.frame_id).pgn
        sigs = ", ".join(f"{s.name} ({s.unit or '-'}, x{s.scale:g})" for s in msg.signals)
        rows.append(f"| {pgn} (0x{pgn:04X}) | {msg.name} | {(msg.comment or '').strip()} "
                    f"| {sigs} |")
    return "\n".join(rows) + "\n"
