"""``edge-agent``: the command line.

Every failure the user can cause (a missing key, a world-readable key file, a bad config, an
unreachable broker) is one clear line on stderr and a non-zero exit, never a traceback.
Set EDGE_AGENT_DEBUG=1 to see tracebacks. Heavy modules are imported inside the commands
that need them, so ``--help`` and ``keys`` stay fast on a Pi.
"""

from __future__ import annotations

import argparse
import base64
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from agent import __version__
from agent.errors import ConfigError, EdgeAgentError

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


def default_state_dir() -> Path:
    env = os.environ.get("EDGE_AGENT_STATE_DIR")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/edge-agent")
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "edge-agent"


def default_registry() -> Path:
    return Path(os.environ.get("EDGE_AGENT_REGISTRY", "fleet.toml"))


# --- keys ---------------------------------------------------------------------------------

def _print_record(record: dict[str, object], qr: bool) -> None:
    from agent.keys import fingerprint, key_id, record_to_cbor, record_to_json

    public = record["ed25519"]
    assert isinstance(public, bytes)
    print(f"device:       {record['device']}")
    print(f"fingerprint:  {fingerprint(public)}")
    print(f"key id (kid): {key_id(public).hex()}")
    print(f"ed25519:      {public.hex()}")
    print(f"secp256k1:    {record['secp256k1'].hex()}")  # type: ignore[union-attr]
    from agent.channel.state import eth_address
    print(f"address:      0x{eth_address(record['secp256k1']).hex()}")  # type: ignore[arg-type]
    print(f"\n{record['type']} record (JSON; give it to `edge-agent registry add`):")
    print(record_to_json(record))
    if qr:
        import segno

        text = "EVEDGE1:" + base64.urlsafe_b64encode(record_to_cbor(record)).decode().rstrip("=")
        print("\nthe same record as a QR code (CBOR, base64url):")
        segno.make(text, error="l").terminal(compact=True)


def cmd_keys_init(args: argparse.Namespace) -> int:
    from agent.keys import KeyStore

    store = KeyStore(args.state_dir)
    keys, record = store.init(args.device_id)
    print(f"created device keys in {store.dir} (secret files mode 0600, never printed)")
    _print_record(record, qr=not args.no_qr)
    return EXIT_OK


def cmd_keys_show(args: argparse.Namespace) -> int:
    from agent.keys import KeyStore, fingerprint

    store = KeyStore(args.state_dir)
    keys = store.load()
    print(f"device:       {keys.device_id}")
    print(f"fingerprint:  {fingerprint(keys.identity.public)}")
    print(f"key id (kid): {keys.identity.kid.hex()}")
    print(f"ed25519:      {keys.identity.public.hex()}")
    print(f"secp256k1:    {keys.settlement.public.hex()}")
    print(f"address:      0x{keys.settlement.address.hex()}")
    print(f"key files:    {store.dir}")
    return EXIT_OK


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    from agent.keys import KeyStore

    store = KeyStore(args.state_dir)
    _, record = store.rotate()
    print("rotated the device keys; the old identity key signed this record:")
    _print_record(record, qr=not args.no_qr)
    return EXIT_OK


def cmd_keys_export(args: argparse.Namespace) -> int:
    from agent.keys import KeyStore, record_to_cbor, record_to_json

    record = KeyStore(args.state_dir).latest_record()
    data = record_to_cbor(record) if args.format == "cbor" else \
        (record_to_json(record) + "\n").encode()
    if args.out:
        Path(args.out).write_bytes(data)
        print(f"wrote the {record['type']} record to {args.out}")
    else:
        sys.stdout.buffer.write(data)
    return EXIT_OK


# --- registry -----------------------------------------------------------------------------

def _read_record(path: str) -> dict[str, object]:
    from agent import dcbor
    from agent.errors import DecodeError, MalformedEnvelope
    from agent.keys import record_from_json

    try:
        raw = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the record: {exc.strerror}") from None
    text = raw.strip()
    if text.startswith(b"EVEDGE1:"):  # the QR payload, as a scanner app gives it back
        text = text[len(b"EVEDGE1:"):]
        raw = base64.urlsafe_b64decode(text + b"=" * (-len(text) % 4))
    elif text.startswith(b"{"):
        return record_from_json(raw.decode("utf-8", "replace"))
    try:
        record = dcbor.loads(raw, max_bytes=4096)
    except DecodeError as exc:
        raise MalformedEnvelope(f"{path}: not a record (JSON, CBOR or QR text): {exc}") from None
    if not isinstance(record, dict):
        raise MalformedEnvelope(f"{path}: not a record")
    return record


