"""``edge-agent``: the command line.

Every failure the user can cause (a missing key, a world-readable key file, a bad config, an
unreachable broker) is one clear line on stderr and a non-zero exit, never a traceback.
Set EDGE_AGENT_DEBUG=1 to see tracebacks. Heavy modules are imported inside the commands
that need them, so ``--help`` and ``keys`` stay fast on a Pi.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from agent import __version__
from agent.errors import ConfigError, EdgeAgentError

if TYPE_CHECKING:
    from agent.keys import KeyStore

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

    public, secp = record["ed25519"], record["secp256k1"]
    assert isinstance(public, bytes) and isinstance(secp, bytes)  # check_record made sure
    print(f"device:       {record['device']}")
    print(f"fingerprint:  {fingerprint(public)}")
    print(f"key id (kid): {key_id(public).hex()}")
    print(f"ed25519:      {public.hex()}")
    print(f"secp256k1:    {secp.hex()}")
    from agent.channel.state import eth_address
    print(f"address:      0x{eth_address(secp).hex()}")
    print(f"\n{record['type']} record (JSON; give it to `edge-agent registry add`):")
    print(record_to_json(record))
    if qr:
        from agent.qr import print_terminal

        print("\nthe same record as QR codes (fit a 60-column terminal; "
              "`keys export --qr FILE.png` prints one code):")
        sys.stdout.flush()
        print_terminal(record_to_cbor(record), sys.stdout)


def _key_store(state_dir: Path, *, writes: bool, create: bool = False) -> KeyStore:
    """The key store, after checking the state directory; a command that writes state takes
    the directory's lock first (agent/statedir.py: one agent per state directory)."""
    from agent.keys import KeyStore
    from agent.statedir import check_state_dir, lock_state_dir

    if writes:
        check_state_dir(state_dir, create=create)
        lock_state_dir(state_dir, "this command", reentrant=True)
    else:
        check_state_dir(state_dir, create=False)
    return KeyStore(state_dir)


def cmd_keys_init(args: argparse.Namespace) -> int:
    store = _key_store(args.state_dir, writes=True, create=True)
    keys, record = store.init(args.device_id)
    print(f"created device keys in {store.dir} (secret files mode 0600, never printed)")
    _print_record(record, qr=not args.no_qr)
    return EXIT_OK


def cmd_keys_show(args: argparse.Namespace) -> int:
    from agent.keys import fingerprint

    store = _key_store(args.state_dir, writes=False)
    keys = store.load()
    rows = {"device": keys.device_id, "fingerprint": fingerprint(keys.identity.public),
            "kid": keys.identity.kid.hex(), "ed25519": keys.identity.public.hex(),
            "secp256k1": keys.settlement.public.hex(),
            "address": "0x" + keys.settlement.address.hex(), "key_files": str(store.dir)}
    if args.json:
        print(json.dumps(rows))
        return EXIT_OK
    labels = {"kid": "key id (kid)", "key_files": "key files"}
    for name, value in rows.items():
        print(f"{labels.get(name, name) + ':':<14}{value}")
    return EXIT_OK


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    store = _key_store(args.state_dir, writes=True)
    _, record = store.rotate()
    print("rotated the device keys; the old identity key signed this record:")
    _print_record(record, qr=not args.no_qr)
    return EXIT_OK


def cmd_keys_export(args: argparse.Namespace) -> int:
    from agent.keys import record_to_cbor, record_to_json

    record = _key_store(args.state_dir, writes=False).latest_record()
    if args.qr is not None:
        from agent.qr import save_image

        try:
            save_image(record_to_cbor(record), args.qr)
        except ValueError as exc:
            raise ConfigError(key="--qr", expected="a file name ending in .png or .svg",
                              found=str(args.qr)) from exc
        except OSError as exc:
            raise ConfigError(f"{args.qr}: cannot write the QR image: {exc.strerror}") from None
        print(f"wrote the {record['type']} record as a QR code to {args.qr}")
        return EXIT_OK
    data = record_to_cbor(record) if args.format == "cbor" else \
        (record_to_json(record) + "\n").encode()
    if args.out and args.out != "-":   # "-": stdout, as without --out
        Path(args.out).write_bytes(data)
        print(f"wrote the {record['type']} record to {args.out}")
    else:
        sys.stdout.buffer.write(data)
    return EXIT_OK


# --- registry -----------------------------------------------------------------------------

RECORD_FORMS = "a provisioning or rotation record (the JSON or CBOR of `keys export`, or the " \
    "QR text EVEDGE1:...)"


