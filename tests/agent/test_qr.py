"""The record's QR codes fit a 60-column terminal and a real scanner (zbarimg, Debian
zbar-tools) reads them back into a record that `registry add` admits."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.errors import MalformedEnvelope
from agent.fleet_keys import FleetRegistry
from agent.keys import KeyStore, record_to_cbor
from agent.qr import TERMINAL_COLUMNS, decode_text, split_texts

EDGE_AGENT = str(Path(sys.executable).parent / "edge-agent")


def zbarimg(path: Path) -> str:
    tool = shutil.which("zbarimg")
    assert tool, "zbarimg missing: scripts/test.sh installs zbar-tools"
    result = subprocess.run([tool, "-q", "--raw", str(path)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def terminal_codes(text: str) -> list[list[str]]:
    """The QR codes in a terminal transcript: runs of lines made of block characters."""
    codes, current = [], []
    for line in text.split("\n"):
        if line and set(line) <= set("█▀▄ ") and "█" in line:
            current.append(line)
        elif current:
            codes.append(current)
            current = []
    return codes + ([current] if current else [])


def to_pbm(code: list[str], path: Path, scale: int = 4) -> None:
    """Rasterise segno's compact terminal code (two module rows per line; a block is a
    light module, as on a dark terminal) into a plain PBM (1 = black)."""
    width = max(map(len, code))
    rows = []
    for line in code:
        line = line.ljust(width)
        rows += [[c in "█▀" for c in line], [c in "█▄" for c in line]]
    with path.open("w") as out:
        out.write(f"P1\n{width * scale} {len(rows) * scale}\n")
        for row in rows:
            pixels = " ".join("0" if light else "1" for light in row for _ in range(scale))
            out.write((pixels + "\n") * scale)


def test_keys_init_qr_fits_60_columns_and_scans_back(tmp_path):
    result = subprocess.run([EDGE_AGENT, "keys", "init", "--state-dir", str(tmp_path / "s"),
                             "--device-id", "ev-0042"], capture_output=True, text=True,
                            timeout=60, check=True)
    codes = terminal_codes(result.stdout)
    assert len(codes) == 2
    assert max(len(line) for code in codes for line in code) <= TERMINAL_COLUMNS
    scanned = []
    for index, code in enumerate(codes):
        to_pbm(code, tmp_path / f"part{index}.pbm")
        scanned.append(zbarimg(tmp_path / f"part{index}.pbm"))
    # The technician's phone gives two lines back; registry add takes them in any order.
    (tmp_path / "scan.txt").write_text("\n".join(reversed(scanned)) + "\n")
    add = subprocess.run([EDGE_AGENT, "registry", "add", str(tmp_path / "scan.txt"),
                          "--registry", str(tmp_path / "fleet.toml")], capture_output=True,
                         text=True, timeout=60)
    assert add.returncode == 0, add.stderr
    assert FleetRegistry.load(tmp_path / "fleet.toml").devices() == ["ev-0042"]


def test_a_rotation_with_a_long_device_id_fits_60_columns_and_scans_back(tmp_path):
    device = "fleet-north-depot-" + "x" * 22   # 40 characters
    KeyStore(tmp_path / "s").init(device)
    result = subprocess.run([EDGE_AGENT, "keys", "rotate", "--state-dir", str(tmp_path / "s")],
                            capture_output=True, text=True, timeout=60, check=True)
    codes = terminal_codes(result.stdout)
    assert len(codes) >= 3      # a rotation record does not fit two 60-column codes
    assert max(len(line) for code in codes for line in code) <= TERMINAL_COLUMNS
    scanned = []
    for index, code in enumerate(codes):
        to_pbm(code, tmp_path / f"part{index}.pbm")
        scanned.append(zbarimg(tmp_path / f"part{index}.pbm"))
    assert decode_text("\n".join(reversed(scanned))) == \
        record_to_cbor(KeyStore(tmp_path / "s").latest_record())


@pytest.mark.parametrize("suffix", [".png", ".svg"])
def test_keys_export_qr_writes_an_image_to_print(tmp_path, suffix):
    KeyStore(tmp_path / "s").init("ev-7")
    image = tmp_path / f"record{suffix}"
    subprocess.run([EDGE_AGENT, "keys", "export", "--state-dir", str(tmp_path / "s"),
                    "--qr", str(image)], capture_output=True, text=True, timeout=60, check=True)
    if suffix == ".svg":
        assert image.read_text().lstrip().startswith(("<?xml", "<svg"))
        return
    text = zbarimg(image)
    assert decode_text(text) == record_to_cbor(KeyStore(tmp_path / "s").latest_record())


def test_split_round_trip_and_damaged_parts(tmp_path):
    _, record = KeyStore(tmp_path).init("ev-1")
    cbor = record_to_cbor(record)
    first, second = split_texts(cbor)
    assert decode_text(f"{second}\n{first}") == cbor
    with pytest.raises(MalformedEnvelope, match="part 2 of 2 is missing"):
        decode_text(first)
    with pytest.raises(MalformedEnvelope):
        decode_text(first + "\n" + second.replace("2/2", "2/3"))


@given(st.text(max_size=200))
def test_hostile_qr_text_raises_only_our_error(text):
    try:
        result = decode_text("EVEDGE2:" + text)
    except MalformedEnvelope:
        return
    assert isinstance(result, bytes)
