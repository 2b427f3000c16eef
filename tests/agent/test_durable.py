"""State files survive a power cut at any step (issue 15.2).

``PowerCut`` is a fault-injecting agent.durable.FileOps: it performs every operation on
real files and stops the writer (raises ``Crash``) after operation number ``n``. It also
keeps a model of what the disk holds for sure: a file's data as of its last fsync, a
directory's names as of its last fsync (POSIX fsync(2)). ``power_cut()`` then rewrites the
directory tree to that model (pessimistic: nothing un-synced survives, the worst a real file
system may do). Each test crashes after every step in turn and checks the state that a
restart would see, both after the power cut and as left by a plain crash (kill -9: every
completed operation survives).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from agent.durable import FileOps, write_atomic
from agent.errors import KeyStoreError
from agent.keys import KeyStore, check_record, record_from_json


class Crash(Exception):
    pass


class PowerCut(FileOps):
    def __init__(self, root: Path, crash_after: int | None = None) -> None:
        self.root, self.crash_after, self.steps = root, crash_after, 0
        self.names: list[str] = []
        self._content: dict[int, bytes] = {}  # inode -> bytes written (what is in the cache)
        self._synced: dict[int, bytes] = {}  # inode -> bytes at its last fsync
        self._fds: dict[int, int] = {}  # fd -> inode
        self._dirs: dict[int, dict[str, int]] = {}  # dir inode -> {name: inode}, last fsync
        for directory, subdirs, files in os.walk(root):  # what is there is on the disk
            path = Path(directory)
            self._dirs[path.stat().st_ino] = {n: (path / n).stat().st_ino
                                              for n in subdirs + files}
            for name in files:
                ino = (path / name).stat().st_ino
                self._content[ino] = self._synced[ino] = (path / name).read_bytes()

    def _step(self, name: str) -> None:
        self.steps += 1
        self.names.append(name)
        if self.crash_after is not None and self.steps >= self.crash_after:
            raise Crash(name)

    def open(self, path: Path, flags: int, mode: int = 0o600) -> int:
        fd = os.open(path, flags, mode)
        ino = os.fstat(fd).st_ino
        self._fds[fd] = ino
        if flags & os.O_TRUNC or ino not in self._content:
            self._content[ino] = b""
        self._step(f"open {path.name}")
        return fd

    def write(self, fd: int, data: bytes) -> int:
        n = os.write(fd, data)
        self._content[self._fds[fd]] += data[:n]
        self._step("write")
        return n

    def fsync(self, fd: int) -> None:
        os.fsync(fd)
        self._synced[self._fds[fd]] = self._content[self._fds[fd]]
        self._step("fsync")

    def close(self, fd: int) -> None:
        os.close(fd)
        self._fds.pop(fd)  # (no step: closing changes nothing on disk)

    def replace(self, src: Path, dst: Path) -> None:
        os.replace(src, dst)
        self._step(f"rename {src.name} -> {dst.name}")

    def unlink(self, path: Path) -> None:
        os.unlink(path)
        self._step(f"unlink {path.name}")

    def mkdir(self, path: Path, mode: int = 0o700) -> None:
        os.mkdir(path, mode)
        self._dirs.setdefault(path.stat().st_ino, {})
        self._step(f"mkdir {path.name}")

    def fsync_dir(self, path: Path) -> None:
        super().fsync_dir(path)
        self._dirs[path.stat().st_ino] = {p.name: p.stat().st_ino for p in path.iterdir()}
        self._step(f"fsync dir {path.name}")

    def power_cut(self) -> None:
        """Rewrite the tree under ``root`` to what the disk holds for sure."""
        modes = {p.stat().st_ino: p.stat().st_mode for p in self.root.rglob("*")}
        snapshot = {}

        def collect(directory: int, into: Path) -> None:
            for name, ino in self._dirs.get(directory, {}).items():
                if ino in self._dirs:
                    snapshot[into / name] = None
                    collect(ino, into / name)
                else:
                    snapshot[into / name] = (self._synced.get(ino, b""), modes.get(ino, 0o600))

        collect(self.root.stat().st_ino, Path())
        for child in list(self.root.iterdir()):
            shutil.rmtree(child) if child.is_dir() else child.unlink()
        for rel in sorted(snapshot, key=lambda p: len(p.parts)):
            target = self.root / rel
            if snapshot[rel] is None:
                target.mkdir(mode=0o700, exist_ok=True)
            else:
                data, mode = snapshot[rel]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
                os.chmod(target, mode & 0o777)

def crash_points(run, make_state, at_least: int = 8) -> list[tuple[str, PowerCut]]:
    """Run ``run(ops)`` once to count its steps, then again on a fresh state for each
    crash point; yields (what was last done, the layer) after each crash."""
    root = make_state("count")
    counter = PowerCut(root)
    run(counter)
    out = []
    for n in range(1, counter.steps + 1):
        root = make_state(f"crash{n}")
        ops = PowerCut(root, crash_after=n)
        with pytest.raises(Crash):
            run(ops)
        out.append((counter.names[n - 1], ops))
    assert len(out) >= at_least, counter.names  # the layer really saw the writes
    return out


@pytest.mark.parametrize("power_cut", [True, False], ids=["power-cut", "kill-9"])
def test_write_atomic_leaves_the_old_file_or_the_new_one(tmp_path, power_cut):
    def make_state(name: str) -> Path:
        root = tmp_path / name
        root.mkdir()
        (root / "odometer").write_bytes(b"1000.0\n")
        return root

    def run(ops: PowerCut) -> None:
        write_atomic(ops.root / "odometer", b"1234.5\n", ops=ops)

    for step, ops in crash_points(run, make_state, at_least=3):
        if power_cut:
            ops.power_cut()
        assert (ops.root / "odometer").read_bytes() in (b"1000.0\n", b"1234.5\n"), step


@pytest.mark.parametrize("power_cut", [True, False], ids=["power-cut", "kill-9"])
def test_keys_init_leaves_no_keys_or_complete_ones(tmp_path, power_cut):
    def make_state(name: str) -> Path:
        root = tmp_path / name
        root.mkdir()
        return root

    def run(ops: PowerCut) -> None:
        KeyStore(ops.root, ops=ops).init("dev-p")

    for step, ops in crash_points(run, make_state):
        if power_cut:
            ops.power_cut()
        store = KeyStore(ops.root)
        if store.exists():
            keys = store.load()  # complete: it starts
            assert keys.device_id == "dev-p", step
            record = store.latest_record()
            check_record(record)
            assert record["ed25519"] == keys.identity.public
        else:
            with pytest.raises(KeyStoreError):
                store.load()
            store.init("dev-p")  # and a new init works
            assert store.load().device_id == "dev-p"


@pytest.mark.parametrize("power_cut", [True, False], ids=["power-cut", "kill-9"])
def test_keys_rotate_keeps_the_old_key_or_the_new_one_with_its_record(tmp_path, power_cut):
    template = tmp_path / "template"
    template.mkdir()
    old = KeyStore(template).init("dev-r")[0]

    def make_state(name: str) -> Path:
        root = tmp_path / name
        shutil.copytree(template, root)
        return root

    def run(ops: PowerCut) -> None:
        KeyStore(ops.root, ops=ops).rotate()

    outcomes = set()
    for step, ops in crash_points(run, make_state):
        if power_cut:
            ops.power_cut()
        keys = KeyStore(ops.root).load()  # the agent starts, whatever the step
        device = json.loads((ops.root / "keys" / "device.json").read_text())
        assert device["kid"] == keys.identity.kid.hex(), step
        if keys.identity.public == old.identity.public:
            assert keys.settlement.public == old.settlement.public, step
            outcomes.add("old")
        else:  # the new key: its record, signed by the old key, is on disk
            records = [record_from_json(p.read_text())
                       for p in (ops.root / "keys" / "records").glob("rotate-*.json")]
            mine = [r for r in records if r["ed25519"] == keys.identity.public]
            assert len(mine) == 1, step
            check_record(mine[0], old.identity.public)
            assert mine[0]["secp256k1"] == keys.settlement.public, step
            outcomes.add("new")
        assert not list((ops.root / "keys").glob("*.new")), step  # load finished it
    assert outcomes == {"old", "new"}
