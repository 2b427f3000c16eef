"""Shell completion: the generated scripts complete this installation's commands in a real
bash and a real zsh (Debian zsh, installed by scripts/test.sh)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

EDGE_AGENT = str(Path(sys.executable).parent / "edge-agent")


def script(tmp_path: Path, shell: str) -> Path:
    path = tmp_path / f"edge-agent.{shell}"
    path.write_text(subprocess.run([EDGE_AGENT, "completion", shell], capture_output=True,
                                   text=True, timeout=60, check=True).stdout)
    return path


@pytest.mark.parametrize("words,expected", [
    (["edge-agent", "ke"], ["keys"]),
    (["edge-agent", "keys", "r"], ["rotate"]),
    (["edge-agent", "registry", "add", "--re"], ["--registry", "--replace"]),
    (["edge-agent", "wat"], ["watch"]),                  # a plugin command group
    (["edge-agent", "run", "--log"], ["--log-format"]),
    (["edge-agent", "run", "--log-format", ""], ["auto", "journal", "json", "text"]),
    (["edge-agent", "completion", ""], ["--help", "bash", "zsh"]),
    (["edge-agent", "hil", "run", "happy"], ["happy-path"]),     # a built-in scenario
])
def test_bash_completes_commands_and_options(tmp_path, words, expected):
    path = script(tmp_path, "bash")
    array = " ".join(f"'{w}'" for w in words)
    out = subprocess.run(["bash", "--norc", "-c", f"source {path}; COMP_WORDS=({array}); "
                          f"COMP_CWORD={len(words) - 1}; _edge_agent; "
                          'printf "%s\\n" "${COMPREPLY[@]}"'],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    assert out.split() == expected


def test_bash_completes_file_names_after_config(tmp_path):
    path = script(tmp_path, "bash")
    (tmp_path / "agent.toml").write_text("")
    out = subprocess.run(["bash", "--norc", "-c", f"cd {tmp_path}; source {path}; "
                          "COMP_WORDS=(edge-agent run --config age); COMP_CWORD=3; "
                          '_edge_agent; printf "%s\\n" "${COMPREPLY[@]}"'],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    assert out.split() == ["agent.toml"]


def test_zsh_registers_the_completion(tmp_path):
    zsh = shutil.which("zsh")
    assert zsh, "zsh missing: scripts/test.sh installs it"
    path = script(tmp_path, "zsh")
    out = subprocess.run([zsh, "-f", "-c", f"source {path}; print -r -- $_comps[edge-agent]; "
                          "setopt ksharrays; COMP_WORDS=(edge-agent keys r); COMP_CWORD=2; "
                          '_edge_agent; print -r -- "${COMPREPLY[@]}"'],
                         capture_output=True, text=True, timeout=60, env={"HOME": str(tmp_path),
                                                                           "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    registered, words = out.stdout.splitlines()[-2:]
    assert "-F _edge_agent" in registered
    assert "rotate" in words.split() and "init" in words.split()   # zsh filters by prefix


def test_version():
    out = subprocess.run([EDGE_AGENT, "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.startswith("edge-agent 0.")
