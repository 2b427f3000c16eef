"""A real MQTT broker for tests, HIL rigs and the demo.

``Mosquitto`` starts the Debian ``mosquitto`` binary on a free loopback port with a config
generated here (plain or TLS with client certificates, optional ACL, optional persistence,
a chosen ``max_queued_messages``), and stops it by its pid. ``make_pki`` makes a throw-away
CA, a server certificate for 127.0.0.1/localhost and client certificates with
``cryptography``. When mosquitto is not installed, ``start_broker`` falls back to an
embedded amqtt broker in a child process (plain MQTT 3.1.1 only: enough for the demo).

Nothing here is imported by ``agent``; tests reach it through ``tests/conftest.py``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A TCP port free on loopback right now (the broker binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, timeout_s: float = 10.0, *, pid: int | None = None) -> None:
    """Block until something accepts TCP connections on ``port`` (or raise)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pid is not None and not _alive(pid):
            raise RuntimeError(f"broker pid {pid} exited before listening on {port}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.2)
            if sock.connect_ex((LOOPBACK, port)) == 0:
                return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listening on {LOOPBACK}:{port} after {timeout_s} s")


def _alive(pid: int) -> bool:
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return False
    return waited == 0


# --------------------------------------------------------------------------- PKI


@dataclass(frozen=True, slots=True)
class CertFiles:
    cert: Path
    key: Path


@dataclass(frozen=True, slots=True)
class Pki:
    """Files of a throw-away PKI. ``clients`` maps a common name to its cert/key."""

    ca: Path
    server: CertFiles
    clients: dict[str, CertFiles]


def make_pki(directory: Path, client_names: Sequence[str], *, ca_name: str = "test-ca") -> Pki:
    """A CA (EC P-256), a server cert for 127.0.0.1/localhost, and one client cert per name
    (the common name is the MQTT username with ``use_identity_as_username``)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write(stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> CertFiles:
        cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        key_path.chmod(0o600)
        return CertFiles(cert_path, key_path)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder().subject_name(name(ca_name)).issuer_name(name(ca_name))
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    ca_files = write(ca_name, ca_cert, ca_key)

    def leaf(cn: str, usage: x509.ObjectIdentifier, sans: list[x509.GeneralName]) -> CertFiles:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder().subject_name(name(cn)).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return write(cn, builder.sign(ca_key, hashes.SHA256()), key)

    server = leaf("server", ExtendedKeyUsageOID.SERVER_AUTH, [
        x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(LOOPBACK))])
    clients = {cn: leaf(cn, ExtendedKeyUsageOID.CLIENT_AUTH, []) for cn in client_names}
    return Pki(ca=ca_files.cert, server=server, clients=clients)


# --------------------------------------------------------------------------- mosquitto


@dataclass(frozen=True, slots=True)
class AclRule:
    """One ``topic`` line of a mosquitto ACL file for ``user`` (None: anonymous clients)."""

    user: str | None
    access: str  # "read", "write" or "readwrite"
    topic: str


@dataclass(frozen=True, slots=True)
class BrokerOptions:
    """What the generated mosquitto.conf says. ``max_queued_messages=0`` means no limit
    (mosquitto's default is 1000 and it drops QoS 1 messages silently beyond it)."""

    pki: Pki | None = None
    acl: tuple[AclRule, ...] | None = None
    persistence: bool = True
    max_queued_messages: int = 0
    max_inflight_messages: int = 20
    extra: tuple[str, ...] = ()


def render_config(options: BrokerOptions, port: int, directory: Path) -> str:
    lines = [
        # Run as whoever started us: as root, mosquitto would switch to user "mosquitto",
        # which cannot read the test's temporary files.
        f"user {pwd.getpwuid(os.getuid()).pw_name}",
        "per_listener_settings false",
        f"listener {port} {LOOPBACK}",
        "allow_anonymous true",
        f"max_queued_messages {options.max_queued_messages}",
        f"max_inflight_messages {options.max_inflight_messages}",
        "max_queued_bytes 0",
        "queue_qos0_messages false",
        "set_tcp_nodelay true",
        f"log_dest file {directory / 'mosquitto.log'}",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
        "connection_messages true",
    ]
    if options.persistence:
        lines += ["persistence true", f"persistence_location {directory}/",
                  "autosave_interval 1"]
    if options.pki is not None:
        lines += [f"cafile {options.pki.ca}", f"certfile {options.pki.server.cert}",
                  f"keyfile {options.pki.server.key}", "require_certificate true",
                  "use_identity_as_username true", "tls_version tlsv1.2"]
    if options.acl is not None:
        acl_path = directory / "acl"
        acl_path.write_text(render_acl(options.acl))
        lines.append(f"acl_file {acl_path}")
    lines += list(options.extra)
    return "\n".join(lines) + "\n"


def render_acl(rules: Sequence[AclRule]) -> str:
    anonymous = [r for r in rules if r.user is None]
    out = [f"topic {r.access} {r.topic}" for r in anonymous]
    users = sorted({r.user for r in rules if r.user is not None})
    for user in users:
        out.append(f"\nuser {user}")
        out += [f"topic {r.access} {r.topic}" for r in rules if r.user == user]
    return "\n".join(out) + "\n"


@dataclass
class Mosquitto:
    """One mosquitto process. ``start()`` / ``stop()`` / ``kill()`` / ``restart()``; the port
    and the data directory (persistence) survive a restart."""

    directory: Path
    options: BrokerOptions = field(default_factory=BrokerOptions)
    port: int = 0
    pid: int | None = None
    config_text: str | None = None  # a ready-made mosquitto.conf (then `port` is required)
    _proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        scheme = "mqtts" if self.options.pki or (
            self.config_text and "certfile" in self.config_text) else "mqtt"
        return f"{scheme}://{LOOPBACK}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.directory / "mosquitto.log"

    def start(self, timeout_s: float = 10.0) -> Mosquitto:
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not Path(binary).exists():
            raise FileNotFoundError("mosquitto is not installed (apt-get install mosquitto)")
        self.directory.mkdir(parents=True, exist_ok=True)
        if not self.port:
            self.port = free_port()
        conf = self.directory / "mosquitto.conf"
        conf.write_text(self.config_text or render_config(self.options, self.port,
                                                          self.directory))
        with (self.directory / "stderr.log").open("ab") as stderr:
            self._proc = subprocess.Popen([binary, "-c", str(conf)], stdin=subprocess.DEVNULL,
                                          stdout=subprocess.DEVNULL, stderr=stderr)
        self.pid = self._proc.pid
        try:
            wait_port(self.port, timeout_s, pid=self.pid)
        except (RuntimeError, TimeoutError) as exc:
            self.kill()
            log = "".join(p.read_text(errors="replace") for p in
                          (self.directory / "stderr.log", self.log_path) if p.exists())
            raise RuntimeError(f"mosquitto did not start: {exc}\n{log[-2000:]}") from exc
        return self

    def _signal(self, signum: int, timeout_s: float) -> None:
        _end(self._proc, signum, timeout_s)
        self._proc, self.pid = None, None

    def save(self, timeout_s: float = 5.0) -> None:
        """SIGUSR1: mosquitto writes its in-memory database (sessions, subscriptions, queued
        messages) now; returns once the file changed. A SIGKILL after this loses only what
        came later."""
        db = self.directory / "mosquitto.db"
        before = db.stat().st_mtime_ns if db.exists() else 0
        assert self.pid is not None
        os.kill(self.pid, signal.SIGUSR1)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if db.exists() and db.stat().st_mtime_ns != before:
                return
            time.sleep(0.01)
        raise TimeoutError(f"mosquitto did not save {db} within {timeout_s} s")

    def stop(self, timeout_s: float = 5.0) -> None:
        """SIGTERM: mosquitto saves its persistence file and exits."""
        self._signal(signal.SIGTERM, timeout_s)

    def kill(self) -> None:
        """SIGKILL: a crash, nothing saved beyond the last autosave."""
        self._signal(signal.SIGKILL, 5.0)

    def restart(self, *, hard: bool = False) -> None:
        self.kill() if hard else self.stop()
        self.start()

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------- amqtt fallback


@dataclass
class EmbeddedBroker:
    """amqtt in a child process (``python -m hil.broker --amqtt PORT``), stopped by pid."""

    port: int = 0
    pid: int | None = None
    _proc: subprocess.Popen[bytes] | None = None
    directory: Path | None = None    # amqtt.log goes here (else the system's temp folder)

    @property
    def url(self) -> str:
        return f"mqtt://{LOOPBACK}:{self.port}"

    @property
    def log_path(self) -> Path:
        return (self.directory or Path(tempfile.gettempdir())) / f"amqtt-{self.port}.log"

    def start(self, timeout_s: float = 15.0) -> EmbeddedBroker:
        if not self.port:
            self.port = free_port()
        # amqtt logs every client that goes away (a warning, sometimes with a traceback):
        # that is the broker's business, not the demo's console. It goes to amqtt.log.
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen([sys.executable, "-m", "hil.broker", "--amqtt",
                                           str(self.port)], stdin=subprocess.DEVNULL,
                                          stdout=log, stderr=subprocess.STDOUT)
        self.pid = self._proc.pid
        try:
            wait_port(self.port, timeout_s, pid=self.pid)
        except (RuntimeError, TimeoutError):
            self.stop()
            raise
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        _end(self._proc, signal.SIGTERM, timeout_s)
        self._proc, self.pid = None, None


def _end(proc: subprocess.Popen[bytes] | None, signum: int, timeout_s: float) -> None:
    """Send ``signum`` to a broker process and reap it; SIGKILL if it outlives the wait."""
    if proc is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signum)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(5)


def start_broker(directory: Path, options: BrokerOptions | None = None) -> Mosquitto | EmbeddedBroker:
    """mosquitto when installed, else the embedded amqtt broker (plain, no TLS/ACL).
    ``EDGE_AGENT_HIL_BROKER=amqtt`` picks the embedded one even where mosquitto exists
    (what a machine without mosquitto gets; the tests use it)."""
    embedded = os.environ.get("EDGE_AGENT_HIL_BROKER") == "amqtt"
    if not embedded and (shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists()):
        return Mosquitto(directory, options or BrokerOptions()).start()
    if options is not None and (options.pki is not None or options.acl is not None):
        raise FileNotFoundError("TLS/ACL need mosquitto (apt-get install mosquitto)")
    return EmbeddedBroker(directory=directory).start()


def _run_amqtt(port: int) -> None:  # pragma: no cover - child process
    import asyncio
    import logging
    import warnings

    from amqtt.broker import Broker

    # This process's stdout/stderr are amqtt.log (EmbeddedBroker.start): keep the log, and
    # keep Python's warnings (amqtt's deprecations) in it too, never on the demo's console.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: "
                        "%(message)s")
    logging.captureWarnings(True)
    warnings.simplefilter("default")

    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"{LOOPBACK}:{port}"}},
        "sys_interval": 0,
        "auth": {"allow-anonymous": True},
        "topic-check": {"enabled": False},
    }

    async def main() -> None:
        broker = Broker(config)
        await broker.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        await stop.wait()
        await broker.shutdown()

    asyncio.run(main())


if __name__ == "__main__":  # pragma: no cover
    if len(sys.argv) == 3 and sys.argv[1] == "--amqtt":
        _run_amqtt(int(sys.argv[2]))
    else:
        print("usage: python -m hil.broker --amqtt PORT", file=sys.stderr)
        sys.exit(2)
