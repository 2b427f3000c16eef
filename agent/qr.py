"""The provisioning record as QR codes: on a 60-column terminal, and as an image to print.

A record is ~290 bytes of CBOR (two public keys and three signatures): as one QR code that
is version 11 or more (61+ modules, plus the quiet zone), wider than a 60-column terminal.
So the terminal shows it split in two codes, each small enough for version 8 at error
level L (49 modules + a 4-module quiet zone on each side = 57 columns in segno's compact
mode, which draws two module rows per text line); a bigger record (a rotation, a long
device id) in as many parts as it takes for each to fit:

    EVEDGE2:<part>/<parts>:<base32 of that part of the CBOR, no padding>

Base32 (RFC 4648) uses only QR's alphanumeric characters (upper case, digits, ``:`` and
``/``), which QR packs at 5.5 bits a character instead of 8, so the parts stay small.
``registry add`` takes the scanner's text of both parts (two lines, in any order), the
single-code form ``EVEDGE1:<base64url>`` that ``keys export --qr FILE.png|.svg`` prints on
paper (room there for a bigger code), the JSON or the CBOR.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import TextIO

from agent.errors import MalformedEnvelope

SINGLE_PREFIX = "EVEDGE1:"
SPLIT_PREFIX = "EVEDGE2:"
TERMINAL_COLUMNS = 60
_PART = re.compile(r"EVEDGE2:([1-9])/([1-9]):([A-Z2-7]+)")


def split_texts(cbor: bytes, parts: int = 2) -> list[str]:
    """The record as ``parts`` QR texts (EVEDGE2)."""
    size = -(-len(cbor) // parts)
    chunks = [cbor[i * size:(i + 1) * size] for i in range(parts)]
    return [f"{SPLIT_PREFIX}{i}/{parts}:{base64.b32encode(chunk).decode().rstrip('=')}"
            for i, chunk in enumerate(chunks, 1)]


def single_text(cbor: bytes) -> str:
    return SINGLE_PREFIX + base64.urlsafe_b64encode(cbor).decode().rstrip("=")


def print_terminal(cbor: bytes, out: TextIO) -> None:
    """The split codes, each at most TERMINAL_COLUMNS wide, with a caption: two parts for a
    provisioning record, more for a bigger one (a rotation record carries a third key
    signature and the old key id; a long device id adds its bytes)."""
    import segno

    for parts in range(2, 10):
        texts = split_texts(cbor, parts)
        codes = [segno.make(text, error="l", boost_error=False) for text in texts]
        # compact mode: one text column per module, the quiet zone included
        if max(code.symbol_size(scale=1)[0] for code in codes) <= TERMINAL_COLUMNS:
            break
    for index, code in enumerate(codes, 1):
        print(f"\nQR part {index} of {len(codes)} (scan all {len(codes)}; `registry add` takes "
              f"their lines in any order):", file=out)
        code.terminal(out=out, compact=True)


def save_image(cbor: bytes, path: Path) -> None:
    """One code for printing: ``.png`` or ``.svg`` (segno writes both, no extra package)."""
    import segno

    suffix = path.suffix.lower()
    if suffix not in (".png", ".svg"):
        raise ValueError(f"{path}: expected a .png or .svg file name")
    segno.make(single_text(cbor), error="m").save(str(path), scale=6, border=4)


def decode_text(text: str) -> bytes | None:
    """The CBOR in a scanner's text (one EVEDGE1 code, or all EVEDGE2 parts in any order);
    None if the text is neither; MalformedEnvelope if it is one but broken."""
    stripped = text.strip()
    if stripped.startswith(SINGLE_PREFIX):
        body = stripped[len(SINGLE_PREFIX):]
        try:
            return base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        except ValueError:
            raise MalformedEnvelope("the EVEDGE1 QR text is not base64url",
                                    reason="malformed-record") from None
    if not stripped.startswith(SPLIT_PREFIX):
        return None
    found: dict[int, str] = {}
    total = None
    for line in stripped.split():
        match = _PART.fullmatch(line)
        if match is None:
            raise MalformedEnvelope("an EVEDGE2 QR line is damaged", reason="malformed-record")
        index, count, body = int(match[1]), int(match[2]), match[3]
        if total not in (None, count) or index > count:
            raise MalformedEnvelope("EVEDGE2 QR parts of different records",
                                    reason="malformed-record")
        total = count
        found[index] = body
    assert total is not None
    missing = [str(i) for i in range(1, total + 1) if i not in found]
    if missing:
        raise MalformedEnvelope(f"QR part {', '.join(missing)} of {total} is missing: scan "
                                f"every part into the file", reason="malformed-record")
    try:
        return b"".join(base64.b32decode(found[i] + "=" * (-len(found[i]) % 8))
                        for i in range(1, total + 1))
    except ValueError:
        raise MalformedEnvelope("an EVEDGE2 QR part is not base32",
                                reason="malformed-record") from None