def _read_record(path: str) -> dict[str, object]:
    from agent import dcbor
    from agent.errors import DecodeError, MalformedEnvelope
    from agent.keys import record_from_json
    from agent.qr import decode_text

    try:
        raw = sys.stdin.buffer.read(1 << 16) if path == "-" else _read_small(Path(path))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the record: {exc.strerror}") from None
    text = raw.strip()
    try:
        if text.startswith(b"EVEDGE"):  # the QR text(s), as a scanner app gives them back
            raw = decode_text(text.decode("ascii")) or b""
        elif text.startswith(b"{"):
            return record_from_json(raw.decode("utf-8"))
        record = dcbor.loads(raw, max_bytes=4096)
    except (DecodeError, MalformedEnvelope, ValueError):
        # The decoder's own words ("need 729618471703438689 bytes") mean nothing here.
        raise MalformedEnvelope(f"{path}: not {RECORD_FORMS}",
                                reason="malformed-record") from None
    if not isinstance(record, dict):
        raise MalformedEnvelope(f"{path}: not {RECORD_FORMS}", reason="malformed-record")
    return record


def _read_small(path: Path, limit: int = 1 << 16) -> bytes:
    with path.open("rb") as handle:
        return handle.read(limit)


def cmd_registry_add(args: argparse.Namespace) -> int:
    from agent.fleet_keys import FleetRegistry
    from agent.keys import fingerprint

    registry = FleetRegistry.load_or_empty(args.registry)
    record = _read_record(args.record)
    known = set(registry.keys)
    entry = registry.add_record(record, replace=args.replace)
    if entry.kid in known:
        print(f"key {entry.kid.hex()} ({fingerprint(entry.ed25519)}) of device {entry.device} "
              f"is already in {args.registry}: nothing changed")
        return EXIT_OK
    registry.save(args.registry)
    how = f"; it replaces key {', '.join(k.hex() for k in entry.replaces)} (recorded)" \
        if entry.replaces else ""
    print(f"proof of possession checks: added key {entry.kid.hex()} "
          f"({fingerprint(entry.ed25519)}) for device {entry.device} to {args.registry}{how}")
    return EXIT_OK


def cmd_registry_revoke(args: argparse.Namespace) -> int:
    from agent.fleet_keys import FleetRegistry

    registry = FleetRegistry.load(args.registry)
    try:
        kid = bytes.fromhex(args.kid)
        if len(kid) != 8:
            raise ValueError
    except ValueError:
        raise ConfigError(key="kid", expected="an 8-byte key id: 16 hex digits",
                          found=args.kid) from None
    if not registry.revoke(kid):
        print(f"key {args.kid} was already revoked in {args.registry}: nothing changed")
        return EXIT_OK
    registry.save(args.registry)
    print(f"revoked key {args.kid} (device {registry.device_of(kid)}) in {args.registry}")
    return EXIT_OK


def cmd_registry_show(args: argparse.Namespace) -> int:
    from agent.fleet_keys import FleetRegistry
    from agent.keys import fingerprint

    registry = FleetRegistry.load(args.registry)
    entries = sorted(registry.keys.values(), key=lambda e: (e.device, e.added_ns))
    successors = registry.successors()  # once: per entry it would be a pass over all keys
    if args.json:
        print(json.dumps({
            "devices": registry.devices(), "revoked": sorted(k.hex() for k in registry.revoked),
            "keys": [{"device": e.device, "kid": e.kid.hex(), "fingerprint": fingerprint(e.ed25519),
                      "ed25519": e.ed25519.hex(), "secp256k1": e.secp256k1.hex(),
                      "address": "0x" + e.address.hex(), "added_ns": e.added_ns,
                      "rotated_from": e.rotated_from.hex() if e.rotated_from else None,
                      "replaces": [k.hex() for k in e.replaces],
                      "superseded_by": successors[e.kid].kid.hex() if e.kid in successors
                      else None,
                      "revoked": e.kid in registry.revoked} for e in entries]}))
        return EXIT_OK
    for entry in entries:
        state = "REVOKED" if entry.kid in registry.revoked else "valid"
        successor = successors.get(entry.kid)
        if successor is not None:  # still valid for what it signed (agent.fleet_keys)
            how = "rotated to" if successor.rotated_from == entry.kid else "replaced by"
            state += f" (for what it signed; {how} {successor.kid.hex()})"
        how = f"  replaces {', '.join(k.hex() for k in entry.replaces)}" if entry.replaces else ""
        print(f"{entry.device}  kid {entry.kid.hex()}  {fingerprint(entry.ed25519)}  "
              f"0x{entry.address.hex()}  {state}{how}")
    print(f"{len(registry.devices())} device(s), {len(registry.keys)} key(s), "
          f"{len(registry.revoked)} revoked")
    return EXIT_OK


