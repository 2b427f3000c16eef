"""One OBD-II request and the answers of every ECU to it (sans-I/O, ISO 15765-4).

Addressing (ISO 15765-4 s6.3):

* 11-bit: functional request 0x7DF; ECU n (0..7) is asked physically on 0x7E0+n and answers
  on 0x7E8+n.
* 29-bit (normal fixed): functional 0x18DB33F1; ECU ``ee`` is asked on 0x18DAeeF1 and answers
  on 0x18DAF1ee.

A :class:`Transaction` is opened with the request payload and ``now``; the driver sends
``transaction.request_frame`` and feeds every received frame with ``receive(arb_id, data,
now)``, which returns the flow-control frames to send. The transaction is over when
``done(now)``: every expected responder has answered, or the P2 window (50 ms in J1979,
longer for slow gateways; configurable) has passed since the request or the last frame (a
half-received message extends it to its N_Cr deadline; never beyond window + N_Cr in total,
so a node babbling on a response id cannot hold a request open).
Frames from ids outside the response range are ignored (counted by the driver); hostile frames
from a responder are recorded in ``errors`` and never raise out of :meth:`receive`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from agent.errors import ConfigError, DecodeError
from firmware_adapters.obd.isotp import N_CR_NS, Reassembler, single_frame


@dataclass(frozen=True, slots=True)
class Frame:
    arb_id: int
    data: bytes
    extended: bool


@dataclass(frozen=True, slots=True)
class Addressing:
    bits: int = 11

    def __post_init__(self) -> None:
        if self.bits not in (11, 29):
            raise ConfigError(key="addressing", expected="11 or 29", found=self.bits)

    @property
    def extended(self) -> bool:
        return self.bits == 29

    @property
    def functional_id(self) -> int:
        return 0x7DF if self.bits == 11 else 0x18DB33F1

    def physical_id(self, ecu: int) -> int:
        return 0x7E0 + ecu if self.bits == 11 else 0x18DA00F1 | ecu << 8

    def response_id(self, ecu: int) -> int:
        return 0x7E8 + ecu if self.bits == 11 else 0x18DAF100 | ecu

    @property
    def response_filter(self) -> dict[str, int | bool]:
        """A python-can filter passing only response ids (in-kernel on SocketCAN)."""
        if self.bits == 11:
            return {"can_id": 0x7E8, "can_mask": 0x7F8, "extended": False}
        return {"can_id": 0x18DAF100, "can_mask": 0x1FFFFF00, "extended": True}

    def ecu_of(self, arb_id: int) -> int | None:
        """The responder number of a response id, None for anything else."""
        if self.bits == 11:
            return arb_id - 0x7E8 if 0x7E8 <= arb_id <= 0x7EF else None
        return arb_id & 0xFF if arb_id & 0x1FFFFF00 == 0x18DAF100 else None


@dataclass(slots=True)
class Transaction:
    """One request in flight. ``answers`` maps responder number -> complete payload."""

    addressing: Addressing
    payload: bytes
    started_ns: int
    window_ns: int
    expected: frozenset[int] = frozenset()
    target: int | None = None  # physical request to one ECU; None = functional
    max_length: int = 256
    answers: dict[int, bytes] = field(default_factory=dict)
    errors: list[DecodeError] = field(default_factory=list)
    _reassemblers: dict[int, Reassembler] = field(default_factory=dict)
    _last_ns: int = 0

    def __post_init__(self) -> None:
        self._last_ns = self.started_ns

    @property
    def request_frame(self) -> Frame:
        a = self.addressing
        arb = a.functional_id if self.target is None else a.physical_id(self.target)
        return Frame(arb, single_frame(self.payload), a.extended)

    def receive(self, arb_id: int, data: bytes, now: int) -> list[Frame]:
        ecu = self.addressing.ecu_of(arb_id)
        if ecu is None or (self.target is not None and ecu != self.target):
            return []
        self._last_ns = now
        r = self._reassemblers.setdefault(ecu, Reassembler(self.max_length))
        try:
            got = r.feed(data, now)
        except DecodeError as exc:
            self.errors.append(exc)
            return []
        if got.message is not None:
            if ecu in self.answers:  # a second message from one ECU: ISO 15765-4 forbids it
                self.errors.append(DecodeError("two answers from one ECU", reason="duplicate"))
            else:
                self.answers[ecu] = got.message
        if got.flow_control is not None:
            a = self.addressing
            return [Frame(a.physical_id(ecu), got.flow_control, a.extended)]
        return []

    def incomplete(self) -> list[DecodeError]:
        """Messages still half received when the transaction ends (a lost or short CF)."""
        return [DecodeError(f"ECU {ecu}: multi-frame answer incomplete", reason="isotp-incomplete")
                for ecu, r in sorted(self._reassemblers.items()) if r.busy]

    def deadline(self) -> int:
        """When the window closes if nothing else arrives (the driver's one timer). A message
        half received keeps it open until its N_Cr deadline: slow senders are legal."""
        pending = [r.deadline for r in self._reassemblers.values() if r.deadline is not None]
        # Hard cap: a node that babbles on a response id must not hold the request open.
        return min(max([self._last_ns + self.window_ns, *pending]),
                   self.started_ns + self.window_ns + N_CR_NS)

    def done(self, now: int) -> bool:
        busy = any(r.busy for e, r in self._reassemblers.items() if e in self.expected)
        if self.expected and self.expected <= self.answers.keys() and not busy:
            return True
        if self.target is not None and self.target in self.answers:
            return True
        return now >= self.deadline()


CAN_11 = Addressing(11)
