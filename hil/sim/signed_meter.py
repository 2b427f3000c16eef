"""The OCMF signing part of a simulated Eichrecht meter (Iskra WM3M4C style), P-256.

An Eichrecht meter signs its own readings: the charge controller starts a transaction,
the meter notes the begin reading; at the end it writes an OCMF dataset (S.A.F.E. "Open
Charge Metering Format", ``OCMF|{payload}|{signature}``) holding the begin and end
readings and signs the payload with its own key (ECDSA secp256r1, SHA-256, DER). The
register interface follows the Iskra WM3M4/WM3M4C user manual (holding registers, the
address sent on the wire):

    7000  measurement state (0 idle, 1 active)
    7051  command (write): 0x4200 'B' begin, 0x4500 'E' end, 0x7200 'r' end
    7052  signature status: 1 idle, 2 in progress, 15 signature OK, 131 invalid state
    7053-7055, 7071  time zone, unix time (high, low), time status (written by the host)
    7056  metadata length (bytes); 7100.. metadata (the host's OCMF fields, JSON, <= 240 B)
    7057  OCMF payload length (bytes); 7612.. payload (ASCII JSON, 2 characters a register)
    7058  signature length (bytes); 8188.. signature (DER, 2 bytes a register)
    8124  public key: 32 registers, the P-256 point's X || Y

The meter's key is made here (tests read it with :attr:`SigningMeter.public_key_der`);
the sim never lets it out of the process otherwise.
"""

from __future__ import annotations

import datetime
import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pymodbus.constants import ExcCodes

if TYPE_CHECKING:
    from hil.sim.meter import MeterModel

STATE, COMMAND, STATUS = 7000, 7051, 7052
META_LEN, PAYLOAD_LEN, SIG_LEN = 7056, 7057, 7058
META, PAYLOAD, PUBLIC_KEY, SIGNATURE = 7100, 7612, 8124, 8188
META_MAX_BYTES, PAYLOAD_MAX_BYTES = 240, 2 * (PUBLIC_KEY - PAYLOAD)
BEGIN, END, END_R = 0x4200, 0x4500, 0x7200
IDLE, IN_PROGRESS, SIGNATURE_OK, INVALID_STATE, INVALID_FORMAT = 1, 2, 15, 131, 252
HOST_FIELDS = ("FV", "GI", "GS", "GV", "PG", "IS", "IL", "IF", "IT", "ID", "TT", "CT", "CI")


class SigningMeter:
    def __init__(self, model: MeterModel, clock: Callable[[], float]) -> None:
        self.model, self.clock = model, clock
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.regs: dict[int, int] = {STATE: 0, STATUS: IDLE}
        self.begin_wh: int | None = None
        self.begin_time = ""
        self.transactions = 0
        self.records: list[str] = []  # every OCMF dataset produced, for the tests
        point = self.key.public_key().public_bytes(serialization.Encoding.X962,
                                                   serialization.PublicFormat.UncompressedPoint)
        self._store_bytes(PUBLIC_KEY, point[1:])

    @property
    def public_key_der(self) -> bytes:
        return self.key.public_key().public_bytes(serialization.Encoding.DER,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo)

    # ------------------------------------------------------------------ register access

    def render(self, start: int, registers: list[int]) -> None:
        for address, word in self.regs.items():
            if 0 <= address - start < len(registers):
                registers[address - start] = word

    def write(self, address: int, values: list[int], start: int,
              registers: list[int]) -> ExcCodes | None:
        for offset, word in enumerate(values):
            self.regs[address + offset] = word
        if address <= COMMAND < address + len(values):
            self._command(self.regs[COMMAND])
        self.render(start, registers)
        return None

    def _command(self, command: int) -> None:
        if command == BEGIN:
            if self.regs[STATE] == 1:
                self.regs[STATUS] = INVALID_STATE
                return
            self.begin_wh, self.begin_time = self.model.energy_wh()[0], self._timestamp()
            self.transactions += 1
            self.regs[STATE] = 1
            self._publish([self._reading("B", self.begin_wh, self.begin_time)])
        elif command in (END, END_R):
            if self.regs[STATE] != 1 or self.begin_wh is None:
                self.regs[STATUS] = INVALID_STATE
                return
            end_wh = self.model.energy_wh()[0]
            self.regs[STATE] = 0
            self._publish([self._reading("B", self.begin_wh, self.begin_time),
                           self._reading("E", end_wh, self._timestamp())])
        else:
            self.regs[STATUS] = INVALID_STATE

    # ------------------------------------------------------------------ the dataset

    def _metadata(self) -> dict[str, object]:
        length = self.regs.get(META_LEN, 0)
        if not 0 < length <= META_MAX_BYTES:
            return {}
        raw = self._read_bytes(META, length)
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return {}
        return {k: v for k, v in data.items() if k in HOST_FIELDS} if isinstance(data, dict) \
            else {}

    def _publish(self, readings: list[dict[str, object]]) -> None:
        payload = {"FV": "1.0", "GI": "", "GS": "", "GV": "", "PG": "", "IS": True,
                   "IT": "NONE", "ID": "", **self._metadata(),
                   "MV": "Iskra", "MM": "WM3M4C", "MS": self.model.serial, "MF": "1.14",
                   "RD": readings}
        payload["PG"] = f"T{self.transactions}"  # the meter paginates, never the host
        text = json.dumps(payload, separators=(",", ":"))
        signature = self.key.sign(text.encode("utf-8"), ec.ECDSA(hashes.SHA256()))
        self.regs[STATUS] = IN_PROGRESS
        self._store_bytes(PAYLOAD, text.encode("ascii"))
        self._store_bytes(SIGNATURE, signature)
        self.regs[PAYLOAD_LEN], self.regs[SIG_LEN] = len(text), len(signature)
        self.regs[STATUS] = SIGNATURE_OK
        self.records.append(f'OCMF|{text}|{{"SA":"ECDSA-secp256r1-SHA256","SD":"'
                            f'{signature.hex().upper()}"}}')

    def _reading(self, kind: str, energy_wh: int, timestamp: str) -> dict[str, object]:
        # RV in kWh with the meter's three decimals (OCMF s5.3 "RV", "RU")
        return {"TM": timestamp, "TX": kind, "RV": round(energy_wh / 1000, 3),
                "RI": "1-0:1.8.0", "RU": "kWh", "RT": "AC", "EF": "", "ST": "G"}

    def _timestamp(self) -> str:
        """OCMF time: ``YYYY-MM-DDThh:mm:ss,fff+zzzz S`` (S: synced, the host set it)."""
        host = (self.regs.get(7054, 0) << 16) | self.regs.get(7055, 0)
        synced = self.regs.get(7071) == 2 and host > 0
        seconds = host if synced else time.time()
        stamp = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
        return stamp.strftime("%Y-%m-%dT%H:%M:%S,000+0000 ") + ("S" if synced else "U")

    def _store_bytes(self, address: int, data: bytes) -> None:
        padded = data + b"\0" * (len(data) % 2)
        for i in range(0, len(padded), 2):
            self.regs[address + i // 2] = int.from_bytes(padded[i:i + 2], "big")

    def _read_bytes(self, address: int, length: int) -> bytes:
        words = [self.regs.get(address + i, 0) for i in range((length + 1) // 2)]
        return b"".join(w.to_bytes(2, "big") for w in words)[:length]
