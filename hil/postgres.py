"""A throwaway PostgreSQL server for tests and benchmarks (Debian's ``postgresql`` package).

``Postgres().start()`` runs ``initdb`` and ``postgres`` on a free loopback port with trust
authentication for the user ``fleet``, in a fresh directory, and ``stop()`` ends it by its
pid and removes the directory. The server refuses to run as root, so as root the cluster
belongs to ``nobody`` (the directory is made for it outside pytest's root-only tmp tree).
``fsync = off`` by default: the data is thrown away anyway (benchmarks pass ``fsync=True``
to measure what a real deployment pays).

Nothing here is imported by ``agent``; tests and bench/ingest.py use it.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from hil.broker import LOOPBACK, free_port, wait_port

USER = "fleet"


def find_binary(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(
        glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if not found:
        raise FileNotFoundError(f"{name} not found: apt-get install postgresql")
    return found


@dataclass
class Postgres:
    fsync: bool = False
    port: int = 0
    directory: Path | None = None
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"postgresql://{USER}@{LOOPBACK}:{self.port}/postgres"

    def _user(self) -> dict[str, int]:
        if os.geteuid() != 0:
            return {}
        nobody = pwd.getpwnam("nobody")
        return {"user": nobody.pw_uid, "group": nobody.pw_gid}

    def start(self, timeout_s: float = 30.0) -> Postgres:
        ids = self._user()
        self.directory = Path(tempfile.mkdtemp(prefix="evedge-pg-"))
        if ids:
            os.chown(self.directory, ids["user"], ids["group"])
        data = self.directory / "data"
        log = self.directory / "server.log"
        subprocess.run([find_binary("initdb"), "-D", str(data), "-U", USER, "--auth=trust",
                        "-E", "UTF8", "--no-sync", "--no-instructions"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=self.directory,
                       **ids)  # type: ignore[call-overload]
        self.port = self.port or free_port()
        with open(os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644), "ab") as out:
            if ids:
                os.chown(log, ids["user"], ids["group"])
            self._proc = subprocess.Popen(
                [find_binary("postgres"), "-D", str(data), "-p", str(self.port),
                 "-k", str(self.directory), "-c", f"listen_addresses={LOOPBACK}",
                 "-c", f"fsync={'on' if self.fsync else 'off'}",
                 "-c", "max_connections=50", "-c", "shared_buffers=64MB"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=out, cwd=self.directory,
                **ids)  # type: ignore[call-overload]
        try:
            wait_port(self.port, timeout_s, pid=self._proc.pid)
            self._wait_ready(timeout_s)
        except (RuntimeError, TimeoutError) as exc:
            text = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            self.stop()
            raise RuntimeError(f"postgres did not start: {exc}\n{text}") from exc
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        subprocess.run([find_binary("pg_isready"), "-h", LOOPBACK, "-p", str(self.port),
                        "-t", str(int(timeout_s))], check=True, stdout=subprocess.DEVNULL)

    def stop(self) -> None:
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.send_signal(signal.SIGINT)  # "fast" shutdown
                try:
                    self._proc.wait(15)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()
            self._proc = None
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None

    def __enter__(self) -> Postgres:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
