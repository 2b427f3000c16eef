"""``edge-agent fleet ingest | key | registry | readings | gaps | devices | alarms | logbook``.

``register(subparsers)`` is the ``edge_agent.commands`` entry point (pyproject.toml).
``--db`` takes ``sqlite:///PATH`` (default ``sqlite:///fleet.db``, or $EDGE_AGENT_FLEET_DB) or
``postgresql://user@host:port/db``. Errors are our exceptions: one line, no traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import datetime as dt
import json
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from agent.errors import ConfigError

if TYPE_CHECKING:
    from agent.fleet.db import Database
    from agent.fleet.ingest import AnchorSettings

EXIT_OK, EXIT_FAIL = 0, 1
DEFAULT_KEY = Path("fleet-commit.ed25519")
DEFAULT_ANCHOR_KEY = Path("fleet-anchor.secp256k1")


def default_db() -> str:
    return os.environ.get("EDGE_AGENT_FLEET_DB", "sqlite:///fleet.db")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    fleet = subparsers.add_parser(
        "fleet", help="the fleet side: verified ingest, registry, queries, mileage logbook",
        description="The fleet side: ingest devices' envelopes into a database (SQLite or "
                    "PostgreSQL), query them, and write mileage logbooks anyone can verify.")
    sub = fleet.add_subparsers(dest="fleet_command", metavar="ACTION", required=True)

    def add(name: str, func: Callable[[argparse.Namespace], int], help_text: str,
            db: bool = True) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(func=func)
        if db:
            p.add_argument("--db", default=default_db(),
                           help="sqlite:///PATH or postgresql://... (default: "
                                "$EDGE_AGENT_FLEET_DB or sqlite:///fleet.db)")
        return p

    p = add("ingest", cmd_ingest, "subscribe (MQTT 5 shared subscription) and store every "
            "verified envelope; run as many as you like, on any machines")
    p.add_argument("--mqtt", required=True, metavar="URL", help="mqtt://host:port or mqtts://")
    p.add_argument("--group", default="fleet-ingest", help="shared subscription group")
    p.add_argument("--client-id", default=None,
                   help="MQTT client id (default fleet-ingest-<host>-<pid>; fix it to keep "
                        "the broker session across restarts)")
    p.add_argument("--commit-key", type=Path, default=DEFAULT_KEY,
                   help="Ed25519 key that signs commit marks (created 0600 when missing)")
    p.add_argument("--max-in-flight", type=int, default=256,
                   help="QoS 1 messages the broker may send before we acknowledge")
    p.add_argument("--batch", type=int, default=200, help="envelopes per transaction at most")
    p.add_argument("--ca", type=Path, help="with mqtts://: the broker's CA")
    p.add_argument("--cert", type=Path, help="with mqtts://: client certificate")
    p.add_argument("--key", type=Path, help="with mqtts://: client key")
    p.add_argument("--anchor-node", metavar="URL",
                   help="anchor Merkle roots of what this worker stores through this "
                        "JSON-RPC node (with --anchor-contract)")
    p.add_argument("--anchor-contract", metavar="0xADDRESS",
                   help="the anchor contract (`edge-agent fleet anchor-deploy`)")
    p.add_argument("--anchor-key", type=Path, default=DEFAULT_ANCHOR_KEY,
                   help="secp256k1 key that sends the anchoring transactions (created "
                        "0600 when missing; fund its address)")
    p.add_argument("--anchor-every", type=float, default=10.0, metavar="MINUTES",
                   help="anchoring period (default 10 minutes)")
    p.add_argument("-v", "--verbose", action="store_true")

    p = add("anchor-deploy", cmd_anchor_deploy, "deploy the anchor contract through a "
            "JSON-RPC node; prints its address", db=False)
    p.add_argument("--node", required=True, metavar="URL")
    p.add_argument("--anchor-key", type=Path, default=DEFAULT_ANCHOR_KEY)

    p = add("key", cmd_key, "print (and create) the commit-mark key: its public key goes "
            "into every agent's [spool] commit_keys", db=False)
    p.add_argument("--commit-key", type=Path, default=DEFAULT_KEY)

    reg = sub.add_parser("registry", help="the registry in the database (shared by workers)",
                         description="The fleet registry in the fleet database.")
    reg_sub = reg.add_subparsers(dest="fleet_registry_command", metavar="ACTION", required=True)

    def add_reg(name: str, func: Callable[[argparse.Namespace], int],
                help_text: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = reg_sub.add_parser(name, help=help_text,
                                                        description=help_text)
        p.set_defaults(func=func)
        p.add_argument("--db", default=default_db())
        return p

    p = add_reg("add", cmd_registry_add, "check a provisioning/rotation record and admit its key")
    p.add_argument("record", help="record file: JSON, CBOR or the QR text; - for stdin")
    p = add_reg("revoke", cmd_registry_revoke,
                "revoke a key for envelopes signed from now (or --at) on")
    p.add_argument("kid", help="key id (16 hex digits)")
    p.add_argument("--at", default=None, help="revocation time (ISO 8601 or ns; default now)")
    p = add_reg("import", cmd_registry_import, "copy keys and revocations from a fleet.toml")
    p.add_argument("file", type=Path)
    add_reg("show", cmd_registry_show, "list devices and keys")

    p = add("readings", cmd_readings, "readings as CSV or JSON lines")
    p.add_argument("--device")
    p.add_argument("--name", help="signal name, e.g. Vehicle.Speed or 1-0:1.8.0")
    p.add_argument("--since", help="ISO 8601 time or ns since the epoch")
    p.add_argument("--until", help="ISO 8601 time or ns since the epoch (exclusive)")
    p.add_argument("--format", choices=("csv", "jsonl"), default="csv")
    p = add("gaps", cmd_gaps, "seq ranges missing and not declared dropped, and missing "
            "tails (what the devices' signed heads name beyond the last stored)")
    p.add_argument("--device")
    add("devices", cmd_devices, "every device: last seen, seq, chain state, key")
    add("alarms", cmd_alarms, "forks, broken links, key/device mismatches")
    add("reverify", cmd_reverify, "check the refused messages again (after a registry add): "
        "those that verify now are stored")
    p = add("logbook", cmd_logbook, "write the mileage logbook of a vehicle: a bundle "
            "`edge-agent verify --logbook FILE` checks offline")
    p.add_argument("vin")
    p.add_argument("--out", type=Path, required=True)


def _open(args: argparse.Namespace) -> Database:
    from agent.fleet.db import open_database

    return open_database(args.db)


EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def parse_time(text: str | None) -> int | None:
    if text is None:
        return None
    if text.isdigit():
        return int(text)
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(key="time", expected="ISO 8601 (2026-05-01T12:00:00Z) or ns",
                          found=text) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    # integer arithmetic: a float of ns since 1970 has 1/4 us steps (...001 us -> ...1024 ns)
    return (when - EPOCH) // dt.timedelta(microseconds=1) * 1000


def cmd_ingest(args: argparse.Namespace) -> int:
    from agent.fleet.ingest import Ingest, IngestConfig, load_or_create_commit_key
    from agent.fleet.mqtt import BrokerConfig

    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    anchor = _anchor_settings(args)  # a bad option is an error before any key file is made
    key = load_or_create_commit_key(args.commit_key)
    if not 1 <= args.max_in_flight <= 65535:  # MQTT 5 Receive Maximum (s3.1.2.11.3)
        raise ConfigError(key="--max-in-flight", expected="1 to 65535",
                          found=args.max_in_flight)
    if args.batch < 1:
        raise ConfigError(key="--batch", expected="1 or more envelopes", found=args.batch)
    client_id = args.client_id or f"fleet-ingest-{os.uname().nodename}-{os.getpid()}"
    # A session the broker keeps for a day only pays with a client id that the next start
    # reuses: one named after this pid would be left behind in the shared group, holding
    # its share of the messages for a worker that never returns.
    expiry = 24 * 3600 if args.client_id else 0
    if not args.client_id:
        print(f"fleet ingest: client id {client_id}, a session for this run only (give "
              f"--client-id to keep the broker session across restarts)", file=sys.stderr)
    broker = BrokerConfig(args.mqtt, client_id, group=args.group,
                          max_in_flight=args.max_in_flight, ca_file=args.ca,
                          cert_file=args.cert, key_file=args.key, session_expiry_s=expiry)
    ingest = Ingest(IngestConfig(broker, args.db, batch_max=args.batch, anchor=anchor), key)
    print(f"fleet ingest: commit marks signed by {key.public.hex()} (kid {key.kid.hex()})",
          file=sys.stderr)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await ingest.run(stop)

    asyncio.run(main())
    return EXIT_OK


def _anchor_settings(args: argparse.Namespace) -> AnchorSettings | None:
    from agent.fleet.ingest import AnchorSettings, load_or_create_anchor_key

    if args.anchor_node is None and args.anchor_contract is None:
        return None
    if args.anchor_node is None or args.anchor_contract is None:
        raise ConfigError(key="--anchor-node/--anchor-contract", expected="both or neither",
                          found=args.anchor_node or args.anchor_contract)
    contract = _address(args.anchor_contract, "--anchor-contract")
    if args.anchor_every <= 0:
        raise ConfigError(key="--anchor-every", expected="minutes > 0", found=args.anchor_every)
    key = load_or_create_anchor_key(args.anchor_key)
    print(f"fleet ingest: anchoring every {args.anchor_every:g} min to 0x{contract.hex()} "
          f"from 0x{key.address.hex()}", file=sys.stderr)
    return AnchorSettings(args.anchor_node, contract, key, args.anchor_every * 60)


def _address(text: str, key: str) -> bytes:
    try:
        address = bytes.fromhex(text.removeprefix("0x"))
    except ValueError:
        address = b""
    if len(address) != 20:
        raise ConfigError(key=key, expected="a 20-byte address, 0x...", found=text)
    return address


def cmd_anchor_deploy(args: argparse.Namespace) -> int:
    from agent.fleet.anchor_chain import deploy_anchor
    from agent.fleet.ingest import load_or_create_anchor_key

    key = load_or_create_anchor_key(args.anchor_key)
    address, tx = deploy_anchor(args.node, key)
    print(f"anchor contract 0x{address.hex()} deployed in block {tx.block_number} "
          f"(tx 0x{tx.tx_hash.hex()}); run the ingest with --anchor-node {args.node} "
          f"--anchor-contract 0x{address.hex()}")
    return EXIT_OK


def cmd_key(args: argparse.Namespace) -> int:
    from agent.fleet.ingest import load_or_create_commit_key

    key = load_or_create_commit_key(args.commit_key)
    print(f"commit-mark key {args.commit_key} (secret, mode 0600)")
    print(f'agents: [spool] keep_until = "fleet-commit", commit_keys = ["{key.public.hex()}"]')
    return EXIT_OK


def cmd_registry_add(args: argparse.Namespace) -> int:
    from agent.cli import _read_record
    from agent.fleet import registry
    from agent.keys import fingerprint

    db = _open(args)
    record = _read_record(args.record)
    known = registry.load(db).records
    entry = registry.add_record(db, record)
    if entry.kid in known:
        print(f"key {entry.kid.hex()} ({fingerprint(entry.ed25519)}) of device {entry.device} "
              f"is already in the registry with its record: nothing changed")
        return EXIT_OK
    print(f"proof of possession checks: added key {entry.kid.hex()} "
          f"({fingerprint(entry.ed25519)}) for device {entry.device}")
    return EXIT_OK


def cmd_registry_revoke(args: argparse.Namespace) -> int:
    from agent.fleet import registry

    try:
        kid = bytes.fromhex(args.kid)
        if len(kid) != 8:
            raise ValueError
    except ValueError:
        raise ConfigError(key="kid", expected="an 8-byte key id in hex", found=args.kid) from None
    when, changed = registry.revoke(_open(args), kid, parse_time(args.at))
    if changed:
        print(f"revoked key {args.kid} for envelopes signed from {_iso(when)} on")
    else:
        print(f"key {args.kid} is already revoked from {_iso(when)} on, no later than "
              f"{args.at or 'now'}: nothing changed")
    return EXIT_OK


def _iso(ns: int) -> str:
    """An ns timestamp as ISO 8601 UTC, to the microsecond (the form --at takes)."""
    return (EPOCH + dt.timedelta(microseconds=ns // 1000)).isoformat().replace("+00:00", "Z")


def cmd_registry_import(args: argparse.Namespace) -> int:
    from agent.fleet import registry

    keys, revoked = registry.import_toml(_open(args), args.file)
    print(f"imported {keys} key(s) and {revoked} revocation(s) from {args.file}")
    return EXIT_OK


def cmd_registry_show(args: argparse.Namespace) -> int:
    from agent.fleet import registry
    from agent.keys import fingerprint

    snapshot = registry.load(_open(args))
    for entry in sorted(snapshot.registry.keys.values(), key=lambda e: (e.device, e.added_ns)):
        revoked = snapshot.revoked_ns.get(entry.kid)
        state = "valid" if revoked is None else f"REVOKED from {_iso(revoked)}"
        record = "record" if entry.kid in snapshot.records else "no record"
        print(f"{entry.device}  kid {entry.kid.hex()}  {fingerprint(entry.ed25519)}  "
              f"{record}  {state}")
    print(f"{len(snapshot.registry.devices())} device(s), {len(snapshot.registry.keys)} key(s), "
          f"{len(snapshot.revoked_ns)} revoked")
    return EXIT_OK


def cmd_readings(args: argparse.Namespace) -> int:
    from agent.fleet import queries

    rows = queries.readings(_open(args), device=args.device, name=args.name,
                            since_ns=parse_time(args.since), until_ns=parse_time(args.until))
    if args.format == "jsonl":
        for row in rows:
            sys.stdout.write(json.dumps(row, sort_keys=True) + "\n")
        return EXIT_OK
    fields = ["device", "seq", "idx", "name", "value", "unit", "ts_ns", "time_status", "source"]
    writer = csv.DictWriter(sys.stdout, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    return EXIT_OK


def cmd_gaps(args: argparse.Namespace) -> int:
    from agent.fleet import queries

    db = _open(args)
    found = queries.gaps(db, args.device)
    tails = queries.tails(db, args.device)
    for device, first, last in found:
        span = f"{first}..{last}" if first != last else str(first)
        print(f"{device}  missing seq {span} ({last - first + 1})")
    for device, first, last in tails:
        span = f"{first}..{last}" if first != last else str(first)
        print(f"{device}  missing tail seq {span} ({last - first + 1}): the device's signed "
              f"head says seq {last}")
    print(f"{len(found)} gap(s), {len(tails)} missing tail(s)")
    return EXIT_OK if not found and not tails else EXIT_FAIL


def cmd_devices(args: argparse.Namespace) -> int:
    from agent.fleet import queries

    rows = queries.devices(_open(args))
    for row in rows:
        seen = dt.datetime.fromtimestamp(row.last_seen_ns / 1e9, dt.UTC).strftime(
            "%Y-%m-%d %H:%M:%S") if row.last_seen_ns else "never"
        print(f"{row.device}  last seen {seen}  seq {row.max_seq} (contiguous to "
              f"{row.head_seq})  {row.envelopes} envelopes  key {row.kid or '-'}  "
              f"chain {row.chain}")
    print(f"{len(rows)} device(s)")
    return EXIT_OK


def cmd_alarms(args: argparse.Namespace) -> int:
    db = _open(args)
    rows = db.query("SELECT device, seq, kind, detail FROM alarms ORDER BY device, seq")
    for device, seq, kind, detail in rows:
        print(f"{device}  seq {seq}  {kind}: {detail}")
    print(f"{len(rows)} alarm(s)")
    return EXIT_OK if not rows else EXIT_FAIL


def cmd_reverify(args: argparse.Namespace) -> int:
    from agent.fleet import registry
    from agent.fleet.store import reverify_rejected

    db = _open(args)
    stored, refused = reverify_rejected(db, registry.load(db))
    print(f"{stored} envelope(s) verify now and are stored; {refused} still refused")
    return EXIT_OK


def cmd_logbook(args: argparse.Namespace) -> int:
    from agent.fleet.logbook import make_bundle, verify_bundle

    data = make_bundle(_open(args), args.vin)
    report = verify_bundle(data)  # what a reader will check: never write one that fails
    if not report.ok:
        for reason in report.failures:
            print(f"FAIL {reason}")
        print(f"{args.out} not written: the logbook of VIN {args.vin} does not verify")
        return EXIT_FAIL
    args.out.write_bytes(data)
    print(f"wrote {args.out}: {len(data)} bytes, {report.envelopes} signed envelope(s), "
          f"{len(report.history)} odometer reading(s); check it with "
          f"`edge-agent verify --logbook {args.out}`")
    return EXIT_OK