# --- verify, config, demo -----------------------------------------------------------------

def cmd_verify(args: argparse.Namespace) -> int:
    from agent.fleet_keys import FleetRegistry
    from agent.verify import ENVELOPE_MAGIC, verify_capture

    if args.logbook:
        from agent.fleet.logbook import verify_bundle

        try:
            bundle = Path(args.logbook).read_bytes()
        except OSError as exc:
            raise ConfigError(f"{args.logbook}: cannot read the logbook: {exc.strerror}") \
                from None
        # The bundle carries its keys; a registry file, when there is one, is the trust
        # anchor (every signing key must be in it); without one the report says so.
        if Path(args.registry).exists():
            trusted: FleetRegistry | None = FleetRegistry.load(args.registry)
        elif Path(args.registry) == default_registry():
            trusted = None
        else:
            raise ConfigError(f"{args.registry}: no such registry file (leave --registry out "
                              f"to check the logbook against its own keys only)")
        book = verify_bundle(bundle, trusted, str(args.registry))
        print(book.to_json() if args.json else book.format())
        return EXIT_OK if book.ok else EXIT_FAIL
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
        if data and ENVELOPE_MAGIC not in data:
            raise ConfigError(f"{args.file}: not a capture of envelopes: none of its "
                              f"{len(data)} bytes starts one (a capture is a CBOR sequence "
                              f"of COSE_Sign1 envelopes, like the demo's capture.cbor)")
        report = verify_capture(data, registry)
    print(report.to_json() if args.json else report.format())
    return EXIT_OK if report.ok else EXIT_FAIL


