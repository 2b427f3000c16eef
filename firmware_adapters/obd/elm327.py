"""ELM327 adapter dialogue (sans-I/O): init sequence, replies, frame lines, status lines.

Scope: bytes from the adapter in, :class:`Reply` values out; commands out as bytes. No serial
port, no clock. Rules (ELM327 datasheet, Elm Electronics, v2.3):

* Every reply ends with the prompt ``>``; lines end with CR (LF if ATL1). The parser splits
  replies at the prompt, lines at CR/LF, drops NUL bytes (sent by some clones after reset) and
  refuses a reply longer than ``max_reply`` bytes without a prompt (a babbling adapter).
* Init (:data:`INIT_COMMANDS`): ``ATZ`` reset, ``ATE0`` echo off, ``ATL0`` no LF, ``ATS0`` no
  spaces (a third fewer bytes on the wire), ``ATH1`` headers on (so we see which ECU answered
  and the raw ISO-TP PCI bytes, reassembled by the same core as on CAN), ``ATSP0`` protocol
  auto-detect, then a ``0100`` to make it search (``SEARCHING...`` is a status line, not an
  answer) and ``ATDPN`` to learn the protocol found (``A6`` = auto, CAN 11-bit 500 kbit/s).
* Frame lines after ``ATH1 ATS0`` are ``<id><bytes>``: 3 hex digits of id for 11-bit
  protocols (6, 8), 8 for 29-bit (7, 9, A). Non-CAN protocols (1-5: J1850, ISO 9141, KWP)
  are refused: their headers are not CAN ids and they carry one PID per request.
* Stale replies: a reply left in the adapter by another program, or one that arrives after
  we gave up on it, shifts every later reply by one. The driver flushes the port at open and
  resynchronises after any reply that does not match its request: it sends ``ATI`` and
  drops replies until one carries the version banner (:func:`is_banner`).
* Manufacturer ECUs (UDS profiles) are addressed with ``ATSH`` (3 hex digits on 11-bit;
  on 29-bit ``ATCP`` for the top 5 bits and 6 digits for the rest), ``ATCRA`` to see only
  that ECU's answers, and, where the ECU's request id is not the one the adapter derives for
  flow control (response id - 8 on 11-bit, the last two bytes swapped on 29-bit),
  ``ATFCSH/ATFCSD/ATFCSM1``. A 29-bit ECU on an 11-bit protocol needs ``ATSP7`` (500 kbit/s)
  or ``ATSP9`` (250 kbit/s), and back (:func:`header_commands`).
* Status lines (:data:`STATUS_LINES`) become the reply's ``status``: ``NO DATA`` (nobody
  answered: a silent ECU or ignition off), ``CAN ERROR``, ``BUFFER FULL``, ``STOPPED`` (we
  sent before the prompt), ``?`` (command refused), ``UNABLE TO CONNECT`` ... Anything else
  that is neither a frame nor a status is garbage: counted, skipped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from agent.errors import AdapterUnavailable, DecodeError, OversizeInput

PROMPT = b">"
INIT_COMMANDS: tuple[str, ...] = ("ATZ", "ATE0", "ATL0", "ATS0", "ATH1", "ATSP0")
# Clones that refuse these still work: the parser splits on LF too and reads spaced hex.
OPTIONAL_COMMANDS = frozenset({"ATL0", "ATS0"})
PROBE_COMMAND = "0100"
PROTOCOL_COMMAND = "ATDPN"

# ELM327 datasheet, "Messages and what they mean": status line -> reason code.
STATUS_LINES: dict[str, str] = {
    "OK": "ok",
    "NO DATA": "no-data",
    "SEARCHING...": "searching",
    "STOPPED": "stopped",
    "?": "refused",
    "CAN ERROR": "can-error",
    "BUFFER FULL": "buffer-full",
    "BUS BUSY": "bus-busy",
    "BUS ERROR": "bus-error",
    "DATA ERROR": "data-error",
    "<DATA ERROR": "data-error",
    "<RX ERROR": "rx-error",
    "FB ERROR": "fb-error",
    "UNABLE TO CONNECT": "unable-to-connect",
    "BUS INIT: ...ERROR": "bus-init-error",
    "BUS INIT:ERROR": "bus-init-error",
    "LV RESET": "lv-reset",
    "ACT ALERT": "act-alert",
}
# Statuses that say "no answer from the car" (not an adapter fault).
SILENT_STATUSES = frozenset({"no-data", "unable-to-connect", "can-error", "bus-init-error"})
_HEX = re.compile(r"^[0-9A-F]+$")
_ERR = re.compile(r"^ERR\d\d$")
_VERSION = re.compile(r"^(ELM327|OBDII|STN\d+).*", re.IGNORECASE)

# ATDPN answer (without the A "auto" prefix) -> CAN id bits; others are not CAN.
CAN_PROTOCOLS: dict[str, int] = {"6": 11, "7": 29, "8": 11, "9": 29, "A": 29}


@dataclass(frozen=True, slots=True)
class Reply:
    """Everything the adapter said up to one prompt, sorted into kinds."""

    frames: tuple[tuple[int, bytes], ...] = ()
    status: tuple[str, ...] = ()
    text: tuple[str, ...] = ()  # other printable lines: version banner, ATDPN, ATRV answers
    garbage: int = 0

    @property
    def silent(self) -> bool:
        return not self.frames and any(s in SILENT_STATUSES for s in self.status)


@dataclass(slots=True)
class ReplyParser:
    """Split the adapter's byte stream into replies. ``header_digits``: 3 or 8 (0 = unknown)."""

    header_digits: int = 3
    max_reply: int = 4096
    _buf: bytearray = field(default_factory=bytearray)

    def receive_data(self, data: bytes) -> list[Reply]:
        self._buf += data.replace(b"\x00", b"")
        replies = []
        while True:
            end = self._buf.find(PROMPT)
            if end < 0:
                break
            raw = bytes(self._buf[:end])
            del self._buf[:end + 1]
            replies.append(self.parse_reply(raw))
        if len(self._buf) > self.max_reply:
            self._buf.clear()
            raise OversizeInput(f"adapter sent over {self.max_reply} bytes without a prompt",
                                reason="elm-oversize")
        return replies

    def clear(self) -> None:
        self._buf.clear()

    def parse_reply(self, raw: bytes) -> Reply:
        frames, status, text, garbage = [], [], [], 0
        for line in re.split(rb"[\r\n]+", raw):
            try:
                s = line.decode("ascii").strip().upper()
            except UnicodeDecodeError:
                garbage += 1
                continue
            if not s:
                continue
            if s in STATUS_LINES:
                status.append(STATUS_LINES[s])
            elif _ERR.match(s):
                status.append("internal-error")
            else:
                try:
                    frames.append(self.parse_frame(s))
                except DecodeError:
                    if s.isprintable() and len(s) <= 64:
                        text.append(s)  # banner, ATDPN, ATRV: the caller decides
                    else:
                        garbage += 1
        return Reply(tuple(frames), tuple(status), tuple(text), garbage)

    def parse_frame(self, line: str) -> tuple[int, bytes]:
        digits = line.replace(" ", "")
        # Unknown protocol (0): with ATS0, 3 id digits + whole bytes is odd, 8 + bytes even.
        n = self.header_digits or (3 if len(digits) % 2 else 8)
        if not _HEX.match(digits) or len(digits) <= n or (len(digits) - n) % 2:
            raise DecodeError(f"not a frame line: {line[:32]!r}", reason="elm-garbage")
        data = bytes.fromhex(digits[n:])
        if len(data) > 8:
            raise DecodeError("frame line longer than 8 data bytes", reason="elm-garbage")
        return int(digits[:n], 16), data


