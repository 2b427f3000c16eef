"""What the channel service keeps of each session on disk, so that kill -9 at any instant
loses nothing (DESIGN s5b). Layout under ``<state_dir>/sessions/<channel id hex>/``::

    session.cbor   SessionRecord: who, where, the accepted offer; written (fsync'd, atomic)
                   before anything about the session leaves the device
    channel.log    the channel's own store (agent/channel/store.py)
    job.cbor       JobRecord: the settlement job's state (agent/channel/jobs.py)
    energy.cbor    the vehicle's own energy count (start value, integrated Wh)

A session is finished when its job says so (``settled``, ``nothing-to-settle``); the
service resumes every other one on start.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

from agent import dcbor
from agent.channel.messages import field
from agent.errors import EdgeAgentError, MalformedEnvelope, SpoolError

SESSIONS_DIR = "sessions"
DONE_STATES = ("settled", "nothing-to-settle")


def write_atomic(path: Path, data: bytes, *, sync: bool = True) -> None:
    """Replace ``path`` with ``data``: temp file, (fsync), rename, (fsync of the dir)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        if sync:
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    except OSError as exc:
        raise SpoolError(f"cannot write {path}: {exc.strerror}", reason="store-write") from exc


def _read(path: Path) -> dict[int, object] | None:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise SpoolError(f"cannot read {path}: {exc.strerror}", reason="store-read") from exc
    try:
        item = dcbor.loads(data, max_bytes=16_384)
    except EdgeAgentError as exc:
        raise SpoolError(f"{path} is damaged: {exc}", reason="store-corrupt") from exc
    if not isinstance(item, dict):
        raise SpoolError(f"{path} is damaged", reason="store-corrupt")
    return item


@dataclass(frozen=True, slots=True)
class SessionRecord:
    """One session as both sides agreed to it (the offer is kept as it was signed)."""

    role: str                 # station | vehicle
    channel_id: bytes
    request_id: bytes
    station: str
    vehicle: str
    connector: int
    peer_identity: bytes
    peer_address: bytes
    salt: bytes
    offer: bytes              # the signed OFFER the session was accepted under
    created_ns: int
    max_wh: int | None = None
    max_price_per_kwh: int | None = None

    def encode(self) -> bytes:
        return dcbor.dumps({0: self.role, 1: self.channel_id, 2: self.request_id,
                            3: self.station, 4: self.vehicle, 5: self.connector,
                            6: self.peer_identity, 7: self.peer_address, 8: self.salt,
                            9: self.offer, 10: self.created_ns, 11: self.max_wh,
                            12: self.max_price_per_kwh})

    @classmethod
    def decode(cls, item: dict[int, object]) -> SessionRecord:
        try:
            return cls(_s(item, 0), _b(item, 1), _b(item, 2), _s(item, 3), _s(item, 4),
                       _i(item, 5), _b(item, 6), _b(item, 7), _b(item, 8), _b(item, 9),
                       _i(item, 10), _oi(item, 11), _oi(item, 12))
        except MalformedEnvelope as exc:
            raise SpoolError(f"session record damaged: {exc}", reason="store-corrupt") from exc


def _b(item: dict[int, object], key: int) -> bytes:
    value = field(item, key, bytes)
    assert isinstance(value, bytes)
    return value


def _i(item: dict[int, object], key: int) -> int:
    value = field(item, key, int)
    assert isinstance(value, int)
    return value


def _s(item: dict[int, object], key: int) -> str:
    value = field(item, key, str)
    assert isinstance(value, str)
    return value


def _oi(item: dict[int, object], key: int) -> int | None:
    value = field(item, key, int, optional=True)
    assert value is None or isinstance(value, int)
    return value


@dataclass(frozen=True, slots=True)
class JobRecord:
    """The settlement job of one session (agent/channel/jobs.py)."""

    state: str = "pending"    # pending | waiting | submitting | closing | settled |
    #                           nothing-to-settle ("closing": a close is on chain)
    end_reason: str = ""      # why the session ended (max-energy, driver-stop, ...)
    close: str = ""           # cooperative | unilateral | challenged
    nonce: int = 0            # the nonce settled (or closed on)
    t_ev: int = 0
    t_cs: int = 0
    tx: bytes = b""           # our last transaction, if any
    updated_ns: int = 0
    wh: int = 0               # the energy of our state it settles (status after a restart)

    @property
    def done(self) -> bool:
        return self.state in DONE_STATES

    def encode(self) -> bytes:
        return dcbor.dumps({0: self.state, 1: self.end_reason, 2: self.close, 3: self.nonce,
                            4: self.t_ev, 5: self.t_cs, 6: self.tx, 7: self.updated_ns,
                            8: self.wh})

    @classmethod
    def decode(cls, item: dict[int, object]) -> JobRecord:
        try:
            return cls(_s(item, 0), _s(item, 1), _s(item, 2), _i(item, 3), _i(item, 4),
                       _i(item, 5), _b(item, 6), _i(item, 7), _i(item, 8) if 8 in item else 0)
        except MalformedEnvelope as exc:
            raise SpoolError(f"job record damaged: {exc}", reason="store-corrupt") from exc

    def update(self, **changes: object) -> JobRecord:
        return replace(self, **changes)  # type: ignore[arg-type]


class SessionDir:
    """One session's directory."""

    def __init__(self, root: Path, channel_id: bytes) -> None:
        self.path = root / SESSIONS_DIR / channel_id.hex()
        self.channel_id = channel_id

    @property
    def store_path(self) -> Path:
        return self.path / "channel.log"

    def create(self, record: SessionRecord) -> None:
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_atomic(self.path / "session.cbor", record.encode())

    def session(self) -> SessionRecord:
        item = _read(self.path / "session.cbor")
        if item is None:
            raise SpoolError(f"{self.path}: no session record", reason="store-corrupt")
        return SessionRecord.decode(item)

    def job(self) -> JobRecord | None:
        item = _read(self.path / "job.cbor")
        return None if item is None else JobRecord.decode(item)

    def save_job(self, job: JobRecord) -> None:
        write_atomic(self.path / "job.cbor", job.encode())

    def energy(self) -> tuple[float | None, float]:
        item = _read(self.path / "energy.cbor")
        if item is None:
            return None, 0.0
        start, total = item.get(0), item.get(1)
        return (float(start) if isinstance(start, int | float) else None,
                float(total) if isinstance(total, int | float) else 0.0)

    def save_energy(self, start: float | None, accumulated_wh: float) -> None:
        # Not fsync'd: losing the last second of it costs at most what a crash loses anyway
        write_atomic(self.path / "energy.cbor", dcbor.dumps({0: start, 1: accumulated_wh}),
                     sync=False)


def session_dirs(root: Path) -> list[SessionDir]:
    """Every session with a record under ``root``, oldest first (by its record's mtime)."""
    base = root / SESSIONS_DIR
    if not base.is_dir():
        return []
    found = []
    for path in base.iterdir():
        try:
            channel_id = bytes.fromhex(path.name)
        except ValueError:
            continue
        if len(channel_id) == 32 and (path / "session.cbor").exists():
            found.append((path.joinpath("session.cbor").stat().st_mtime, SessionDir(root,
                                                                                     channel_id)))
    return [d for _, d in sorted(found, key=lambda x: x[0])]
