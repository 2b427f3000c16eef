"""OCMF records (S.A.F.E. "Open Charge Metering Format"): parse and verify. Sans-I/O.

An Eichrecht meter signs its billing data itself: ``OCMF|{payload}|{signature}``, the
payload a JSON object (``FV`` format version, ``MS`` meter serial, ``PG`` pagination,
``RD`` readings: ``TM`` time, ``TX`` type B/C/E/..., ``RV`` value, ``RI`` OBIS id,
``RU`` unit ...), the signature section JSON ``{"SA": algorithm, "SE": encoding,
"SD": signature data}``; ECDSA over the payload's bytes exactly as they appear between
the separators (OCMF s4: the signature covers the payload string, not a re-encoding).

Rules: :func:`verify_record` returns the parsed record or raises (PyNaCl style: never a
bool). BadSignature for a signature that does not verify; MalformedEnvelope (reason
``ocmf-malformed``) for anything that is not a well-formed record. Only the algorithms
an Eichrecht meter uses here: ECDSA-secp256r1-SHA256 (the default when ``SA`` is
absent), ECDSA-secp384r1-SHA256 and ECDSA-secp256k1-SHA256, DER signatures in hex (or
base64 with ``"SE": "base64"``). Keys: hex DER SubjectPublicKeyInfo (as OCMF s5 and OCPP's
SignedMeterValue publish them) or raw bytes. ECDSA is done by ``cryptography`` (a
well-kept library; nothing hand-made here).
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.errors import BadSignature, MalformedEnvelope

MAX_RECORD_CHARS = 8192
CURVES: dict[str, ec.EllipticCurve] = {
    "ECDSA-secp256r1-SHA256": ec.SECP256R1(), "ECDSA-secp384r1-SHA256": ec.SECP384R1(),
    "ECDSA-secp256k1-SHA256": ec.SECP256K1()}
DEFAULT_ALGORITHM = "ECDSA-secp256r1-SHA256"


@dataclass(frozen=True, slots=True)
class OcmfReading:
    time: str
    kind: str          # TX: B begin, C charging, E end, ...
    value: Decimal     # RV, in ``unit``
    obis: str
    unit: str

    @property
    def energy_wh(self) -> int | None:
        """The reading in Wh when it is an energy (kWh or Wh), exact."""
        if self.unit == "kWh":
            return int(self.value * 1000)
        if self.unit == "Wh":
            return int(self.value)
        return None


@dataclass(frozen=True, slots=True)
class OcmfRecord:
    payload_text: str
    payload: dict[str, object]
    algorithm: str
    signature: bytes
    readings: tuple[OcmfReading, ...]

    @property
    def meter_serial(self) -> str:
        value = self.payload.get("MS", "")
        return value if isinstance(value, str) else ""

    @property
    def pagination(self) -> str:
        value = self.payload.get("PG", "")
        return value if isinstance(value, str) else ""


def _malformed(why: str) -> MalformedEnvelope:
    return MalformedEnvelope(f"OCMF record: {why}", reason="ocmf-malformed")


def parse_record(text: str) -> OcmfRecord:
    """Split and decode a record; MalformedEnvelope for anything malformed."""
    if not isinstance(text, str) or len(text) > MAX_RECORD_CHARS:
        raise _malformed("not a string of at most 8192 characters")
    parts = text.split("|")
    if len(parts) not in (3, 4) or parts[0] != "OCMF":  # 4: the key appended (QR codes)
        raise _malformed('not "OCMF|payload|signature"')
    payload_text, signature_text = parts[1], parts[2]
    try:
        payload = json.loads(payload_text, parse_float=Decimal)
        sig = json.loads(signature_text)
    except (ValueError, RecursionError):
        raise _malformed("payload or signature section is not JSON") from None
    if not isinstance(payload, dict) or not isinstance(sig, dict):
        raise _malformed("payload and signature sections must be JSON objects")
    algorithm = sig.get("SA", DEFAULT_ALGORITHM)
    if algorithm not in CURVES:
        raise _malformed(f"unsupported signature algorithm {algorithm!r}")
    data = sig.get("SD")
    if not isinstance(data, str):
        raise _malformed("no signature data (SD)")
    try:
        signature = base64.b64decode(data, validate=True) if sig.get("SE") == "base64" \
            else bytes.fromhex(data)
    except (ValueError, binascii.Error):
        raise _malformed("signature data is not hex/base64") from None
    return OcmfRecord(payload_text, payload, algorithm, signature, _readings(payload))


def _readings(payload: dict[str, object]) -> tuple[OcmfReading, ...]:
    rows = payload.get("RD", [])
    if not isinstance(rows, list):
        raise _malformed("RD is not an array")
    out = []
    for row in rows:
        if not isinstance(row, dict):
            raise _malformed("a reading is not an object")
        value = row.get("RV")
        try:
            number = Decimal(value) if isinstance(value, int | Decimal) and \
                not isinstance(value, bool) else None
        except InvalidOperation:
            number = None
        fields = [row.get(k, "") for k in ("TM", "TX", "RI", "RU")]
        if number is None or not number.is_finite() or \
                not all(isinstance(f, str) for f in fields):
            raise _malformed("a reading has a malformed field")
        out.append(OcmfReading(str(fields[0]), str(fields[1]), number, str(fields[2]),
                               str(fields[3])))
    return tuple(out)


def load_public_key(key: str | bytes, algorithm: str = DEFAULT_ALGORITHM
                    ) -> ec.EllipticCurvePublicKey:
    """A hex DER SubjectPublicKeyInfo, DER bytes, or a raw X9.62 point (04||X||Y)."""
    try:
        raw = bytes.fromhex(key) if isinstance(key, str) else key
    except ValueError:
        raise _malformed("public key is not hex") from None
    try:
        if raw[:1] == b"\x04":
            return ec.EllipticCurvePublicKey.from_encoded_point(CURVES[algorithm], raw)
        loaded = serialization.load_der_public_key(raw)
    except (ValueError, UnsupportedAlgorithm):
        raise _malformed("not an EC public key") from None
    if not isinstance(loaded, ec.EllipticCurvePublicKey):
        raise _malformed("not an EC public key")
    if loaded.curve.name != CURVES[algorithm].name:
        raise _malformed(f"key curve {loaded.curve.name} does not match {algorithm}")
    return loaded


def verify_record(text: str, public_key: str | bytes) -> OcmfRecord:
    """The parsed record if the meter's signature over its payload verifies with
    ``public_key``; BadSignature (reason ``ocmf-bad-signature``) otherwise."""
    record = parse_record(text)
    key = load_public_key(public_key, record.algorithm)
    try:
        key.verify(record.signature, record.payload_text.encode("utf-8"),
                   ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise BadSignature("the meter's OCMF signature does not verify",
                           reason="ocmf-bad-signature") from None
    return record


@dataclass
class MeterSignedTally:
    """What ``edge-agent verify`` says about meter-signed records in a stream: each
    ``Meter.OCMF`` reading is checked against the last ``Meter.PublicKey`` its meter
    reported (the key itself must be checked against the meter's registered key by the
    back end; this proves the records are the meter's and unchanged)."""

    ok: int = 0
    bad: int = 0
    no_key: int = 0

    def __post_init__(self) -> None:
        self._keys: dict[tuple[str, str], str] = {}

    def add(self, device: str, name: str, meter: str, value: object) -> None:
        if not isinstance(value, str):
            return
        if name == "Meter.PublicKey":
            self._keys[(device, meter)] = value
        elif name == "Meter.OCMF":
            key = self._keys.get((device, meter))
            if key is None:
                self.no_key += 1
                return
            try:
                verify_record(value, key)
            except (BadSignature, MalformedEnvelope):
                self.bad += 1
            else:
                self.ok += 1

    def format(self) -> str:
        return (f"meter-signed OCMF records: {self.ok} verify, {self.bad} FAIL, "
                f"{self.no_key} without the meter's key in the stream")