RESYNC_COMMAND = "ATI"


def is_banner(reply: Reply) -> bool:
    """The adapter's version banner (``ELM327 v1.5``): the answer to ATZ and ATI."""
    return any(_VERSION.match(line) for line in reply.text)


# The other protocol number at the same bit rate: 11-bit <-> 29-bit (ELM327 ATSP table).
OTHER_WIDTH = {"6": "7", "7": "6", "8": "9", "9": "8"}
DEFAULT_PRIORITY = 0x18  # ATCP default; ISO 15765-4 29-bit ids start 0x18


@dataclass(frozen=True, slots=True)
class Header:
    """What the adapter is set to send to and listen for (None: OBD functional defaults)."""

    bits: int
    request_id: int | None = None
    response_id: int | None = None


def header_commands(old: Header, new: Header, protocol: str) -> list[str]:
    """AT commands that take the adapter from header state ``old`` to ``new``. ``protocol``
    is the ATDPN number found at init ("6": 11-bit 500 kbit/s)."""
    cmds: list[str] = []
    if new.bits != old.bits:
        same = CAN_PROTOCOLS.get(protocol) == new.bits
        fallback = "7" if new.bits == 29 else "6"
        cmds.append("ATSP" + (protocol if same else OTHER_WIDTH.get(protocol, fallback)))
    if new.request_id is None:
        if old.request_id is not None:
            cmds += ["ATCP18", "ATSHDB33F1"] if new.bits == 29 else ["ATSH7DF"]
            cmds += ["ATCRA", "ATFCSM0"]
        return cmds
    req, resp = new.request_id, new.response_id
    assert resp is not None
    if new.bits == 29:
        if old.request_id is None or old.request_id >> 24 != req >> 24:
            cmds.append(f"ATCP{req >> 24:02X}")
        cmds += [f"ATSH{req & 0xFFFFFF:06X}", f"ATCRA{resp:08X}"]
        derived = (resp & 0x1FFF0000) | (resp & 0xFF) << 8 | (resp >> 8) & 0xFF
    else:
        cmds += [f"ATSH{req:03X}", f"ATCRA{resp:03X}"]
        derived = resp - 8
    if derived != req:  # the adapter would send flow control to the wrong ECU
        cmds += [f"ATFCSH{req:08X}" if new.bits == 29 else f"ATFCSH{req:03X}", "ATFCSD300000",
                 "ATFCSM1"]
    elif old.request_id is not None:
        cmds.append("ATFCSM0")
    return cmds


def command(text: str) -> bytes:
    """One command line. Only printable ASCII: a CR inside would be two commands."""
    if not text.isascii() or not text.isprintable() or len(text) > 64:
        raise ValueError(f"bad ELM327 command {text!r}")
    return text.encode("ascii") + b"\r"


def obd_command(payload: bytes) -> bytes:
    return command(payload.hex().upper())


def protocol_bits(reply: Reply) -> int:
    """The CAN id size from an ATDPN reply (``A6`` -> 11); AdapterUnavailable if not CAN."""
    for line in reply.text:
        proto = line[1:] if line.startswith("A") and len(line) == 2 else line
        if proto in CAN_PROTOCOLS:
            return CAN_PROTOCOLS[proto]
        if len(proto) == 1 and proto.isalnum():
            raise AdapterUnavailable(f"ELM327 found protocol {proto}: not CAN, unsupported",
                                     reason="elm-not-can")
    raise DecodeError(f"no protocol number in ATDPN reply {reply!r}"[:200],
                      reason="elm-bad-protocol")
