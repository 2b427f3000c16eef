"""A small sans-I/O ISO-TP (ISO 15765-2) core for OBD-II: segmenting and reassembly.

Why our own and not can-isotp: OBD-II (ISO 15765-4) sends one *functional* request (0x7DF or
0x18DB33F1) that several ECUs answer at once, each on its own response id, each possibly
multi-frame (a VIN is 20 bytes). can-isotp binds one stack (with its own thread and timers) to
one rxid/txid pair, so a functional request needs one stack per possible responder and timing
we cannot pass in. OBD requests are at most 7 bytes (a single frame), so the only hard part is
receiving: one :class:`Reassembler` per responder id, fed frames and ``now``, answering a
first frame with the flow control frame to send. That is ~150 lines, testable bytes-in/
events-out with time as an argument (the aioquic rule), and it serves the ELM327 path too (with
headers on, an ELM327 prints the raw ISO-TP frames). can-isotp is used in the tests as an
independent peer to check this core against.

Rules (ISO 15765-2:2016, classic CAN, 8-byte frames):

* PCI high nibble: 0 single frame (SF_DL 1..7), 1 first frame (FF_DL 8..4095, 12 bits),
  2 consecutive frame (SN 1, 2, ... 15, 0, 1 ...), 3 flow control (FS, BS, STmin).
* A receiver answers a first frame with FC "continue to send" (BS 0 = no more FCs,
  STmin 0). A CF out of sequence, a CF without a FF, a FF too short or longer than
  ``max_length``, a SF whose length does not fit the frame: :class:`DecodeError`.
* N_Cr (time between CFs, 1000 ms default) is checked against ``now``: a stale message is
  dropped with ``reason="isotp-timeout"`` when the next frame arrives or on :meth:`expire`.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.errors import DecodeError, LocalProtocolError

SF, FF, CF, FC = 0x0, 0x1, 0x2, 0x3
FRAME_LEN = 8
PAD = 0xCC  # ISO 15765-4 s6.3.2.1: padding value is free; 0xCC is can-isotp's default
MAX_FF_DL = 0xFFF
FC_CONTINUE = bytes((0x30, 0x00, 0x00)) + bytes((PAD,)) * 5
N_CR_NS = 1_000_000_000


def pad(data: bytes) -> bytes:
    return data + bytes((PAD,)) * (FRAME_LEN - len(data))


def single_frame(payload: bytes) -> bytes:
    """An SF for payloads of 1..7 bytes (every OBD request)."""
    if not 0 < len(payload) <= 7:
        raise LocalProtocolError("a single frame carries 1..7 bytes", reason="isotp-length")
    return pad(bytes((len(payload),)) + payload)


def segment(payload: bytes) -> list[bytes]:
    """All frames of one message: an SF, or a FF then CFs (the sender waits for FC after FF)."""
    if len(payload) <= 7:
        return [single_frame(payload)]
    if len(payload) > MAX_FF_DL:
        raise LocalProtocolError("ISO-TP message longer than 4095 bytes", reason="isotp-length")
    frames = [bytes((0x10 | len(payload) >> 8, len(payload) & 0xFF)) + payload[:6]]
    rest = payload[6:]
    for n, i in enumerate(range(0, len(rest), 7), 1):
        frames.append(pad(bytes((0x20 | n & 0xF,)) + rest[i:i + 7]))
    return frames


@dataclass(frozen=True, slots=True)
class Received:
    """What one frame produced: a complete message, and/or a flow control frame to send."""

    message: bytes | None = None
    flow_control: bytes | None = None


class Reassembler:
    """Receiver side for one responder id. Feed every frame of that id with ``now`` (ns)."""

    def __init__(self, max_length: int = 256, n_cr_ns: int = N_CR_NS) -> None:
        self.max_length = max_length
        self.n_cr_ns = n_cr_ns
        self._buf = bytearray()
        self._expected = 0
        self._next_sn = 0
        self._deadline: int | None = None

    @property
    def busy(self) -> bool:
        return self._deadline is not None

    @property
    def deadline(self) -> int | None:
        """When the next consecutive frame is overdue (N_Cr), None when idle."""
        return self._deadline

    def expire(self, now: int) -> None:
        """Drop a message whose next CF is overdue (N_Cr)."""
        if self._deadline is not None and now > self._deadline:
            self._reset()
            raise DecodeError("consecutive frame overdue (N_Cr)", reason="isotp-timeout")

    def feed(self, data: bytes, now: int) -> Received:
        if not data:
            raise DecodeError("empty CAN frame", reason="isotp-empty")
        if len(data) > FRAME_LEN:
            raise DecodeError("CAN frame longer than 8 bytes", reason="isotp-oversize")
        kind = data[0] >> 4
        if kind != CF and self.busy:
            self._reset()  # a new SF/FF aborts the message in progress (ISO 15765-2 9.8.3)
        if kind == SF:
            size = data[0] & 0xF
            if not 0 < size <= len(data) - 1:
                raise DecodeError(f"single frame length {size} in a {len(data)}-byte frame",
                                  reason="isotp-bad-length")
            return Received(message=bytes(data[1:1 + size]))
        if kind == FF:
            return self._first(data, now)
        if kind == CF:
            return self._consecutive(data, now)
        if kind == FC:
            raise DecodeError("flow control frame where an answer was expected",
                              reason="isotp-unexpected-fc")
        raise DecodeError(f"reserved PCI type {kind:#x}", reason="isotp-bad-pci")

    def _first(self, data: bytes, now: int) -> Received:
        if len(data) != FRAME_LEN:
            raise DecodeError("first frame shorter than 8 bytes", reason="isotp-bad-length")
        size = (data[0] & 0xF) << 8 | data[1]
        if size < 8:
            raise DecodeError(f"first frame length {size} fits a single frame",
                              reason="isotp-bad-length")
        if size > self.max_length:
            raise DecodeError(f"message of {size} bytes, limit {self.max_length}",
                              reason="isotp-oversize")
        self._buf = bytearray(data[2:])
        self._expected = size
        self._next_sn = 1
        self._deadline = now + self.n_cr_ns
        return Received(flow_control=FC_CONTINUE)

    def _consecutive(self, data: bytes, now: int) -> Received:
        if self._deadline is None:
            raise DecodeError("consecutive frame without first frame", reason="isotp-unexpected-cf")
        if now > self._deadline:
            self._reset()
            raise DecodeError("consecutive frame overdue (N_Cr)", reason="isotp-timeout")
        sn = data[0] & 0xF
        if sn != self._next_sn:
            expected = self._next_sn
            self._reset()
            raise DecodeError(f"consecutive frame {sn}, expected {expected}",
                              reason="isotp-wrong-sn")
        self._buf += data[1:]
        self._next_sn = (sn + 1) & 0xF
        self._deadline = now + self.n_cr_ns
        if len(self._buf) >= self._expected:
            message = bytes(self._buf[:self._expected])
            self._reset()
            return Received(message=message)
        return Received()

    def _reset(self) -> None:
        self._buf = bytearray()
        self._expected = 0
        self._next_sn = 0
        self._deadline = None
