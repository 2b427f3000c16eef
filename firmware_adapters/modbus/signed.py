"""Eichrecht (OCMF) meters over Modbus: the Iskra WM3M4C transaction interface.

An Eichrecht meter signs its own billing data: the charge controller writes its OCMF
metadata (gateway, identification), starts a transaction ('B'), stops it ('E'), and reads
back the meter's OCMF payload and its signature over it (S.A.F.E. "Open Charge Metering
Format": ``OCMF|{payload}|{"SA": ..., "SD": hex}``; ECDSA secp256r1 / SHA-256, DER).
The record is passed on unchanged: it is the meter's statement, not ours.

Registers (Iskra "WM3M4/WM3M4C User's manual", OCMF section, holding registers as sent on
the wire; cross-checked with EVerest modules/RsIskraMeter):

    7000 measurement state      7051 command      7052 signature status (15 = OK)
    7053-7055, 7071 time zone, unix time, time status   7056 + 7100.. metadata (<= 240 B)
    7057 + 7612.. payload (ASCII)   7058 + 8188.. signature (DER)   8124.. public key X||Y

Text is two characters a register, high byte first. The public key is given as the hex of
its DER SubjectPublicKeyInfo (OCMF s5: how Transparenzsoftware and OCPP's
SignedMeterValue carry it): the fixed P-256 prefix followed by 04 || X || Y.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping

from agent.errors import AdapterIOError

STATE, COMMAND, STATUS = 7000, 7051, 7052
TIME_ZONE, TIME_HIGH, TIME_STATUS = 7053, 7054, 7071
META_LEN, PAYLOAD_LEN, SIG_LEN = 7056, 7057, 7058
META, PAYLOAD, PUBLIC_KEY, SIGNATURE = 7100, 7612, 8124, 8188
PUBLIC_KEY_REGISTERS = 32
META_MAX_BYTES, PAYLOAD_MAX_BYTES, SIG_MAX_BYTES = 240, 1024, 80
BEGIN, END = 0x4200, 0x4500
IDLE, ACTIVE = 0, 1
STATUS_OK, STATUS_BUSY = 15, (0, 1, 2)  # not initialised, idle, in progress
MAX_READ = 125
# DER SubjectPublicKeyInfo header of an uncompressed P-256 key (RFC 5480): id-ecPublicKey,
# secp256r1, BIT STRING 04 || X || Y.
P256_SPKI_PREFIX = bytes.fromhex("3059301306072A8648CE3D020106082A8648CE3D03010703420004")
SIGNATURE_ALGORITHM = "ECDSA-secp256r1-SHA256"

Read = Callable[[int, int], Awaitable[list[int]]]        # (address, count) -> holding regs
Write = Callable[[int, list[int]], Awaitable[None]]
Wait = Callable[[], Awaitable[None]]


def text_registers(text: bytes) -> list[int]:
    padded = text + b"\0" * (len(text) % 2)
    return [int.from_bytes(padded[i:i + 2], "big") for i in range(0, len(padded), 2)]


def registers_bytes(words: list[int], length: int) -> bytes:
    return b"".join(w.to_bytes(2, "big") for w in words)[:length]


def public_key_hex(words: list[int]) -> str:
    """The meter's key as OCMF/OCPP carry it: hex of the DER SubjectPublicKeyInfo."""
    return (P256_SPKI_PREFIX + registers_bytes(words, 64)).hex().upper()


def ocmf_record(payload: bytes, signature: bytes) -> str:
    """``OCMF|payload|{"SA":...,"SD":...}``: the payload exactly as the meter wrote it."""
    try:
        text = payload.decode("ascii")
    except UnicodeDecodeError:
        raise AdapterIOError("OCMF payload is not ASCII text", reason="ocmf-malformed") from None
    if "|" in text or not text.startswith("{"):
        raise AdapterIOError("OCMF payload is not a JSON object", reason="ocmf-malformed")
    sig = json.dumps({"SA": SIGNATURE_ALGORITHM, "SD": signature.hex().upper()},
                     separators=(",", ":"))
    return f"OCMF|{text}|{sig}"


class SignedMeter:
    """One meter's transaction interface over ``read``/``write`` (holding registers).
    ``wait`` is awaited between status polls (the meter signs in tens of ms)."""

    def __init__(self, read: Read, write: Write, wait: Wait, polls: int = 200) -> None:
        self.read, self.write, self.wait, self.polls = read, write, wait, polls

    async def public_key(self) -> str:
        return public_key_hex(await self.read(PUBLIC_KEY, PUBLIC_KEY_REGISTERS))

    async def state(self) -> int:
        return (await self.read(STATE, 1))[0]

    async def begin(self, metadata: Mapping[str, object], unix_s: int, synced: bool) -> None:
        """Set the meter's clock, write the metadata, start a transaction."""
        await self.write(TIME_HIGH, [(unix_s >> 16) & 0xFFFF, unix_s & 0xFFFF])
        await self.write(TIME_STATUS, [2 if synced else 0])
        meta = json.dumps(dict(metadata), separators=(",", ":")).encode("ascii", "replace")
        if len(meta) > META_MAX_BYTES:
            raise AdapterIOError(f"OCMF metadata is {len(meta)} bytes, the meter takes "
                                 f"{META_MAX_BYTES}", reason="ocmf-metadata")
        await self.write(META, text_registers(meta))
        await self.write(META_LEN, [len(meta)])
        await self.write(COMMAND, [BEGIN])
        await self._signed()

    async def end(self) -> str:
        """Stop the transaction; the meter's signed OCMF record of begin and end."""
        await self.write(COMMAND, [END])
        await self._signed()
        return await self.last_record()

    async def last_record(self) -> str:
        payload_len, sig_len = await self.read(PAYLOAD_LEN, 2)
        if not 0 < payload_len <= PAYLOAD_MAX_BYTES or not 0 < sig_len <= SIG_MAX_BYTES:
            raise AdapterIOError(f"OCMF lengths {payload_len}/{sig_len} out of range",
                                 reason="ocmf-malformed")
        payload = await self._read_bytes(PAYLOAD, payload_len)
        signature = await self._read_bytes(SIGNATURE, sig_len)
        return ocmf_record(payload, signature)

    async def _signed(self) -> None:
        for _ in range(self.polls):
            status = (await self.read(STATUS, 1))[0]
            if status == STATUS_OK:
                return
            if status not in STATUS_BUSY:
                raise AdapterIOError(f"meter refused the transaction command (status "
                                     f"{status})", reason="ocmf-refused")
            await self.wait()
        raise AdapterIOError("meter did not sign in time", reason="ocmf-timeout")

    async def _read_bytes(self, address: int, length: int) -> bytes:
        count = (length + 1) // 2
        words: list[int] = []
        while len(words) < count:
            step = min(MAX_READ, count - len(words))
            words += await self.read(address + len(words), step)
        return registers_bytes(words, length)