def cmd_config_check(args: argparse.Namespace) -> int:
    from agent.config import load_config
    from agent.runtime import Settings, build_chargers, build_sources

    try:
        config = load_config(args.file)
        Settings.from_config(config, config.device.id or "device-id-from-keys")
        sources = build_sources(config)  # validates each source's options; opens nothing
        build_chargers(config)  # each charger's options too
    except ConfigError as exc:
        if not args.json:
            raise
        print(json.dumps({"file": str(args.file), "ok": False, "error": str(exc),
                          "key": exc.key, "expected": exc.expected}))
        return EXIT_USAGE
    if args.json:
        print(json.dumps({"file": str(args.file), "ok": True, "role": config.device.role,
                          "sources": [{"id": r.source.id, "kind": r.kind} for r in sources],
                          "chargers": [{"id": c.id, "kind": c.kind} for c in config.chargers]}))
        return EXIT_OK
    kinds = ", ".join([f"{r.source.id} ({r.kind})" for r in sources]
                      + [f"charger {c.id} ({c.kind})" for c in config.chargers]) or "no sources"
    print(f"{args.file}: ok ({config.device.role}; {kinds})")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    import asyncio

    from agent.logsetup import setup_logging
    from agent.runtime import run_agent

    setup_logging(args.verbose, args.log_format)
    asyncio.run(run_agent(args.config))
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    from agent.status_view import resolve_status_path, status_summary

    text, code = status_summary(resolve_status_path(args.config, args.file,
                                                    state_dir=args.state_dir),
                                as_json=args.json)
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

    def add(parent: argparse._SubParsersAction[argparse.ArgumentParser], name: str, func: Callable[..., int],
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
    p.add_argument("--json", action="store_true", help="one JSON object")
    p = add(keys_sub, "rotate", cmd_keys_rotate,
            "replace the keys; the old key signs a rotation record (seq continues)")
    state_dir(p)
    p.add_argument("--no-qr", action="store_true", help="do not print the QR code")
    p = add(keys_sub, "export", cmd_keys_export,
            "write the latest provisioning/rotation record (public data only)")
    state_dir(p)
    p.add_argument("--format", choices=("json", "cbor"), default="json")
    p.add_argument("--out", help="file to write (default: stdout)")
    p.add_argument("--qr", type=Path, metavar="FILE.png|FILE.svg",
                   help="write the record as one QR code image to print (instead of --out)")

    reg = sub.add_parser("registry", help="the fleet registry: admit, list and revoke keys",
                         description="The fleet registry of devices and keys (a TOML file).")
    reg_sub = reg.add_subparsers(dest="registry_command", metavar="ACTION", required=True)
    p = add(reg_sub, "add", cmd_registry_add, "check a provisioning or rotation record's proof "
            "of possession and admit its key")
    p.add_argument("record", help="record file: JSON, CBOR or the QR text; - for stdin")
    p.add_argument("--replace", action="store_true",
                   help="admit a provisioning record for a device id that already has keys "
                        "(a legitimate re-provisioning; recorded in the registry)")
    registry_path(p)
    p = add(reg_sub, "show", cmd_registry_show, "list devices and keys")
    registry_path(p)
    p.add_argument("--json", action="store_true", help="one JSON object")
    p = add(reg_sub, "revoke", cmd_registry_revoke, "mark a key id as revoked")
    p.add_argument("kid", help="key id (16 hex digits)")
    registry_path(p)

    p = add(sub, "verify", cmd_verify, "check a capture of envelopes (or a live MQTT stream): "
            "signatures, seq continuity, hash links; exits 1 if anything fails")
    p.add_argument("file", nargs="?", help="capture file: envelopes as a CBOR sequence")
    p.add_argument("--mqtt", metavar="URL", help="subscribe to a broker and verify live "
                   "(mqtt://host:port or mqtts://...)")
    p.add_argument("--logbook", metavar="FILE", help="check a mileage logbook bundle offline "
                   "(edge-agent fleet logbook): signatures, chains, keys, odometer")
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
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="-v: the agent's own debug lines; -vv: also the MQTT library's "
                        "packet dump")
    p.add_argument("--log-format", choices=("auto", "text", "json", "journal"), default="auto",
                   help="auto (default): journal under systemd (priorities and structured "
                        "fields), else text; json: one object a line")

    p = add(sub, "status", cmd_status, "print a running agent's sources, rates, spool depth, "
            "uplink and channel state and last errors (exit 0 running, 3 not running, 4 the "
            "status file cannot be read)")
    p.add_argument("--config", type=Path, default=None,
                   help="the agent's config (to find its status file)")
    p.add_argument("--file", type=Path, default=None, help="the status file itself")
    p.add_argument("--state-dir", type=Path, default=None,
                   help="the agent's state directory (default: $EDGE_AGENT_STATE_DIR, else the "
                        "service's /run/edge-agent)")
    p.add_argument("--json", action="store_true", help="one JSON object (running, reason, "
                   "file, status: the snapshot)")

    cfg = sub.add_parser("config", help="check a config file",
                         description="Config file tools.")
    cfg_sub = cfg.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    p = add(cfg_sub, "check", cmd_config_check, "validate a config file and say what is wrong")
    p.add_argument("file")
    p.add_argument("--json", action="store_true",
                   help="one JSON object: ok, role, sources; or ok false with the error")

    _register_plugins(sub)
    return parser


COMMANDS_GROUP = "edge_agent.commands"


def _register_plugins(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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


_OS_ERROR_HINTS = {
    errno.EACCES: "permission denied: check the owner and mode of the file and of its folder "
                  "(ls -ld), or run as a user who may write there",
    errno.EPERM: "not permitted: check the owner and mode of the file and of its folder",
    errno.EROFS: "the file system is read-only: choose a folder on a writable one",
    errno.ENOTDIR: "a part of this path is a file, not a folder: choose another path",
    errno.EISDIR: "this is a folder; a file was expected here",
    errno.ENOENT: "no such file or folder",
    errno.ENOSPC: "the disk is full: free some space and run it again",
}


def os_error_text(exc: OSError) -> str:
    """``PATH: what went wrong, in words``, for a message (no Python repr of the path)."""
    what = _OS_ERROR_HINTS.get(exc.errno or 0, exc.strerror or str(exc))
    path = exc.filename if exc.filename is not None else "(no path)"
    return f"{os.fsdecode(path)}: {what}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    command: Callable[[argparse.Namespace], int] = args.func  # set by every subcommand
    try:
        return command(args)
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
    except OSError as exc:
        # A file or directory a command was given or needs (demo --out, a key store's
        # folder) that cannot be written or read: say which and why, not a traceback.
        if os.environ.get("EDGE_AGENT_DEBUG"):
            raise
        print(f"edge-agent: error: {os_error_text(exc)}", file=sys.stderr)
        return EXIT_FAIL
    finally:
        if "agent.statedir" in sys.modules:   # a command's lock lasts as long as the command
            sys.modules["agent.statedir"].release_all()


if __name__ == "__main__":
    sys.exit(main())
