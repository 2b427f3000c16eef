"""scripts/install-service.sh into a scratch root, checked by systemd's own tools.

The venv gets the project without its dependencies (``--pip-args --no-deps``: the test
checks the layout and the unit, not PyPI); the host's unit directory is copied into the
scratch root so that ``systemd-analyze verify --root`` can resolve sysinit.target & co.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
INSTALLER = REPO / "scripts" / "install-service.sh"


def install(root: Path, role: str = "station") -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(INSTALLER), "--root", str(root), "--role", role,
                           "--python", shutil.which("python3") or "python3",
                           "--pip-args", "--no-deps"],
                          capture_output=True, text=True, timeout=600)


def verify(root: Path) -> subprocess.CompletedProcess[str]:
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze missing: scripts/test.sh installs systemd"
    return subprocess.run([analyze, "verify", f"--root={root}", "--man=no", "edge-agent.service"],
                          capture_output=True, text=True, timeout=120)


def tree(root: Path) -> dict[str, str]:
    """Everything outside the venv: path -> mode and content hash (or link target)."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if rel.startswith(("opt/", "usr/lib/systemd/")):
            continue
        info = path.lstat()
        if stat.S_ISLNK(info.st_mode):
            out[rel] = "-> " + os.readlink(path)
        elif stat.S_ISREG(info.st_mode):
            out[rel] = f"{stat.S_IMODE(info.st_mode):o} {hashlib.sha256(path.read_bytes()).hexdigest()}"
        else:
            out[rel] = f"{stat.S_IMODE(info.st_mode):o} dir"
    return out


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("root")
    (root / "usr/lib/systemd").mkdir(parents=True)
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    result = install(root)
    assert result.returncode == 0, result.stdout + result.stderr
    return root


def test_the_installed_unit_verifies_in_the_scratch_root(installed: Path) -> None:
    result = verify(installed)
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr
    # ExecStart=/usr/bin/edge-agent resolves inside the root to the venv's console script.
    assert os.path.realpath(installed / "usr/bin/edge-agent") == \
        str(installed / "opt/edge-agent/bin/edge-agent")


def test_verify_would_see_a_missing_binary(installed: Path, tmp_path: Path) -> None:
    """Guards the check above: without the installed command, verify complains."""
    broken = tmp_path / "root"
    shutil.copytree(installed, broken, symlinks=True, ignore=shutil.ignore_patterns("opt"))
    result = verify(broken)
    assert "edge-agent is not executable" in result.stderr


def test_layout_user_directories_config_docs_and_completion(installed: Path) -> None:
    passwd = {line.split(":")[0]: line.split(":")
              for line in (installed / "etc/passwd").read_text().splitlines()}
    uid, gid = int(passwd["edge-agent"][2]), int(passwd["edge-agent"][3])
    state = (installed / "var/lib/edge-agent").stat()
    assert stat.S_IMODE(state.st_mode) == 0o700 and state.st_uid == uid
    config = (installed / "etc/edge-agent/agent.toml").stat()
    assert stat.S_IMODE(config.st_mode) == 0o640 and config.st_uid == 0 and config.st_gid == gid
    assert 'role = "station"' in (installed / "etc/edge-agent/agent.toml").read_text()
    unit = (installed / "etc/systemd/system/edge-agent.service").read_text()
    doc = unit.split("Documentation=file://", 1)[1].split()[0]
    assert (installed / doc.lstrip("/")).is_file()         # the page the unit points to
    assert "complete -o default -F _edge_agent edge-agent" in \
        (installed / "usr/share/bash-completion/completions/edge-agent").read_text()
    assert (installed / "usr/share/zsh/vendor-completions/_edge-agent").is_file()


def test_running_it_again_changes_nothing_and_keeps_the_config(installed: Path) -> None:
    config = installed / "etc/edge-agent/agent.toml"
    config.write_text(config.read_text().replace('id = "cs-berlin-07"', 'id = "cs-mine"'))
    before = tree(installed)
    result = install(installed)
    assert result.returncode == 0, result.stderr
    assert "keeping the existing /etc/edge-agent/agent.toml" in result.stdout
    assert tree(installed) == before
    assert 'id = "cs-mine"' in config.read_text()
