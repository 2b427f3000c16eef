"""Modbus RTU framing facts (sans-I/O): CRC, frame sizes, line timing, fault diagnosis.

Scope: what the driver needs to say *why* a request failed (pymodbus reports every bad
reply as "no response"), and what the line simulator and the benchmark need to know how
long frames take on the wire.

References: "MODBUS over Serial Line Specification and Implementation Guide V1.02"
s2.5.1 (RTU frame: address, PDU, CRC-16 low byte first; 3.5 character silent interval
between frames, fixed at 1.75 ms above 19200 baud), s6.2.2 (CRC-16, polynomial 0xA001
reflected, initial 0xFFFF); "MODBUS Application Protocol V1.1b3" s6.3/6.4 (read holding /
input registers: request 5 PDU bytes, reply 2 + 2N, exception reply function | 0x80).
"""

from __future__ import annotations

from dataclasses import dataclass


def crc16(frame: bytes) -> int:
    """Modbus CRC-16 of ``frame`` as an int; on the wire it is sent low byte first."""
    crc = 0xFFFF
    for byte in frame:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc


def with_crc(frame: bytes) -> bytes:
    return frame + crc16(frame).to_bytes(2, "little")


def crc_ok(frame: bytes) -> bool:
    return len(frame) >= 4 and crc16(frame[:-2]) == int.from_bytes(frame[-2:], "little")


def read_request_size() -> int:
    """Address + function + start (2) + count (2) + CRC (2)."""
    return 8


def read_reply_size(count: int) -> int:
    """Address + function + byte count + 2 x count data bytes + CRC (2)."""
    return 5 + 2 * count


@dataclass(frozen=True, slots=True)
class LineFormat:
    """Serial character format: 1 start bit + data bits + parity bit (if any) + stop bits."""

    baudrate: int
    bytesize: int = 8
    parity: str = "N"
    stopbits: int = 1

    def __post_init__(self) -> None:
        if self.baudrate <= 0 or self.bytesize not in (7, 8) or self.stopbits not in (1, 2) \
                or self.parity not in ("N", "E", "O"):
            raise ValueError(f"unsupported line format {self}")

    @property
    def bits_per_char(self) -> int:
        return 1 + self.bytesize + (0 if self.parity == "N" else 1) + self.stopbits

    @property
    def char_time_s(self) -> float:
        return self.bits_per_char / self.baudrate

    @property
    def silent_interval_s(self) -> float:
        """t3.5: 3.5 characters, or 1.75 ms above 19200 baud (V1.02 s2.5.1.1)."""
        return 0.00175 if self.baudrate > 19200 else 3.5 * self.char_time_s

    def transaction_time_s(self, count: int) -> float:
        """Wire time of one read of ``count`` registers: both frames, each followed by t3.5."""
        chars = read_request_size() + read_reply_size(count)
        return chars * self.char_time_s + 2 * self.silent_interval_s


# Reasons a read failed, as counted by the driver.
NO_RESPONSE = "no-response"
CRC_ERROR = "crc-error"
SHORT_FRAME = "short-frame"
WRONG_UNIT = "wrong-unit"
GARBAGE = "garbage"


def diagnose_reply(received: bytes, unit: int, function: int) -> str:
    """Why the bytes received after a request did not make a reply for ``unit``.

    ``received`` is everything the line delivered between the request and the timeout.
    """
    if not received:
        return NO_RESPONSE
    if received[0] != unit and len(received) >= 4 and _complete(received) \
            and crc_ok(received[:_expected_size(received)]):
        return WRONG_UNIT
    if len(received) < 5:
        return SHORT_FRAME
    size = _expected_size(received)
    if size is None:
        return GARBAGE
    if len(received) < size:
        return SHORT_FRAME
    if not crc_ok(received[:size]):
        return CRC_ERROR
    if received[0] != unit:
        return WRONG_UNIT
    return GARBAGE if received[1] & 0x7F != function else NO_RESPONSE


def _expected_size(frame: bytes) -> int | None:
    if len(frame) < 3:
        return None
    function = frame[1]
    if function & 0x80:
        return 5  # address, function | 0x80, exception code, CRC
    if function in (3, 4):
        return 5 + frame[2]
    return None


def _complete(frame: bytes) -> bool:
    size = _expected_size(frame)
    return size is not None and len(frame) >= size
