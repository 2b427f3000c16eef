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

A :class:`Route` replaces the OBD ids for one manufacturer ECU (UDS ReadDataByIdentifier on,
say, 0x7E4 -> 0x7EC or 0x17FC007B -> 0x17FE007B): a physical request to ``route.request_id``,
one responder on ``route.response_id`` (answer key 0), flow control back to the request id.

Rules that hold for every service (ISO 14229-1 s10.2 and annex A, ISO 15765-4 s6.3):

* **Response pending**: ``7F <sid> 78`` is not an answer. The ECU asks for more time; the
  client restarts its timer with P2*server (``p2_star_ns``, 5 s by default, ISO 14229-2
  table 4) on each such frame. An ECU may send it repeatedly; after ``max_pending`` of them
  in one request we give up on that ECU (``response-pending-limit``).
* **Match**: a message whose service byte is neither ``sid + 0x40`` nor ``7F sid``, or whose
  echoed PID / DID is not one we asked for, answers some other request (a late reply, or one
  an adapter kept in its buffer): ``mismatch`` in ``errors``, counted in ``mismatched``, and
  never taken as the answer.
* ``heard`` is true once any frame arrived from a responder, even a broken one: a car whose
  ECUs talk is awake, whatever they said.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from agent.errors import ConfigError, DecodeError
from firmware_adapters.obd.isotp import N_CR_NS, Reassembler, single_frame

P2_STAR_NS = 5_000_000_000  # ISO 14229-2 table 4: P2*server max 5000 ms
MAX_PENDING = 20
NRC_RESPONSE_PENDING = 0x78
NEGATIVE = 0x7F


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


@dataclass(frozen=True, slots=True)
class Route:
    """A physical request/response id pair of one ECU (a UDS profile names them)."""

    request_id: int
    response_id: int

    def __post_init__(self) -> None:
        for value in (self.request_id, self.response_id):
            if not 0 <= value <= 0x1FFFFFFF:
                raise ConfigError(key="ecu id", expected="a CAN id 0..0x1FFFFFFF", found=value)

    @property
    def extended(self) -> bool:
        return self.request_id > 0x7FF or self.response_id > 0x7FF


def answers_request(request: bytes, message: bytes) -> bool:
    """Whether ``message`` can be the answer to ``request`` (service byte and echo)."""
    if not request or not message:
        return False
    sid = request[0]
    if message[0] == NEGATIVE:
        return len(message) >= 2 and message[1] == sid
    if message[0] != (sid + 0x40) & 0xFF:
        return False
    if sid in (0x01, 0x02):  # the first PID echoed must be one we asked for
        asked = request[1::2] if sid == 0x02 else request[1:]
        return len(message) < 2 or message[1] in asked
    if sid in (0x09, 0x22):  # the PID / DID echoed
        echo = request[1:3] if sid == 0x22 else request[1:2]
        return message[1:1 + len(echo)] == echo
    return True


