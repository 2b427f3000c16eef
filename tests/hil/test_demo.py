"""`edge-agent demo` as the README says to run it: a fresh copy of the project, its own new
virtual environment made by scripts/demo.sh, then the receipt is checked."""

import json
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def fresh_copy(dest: Path) -> Path:
    """The project's files as a clone would have them (tracked and new, never ignored ones
    such as .venv), so the demo script must build its environment from scratch."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                            capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, listed):
        source = ROOT / name.decode()
        if source.is_file():
            target = dest / name.decode()
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return dest


def test_demo_in_a_fresh_virtualenv_the_readme_way(tmp_path):
    project = fresh_copy(tmp_path / "ev-edge-agent")
    assert not (project / ".venv").exists()
    out = tmp_path / "demo-out"
    proc = subprocess.run(["bash", "scripts/demo.sh", "--out", str(out)], cwd=project,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (project / ".venv" / "bin" / "edge-agent").exists()
    assert "charging:" in proc.stdout and "receipt" in proc.stdout
    assert "FAIL" not in proc.stdout

    record = json.loads((out / "session.json").read_text())
    receipt, verification = record["receipt"], record["verification"]
    # energy, payments and settlement agree
    assert receipt["energy_wh"] >= 3000
    assert receipt["paid"] == receipt["paid_wh"] * receipt["price_per_kwh"] // 1000
    assert receipt["energy_wh"] - receipt["paid_wh"] < 100
    assert receipt["settled"] and receipt["close"] == "cooperative"
    assert receipt["settlement_tx"].startswith("0x") and len(receipt["settlement_tx"]) == 66
    assert receipt["settled_nonce"] == receipt["latest_nonce"] > 0
    # every envelope verifies, also when checked again from the capture by the new install
    assert verification["ok"] and verification["envelopes"] > 10
    assert "<svg" in (out / "session.html").read_text()
    # each agent's last committed envelope reached the capture (issue 18)
    assert sorted(t["role"] for t in record["tails"]) == ["station", "vehicle"]
    assert all(t["captured"] and t["last_seq"] > 0 for t in record["tails"]), record["tails"]
    again = subprocess.run([str(project / ".venv" / "bin" / "edge-agent"), "verify",
                            str(out / "capture.cbor"), "--registry", str(out / "fleet.toml")],
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "every envelope verifies" in again.stdout