def cmd_registry_add(args: argparse.Namespace) -> int:
    from agent.fleet_keys import FleetRegistry
    from agent.keys import fingerprint

    registry = FleetRegistry.load_or_empty(args.registry)
    entry = registry.add_record(_read_record(args.record))
    registry.save(args.registry)
    print(f"proof of possession checks: added key {entry.kid.hex()} "
          f"({fingerprint(entry.ed25519)}) for device {entry.device} to {args.registry}")
    return EXIT_OK


def cmd_registry_revoke(args: argparse.Namespace) -> int:
    from agent.fleet_keys import FleetRegistry

    registry = FleetRegistry.load(args.registry)
    try:
        kid = bytes.fromhex(args.kid)
        if len(kid) != 8:
            raise ValueError
    except ValueError:
        raise ConfigError(key="kid", expected="an 8-byte key id in hex", found=args.kid) from None
    registry.revoke(kid)
    registry.save(args.registry)
    print(f"revoked key {args.kid} in {args.registry}")
    return EXIT_OK


def cmd_registry_show(args: argparse.Namespace) -> int:
    from agent.fleet_keys import FleetRegistry
    from agent.keys import fingerprint

    registry = FleetRegistry.load(args.registry)
    for entry in sorted(registry.keys.values(), key=lambda e: (e.device, e.added_ns)):
        state = "REVOKED" if entry.kid in registry.revoked else "valid"
        print(f"{entry.device}  kid {entry.kid.hex()}  {fingerprint(entry.ed25519)}  "
              f"0x{entry.address.hex()}  {state}")
    print(f"{len(registry.devices())} device(s), {len(registry.keys)} key(s), "
          f"{len(registry.revoked)} revoked")
    return EXIT_OK


# --- verify, config, demo -----------------------------------------------------------------

def cmd_verify(args: argparse.Namespace) -> int:
    from agent.fleet_keys import FleetRegistry
    from agent.verify import verify_capture

    registry = FleetRegistry.load(args.registry)
    if args.mqtt:
        import asyncio

        from agent.live_verify import verify_mqtt  # lands with the uplink

        report = asyncio.run(verify_mqtt(args.mqtt, registry, timeout_s=args.duration,
                                          idle_s=args.idle, ca_file=args.ca,
                                          cert_file=args.cert, key_file=args.key))
    else:
        if not args.file:
            raise ConfigError("verify needs a capture FILE or --mqtt URL")
        try:
            data = Path(args.file).read_bytes()
        except OSError as exc:
            raise ConfigError(f"{args.file}: cannot read the capture: {exc.strerror}") from None
        report = verify_capture(data, registry)
    print(report.to_json() if args.json else report.format())
    return EXIT_OK if report.ok else EXIT_FAIL


def cmd_config_check(args: argparse.Namespace) -> int:
    from agent.config import load_config
    from agent.runtime import Settings, build_chargers, build_sources

    config = load_config(args.file)
    Settings.from_config(config, config.device.id or "device-id-from-keys")
    sources = build_sources(config)  # validates each source's options; opens nothing
    build_chargers(config)  # each charger's options too
    kinds = ", ".join([f"{r.source.id} ({r.kind})" for r in sources]
                      + [f"charger {c.id} ({c.kind})" for c in config.chargers]) or "no sources"

    print(f"{args.file}: ok ({config.device.role}; {kinds})")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    from agent.runtime import run_agent

    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    asyncio.run(run_agent(args.config))
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    from agent.status import resolve_status_path, status_summary

    text, code = status_summary(resolve_status_path(args.config, args.file))
    print(text)
    return code