@dataclass(slots=True)
class Transaction:
    """One request in flight. ``answers`` maps responder number -> complete payload."""

    addressing: Addressing
    payload: bytes
    started_ns: int
    window_ns: int
    expected: frozenset[int] = frozenset()
    target: int | None = None  # physical request to one ECU; None = functional
    route: Route | None = None  # a manufacturer ECU's own ids (overrides the OBD ids)
    max_length: int = 256
    p2_star_ns: int = P2_STAR_NS
    max_pending: int = MAX_PENDING
    answers: dict[int, bytes] = field(default_factory=dict)
    errors: list[DecodeError] = field(default_factory=list)
    heard: bool = False
    mismatched: int = 0
    _reassemblers: dict[int, Reassembler] = field(default_factory=dict)
    _pending: dict[int, tuple[int, int]] = field(default_factory=dict)  # ecu -> (count, until)
    _last_ns: int = 0

    def __post_init__(self) -> None:
        self._last_ns = self.started_ns
        if self.route is not None:
            self.target = 0

    @property
    def request_frame(self) -> Frame:
        if self.route is not None:
            return Frame(self.route.request_id, single_frame(self.payload), self.route.extended)
        a = self.addressing
        arb = a.functional_id if self.target is None else a.physical_id(self.target)
        return Frame(arb, single_frame(self.payload), a.extended)

    def _ecu_of(self, arb_id: int) -> int | None:
        if self.route is not None:
            return 0 if arb_id == self.route.response_id else None
        ecu = self.addressing.ecu_of(arb_id)
        if ecu is None or (self.target is not None and ecu != self.target):
            return None
        return ecu

    def _flow_control_id(self, ecu: int) -> tuple[int, bool]:
        if self.route is not None:
            return self.route.request_id, self.route.extended
        return self.addressing.physical_id(ecu), self.addressing.extended

    def receive(self, arb_id: int, data: bytes, now: int) -> list[Frame]:
        ecu = self._ecu_of(arb_id)
        if ecu is None:
            return []
        self.heard = True
        self._last_ns = now
        r = self._reassemblers.setdefault(ecu, Reassembler(self.max_length))
        try:
            got = r.feed(data, now)
        except DecodeError as exc:
            self.errors.append(exc)
            return []
        if got.message is not None:
            self._message(ecu, got.message, now)
        if got.flow_control is not None:
            fc_id, extended = self._flow_control_id(ecu)
            return [Frame(fc_id, got.flow_control, extended)]
        return []

    def _message(self, ecu: int, message: bytes, now: int) -> None:
        if not answers_request(self.payload, message):
            self.mismatched += 1
            self.errors.append(DecodeError(f"ECU {ecu}: answer {message[:4].hex()} does not "
                                           f"match request {self.payload.hex()}",
                                           reason="mismatch"))
            return
        if len(message) == 3 and message[0] == NEGATIVE and message[2] == NRC_RESPONSE_PENDING:
            count = self._pending.get(ecu, (0, 0))[0] + 1
            if count > self.max_pending:
                self._pending.pop(ecu, None)
                self.errors.append(DecodeError(f"ECU {ecu}: {count} response-pending frames",
                                               reason="response-pending-limit"))
                return
            self._pending[ecu] = (count, now + self.p2_star_ns)  # P2* restarts on each 0x78
            return
        self._pending.pop(ecu, None)
        if ecu in self.answers:  # a second message from one ECU: ISO 15765-4 forbids it
            self.errors.append(DecodeError("two answers from one ECU", reason="duplicate"))
        else:
            self.answers[ecu] = message

    @property
    def pending(self) -> frozenset[int]:
        """ECUs that asked for more time (NRC 0x78) and have not answered yet."""
        return frozenset(self._pending)

    def incomplete(self) -> list[DecodeError]:
        """Messages still half received when the transaction ends (a lost or short CF), and
        ECUs that said "response pending" and then never answered."""
        out = [DecodeError(f"ECU {ecu}: multi-frame answer incomplete", reason="isotp-incomplete")
               for ecu, r in sorted(self._reassemblers.items()) if r.busy]
        out += [DecodeError(f"ECU {ecu}: no answer within P2* after response pending",
                            reason="response-pending-timeout") for ecu in sorted(self._pending)]
        return out

    def deadline(self) -> int:
        """When the window closes if nothing else arrives (the driver's one timer). A message
        half received keeps it open until its N_Cr deadline: slow senders are legal. An ECU
        that sent "response pending" keeps it open until its P2* deadline."""
        partial = [r.deadline for r in self._reassemblers.values() if r.deadline is not None]
        # Hard cap: a node that babbles on a response id must not hold the request open.
        normal = min(max([self._last_ns + self.window_ns, *partial]),
                     self.started_ns + self.window_ns + N_CR_NS)
        return max([normal, *(until for _, until in self._pending.values())])

    def done(self, now: int) -> bool:
        busy = any(r.busy for e, r in self._reassemblers.items() if e in self.expected)
        if self.expected and self.expected <= self.answers.keys() and not busy \
                and not self._pending:
            return True
        if self.target is not None and self.target in self.answers:
            return True
        return now >= self.deadline()


CAN_11 = Addressing(11)