# --- parser -------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edge-agent",
        description="Edge agent for EVs and charging stations: signed, hash-chained readings "
                    "over MQTT, and pay-per-kWh payment channels settled on an EVM chain.")
    parser.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(parent: argparse._SubParsersAction, name: str, func: Callable[..., int],
            help_text: str) -> argparse.ArgumentParser:
        p = parent.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(func=func)
        return p

    def state_dir(p: argparse.ArgumentParser) -> None:
        p.add_argument("--state-dir", type=Path, default=default_state_dir(),
                       help="where the device keys live (default: $EDGE_AGENT_STATE_DIR, "
                            "/var/lib/edge-agent as root, else ~/.local/state/edge-agent)")

    def registry_path(p: argparse.ArgumentParser) -> None:
        p.add_argument("--registry", type=Path, default=default_registry(),
                       help="fleet registry TOML (default: $EDGE_AGENT_REGISTRY or ./fleet.toml)")

    keys = sub.add_parser("keys", help="create, show, rotate and export the device keys",
                          description="Device keys: Ed25519 identity, secp256k1 settlement.")
    keys_sub = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    p = add(keys_sub, "init", cmd_keys_init, "generate the device keys here (files 0600) and "
            "print the public keys, fingerprint and a signed provisioning record (JSON + QR)")
    state_dir(p)
    p.add_argument("--device-id", help="device id (default: derived from the key fingerprint)")
    p.add_argument("--no-qr", action="store_true", help="do not print the QR code")
    p = add(keys_sub, "show", cmd_keys_show, "print the public keys and fingerprint")
    state_dir(p)
    p = add(keys_sub, "rotate", cmd_keys_rotate,
            "replace the keys; the old key signs a rotation record (seq continues)")
    state_dir(p)
    p.add_argument("--no-qr", action="store_true", help="do not print the QR code")
    p = add(keys_sub, "export", cmd_keys_export,
            "write the latest provisioning/rotation record (public data only)")
    state_dir(p)
    p.add_argument("--format", choices=("json", "cbor"), default="json")
    p.add_argument("--out", help="file to write (default: stdout)")

    reg = sub.add_parser("registry", help="the fleet registry: admit, list and revoke keys",
                         description="The fleet registry of devices and keys (a TOML file).")
    reg_sub = reg.add_subparsers(dest="registry_command", metavar="ACTION", required=True)
    p = add(reg_sub, "add", cmd_registry_add, "check a provisioning or rotation record's proof "
            "of possession and admit its key")
    p.add_argument("record", help="record file: JSON, CBOR or the QR text; - for stdin")
    registry_path(p)
    p = add(reg_sub, "show", cmd_registry_show, "list devices and keys")
    registry_path(p)
    p = add(reg_sub, "revoke", cmd_registry_revoke, "mark a key id as revoked")
    p.add_argument("kid", help="key id (16 hex digits)")
    registry_path(p)

    p = add(sub, "verify", cmd_verify, "check a capture of envelopes (or a live MQTT stream): "
            "signatures, seq continuity, hash links; exits 1 if anything fails")
    p.add_argument("file", nargs="?", help="capture file: envelopes as a CBOR sequence")
    p.add_argument("--mqtt", metavar="URL", help="subscribe to a broker and verify live "
                   "(mqtt://host:port or mqtts://...)")
    p.add_argument("--duration", type=float, default=None,
                   help="with --mqtt: stop after this many seconds (default: no limit)")
    p.add_argument("--idle", type=float, default=10.0,
                   help="with --mqtt: stop after this many seconds without a message (default 10)")
    p.add_argument("--ca", type=Path, help="with mqtts://: the CA that signed the broker")
    p.add_argument("--cert", type=Path, help="with mqtts://: client certificate")
    p.add_argument("--key", type=Path, help="with mqtts://: client key")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    registry_path(p)

    p = add(sub, "run", cmd_run, "run the agent (vehicle or station role) from a config file "
            "until SIGTERM/SIGINT; systemd's Type=notify and watchdog are supported")
    p.add_argument("--config", type=Path, required=True, help="the agent's TOML config")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")

    p = add(sub, "status", cmd_status, "print a running agent's sources, rates, spool depth, "
            "uplink and channel state and last errors (exit 0 running, 3 not running)")
    p.add_argument("--config", type=Path, default=None,
                   help="the agent's config (to find its status file)")
    p.add_argument("--file", type=Path, default=None, help="the status file itself")

    cfg = sub.add_parser("config", help="check a config file",
                         description="Config file tools.")
    cfg_sub = cfg.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    p = add(cfg_sub, "check", cmd_config_check, "validate a config file and say what is wrong")
    p.add_argument("file")

    _register_plugins(sub)
    return parser


COMMANDS_GROUP = "edge_agent.commands"


def _register_plugins(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Command groups registered as entry points (``edge_agent.commands``): the channel
    commands, and the demo and HIL commands that live with the simulators in hil/ (the
    core never imports hil, DESIGN s2). A group whose module needs a package that is not
    installed is left out (``edge-agent demo`` needs the demo extra); a bug inside one of
    our own modules is not hidden."""
    from importlib.metadata import entry_points

    for entry in sorted(entry_points(group=COMMANDS_GROUP), key=lambda e: e.name):
        try:
            register = entry.load()
        except ModuleNotFoundError as exc:
            if (exc.name or "").partition(".")[0] in ("agent", "firmware_adapters", "hil", ""):
                raise
            continue
        register(sub)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("edge-agent: interrupted", file=sys.stderr)
        return 130
    except EdgeAgentError as exc:
        if os.environ.get("EDGE_AGENT_DEBUG"):
            raise
        print(f"edge-agent: error: {exc}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, ConfigError) else EXIT_FAIL
    except BrokenPipeError:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
