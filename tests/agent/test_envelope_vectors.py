"""Known-answer vectors of docs/envelope.md (tests/data/envelope/vectors.json), both ways:

- producer: sealing the vectors' inputs with their fixed keys gives exactly the stored bytes
  (Ed25519 and RFC 6979 secp256k1 signatures are deterministic), so the spec's bytes are
  what the agent makes;
- consumer: every stored envelope gets its stated verdict from our verifier, and the valid
  ones verify with an independent COSE library (pycose) and decode with plain cbor2 to the
  stated fields; every chain gives its stated report.

Regenerate after a deliberate format change (and say so in docs/envelope.md):
``python -m tests.agent.test_envelope_vectors``.
"""

from __future__ import annotations

import json
from pathlib import Path

import cbor2
import pytest

from agent import dcbor
from agent.envelope import Sealer, open_envelope, seal_head
from agent.errors import EdgeAgentError
from agent.fleet_keys import FleetRegistry
from agent.keys import IdentityKey, SettlementKey, provisioning_record, rotation_record
from agent.readings import Event, Reading, TimeStatus
from agent.verify import verify_capture

PATH = Path(__file__).resolve().parents[1] / "data" / "envelope" / "vectors.json"
DEVICE = "dev-vector-1"
BOOT = bytes.fromhex("00112233445566778899aabbccddeeff")
T0 = 1_767_225_600_000_000_000  # 2026-01-01T00:00:00Z


def _keys() -> dict[str, tuple[IdentityKey, SettlementKey]]:
    return {name: (IdentityKey(bytes([n]) * 32), SettlementKey(bytes([n]) * 31 + b"\x01"))
            for n, name in ((1, "A"), (2, "B"))}


def _sign1(key: IdentityKey, protected: dict, unprotected: dict, payload: bytes,
           tag: int = 18) -> bytes:
    prot = dcbor.dumps(protected)
    sig = key.sign(dcbor.dumps(["Signature1", prot, b"", payload]))
    return dcbor.dumps(dcbor.Tag(tag, [prot, unprotected, payload, sig]))


def _payload(seq: int, prev: bytes, body: object = (), kind: str = "telemetry") -> bytes:
    return dcbor.dumps({1: DEVICE, 2: BOOT, 3: seq, 4: prev, 5: kind, 6: list(body)})


def build() -> dict[str, object]:
    keys = _keys()
    a, b = keys["A"][0], keys["B"][0]
    provision = provisioning_record(DEVICE, a, keys["A"][1], T0)
    rotate = rotation_record(DEVICE, a, b, keys["B"][1], T0 + 3)
    sealer = Sealer(a, DEVICE, BOOT)
    readings = [Reading("1-0:1.8.0", 123456, "Wh", T0, TimeStatus.SYNCED, "meter0"),
                Reading("Vehicle.Exterior.AirTemperature", 21.5, "Cel", T0 + 1,
                        TimeStatus.UNSYNCED, "obd0", ("implausible",))]
    e0 = sealer.seal_readings(readings)
    e1 = sealer.seal_events([Event("odometer-decreased", "odometer went from 100 km to 90 km",
                                   T0 + 2, "obd0", (("delta_km", -10),))])
    e2 = sealer.seal_readings([Reading("Vehicle.Speed", 50, "km/h", T0 + 3)])
    e3 = sealer.seal_readings([Reading("Vehicle.Speed", 51, "km/h", T0 + 4)])
    drop = sealer.seal_drop(2, 3, e3.hash, 2, 260, "spool-full")
    rotated = Sealer(b, DEVICE, BOOT, next_seq=sealer.next_seq, prev_hash=sealer.head)
    e5 = rotated.seal_readings([Reading("Vehicle.Speed", 52, "km/h", T0 + 5)])
    head = seal_head(b, DEVICE, 5, e5.hash, T0 + 6)
    good = _payload(0, bytes(32))
    invalid = {
        "bad-signature": e0.data[:-1] + bytes([e0.data[-1] ^ 1]),
        "wrong-alg": _sign1(a, {1: -7, 4: a.kid}, {}, good),
        "wrong-tag": _sign1(a, {1: -8, 4: a.kid}, {}, good, tag=98),
        "unprotected-header": _sign1(a, {1: -8}, {4: a.kid}, good),
        "protected-header": _sign1(a, {1: -8, 4: a.kid, 3: 0}, {}, good),
        "duplicate-map-key": _sign1(a, {1: -8, 4: a.kid}, {}, b"\xa2\x03\x00\x03\x01"),
        "non-deterministic-cbor": b"\xd8\x12" + e0.data[1:],
        "payload-schema": _sign1(a, {1: -8, 4: a.kid}, {}, dcbor.dumps({1: DEVICE})),
        "telemetry-body": _sign1(a, {1: -8, 4: a.kid}, {}, _payload(0, bytes(32), [[1]])),
        "unknown-key": _sign1(IdentityKey(bytes([3]) * 32), {1: -8, 4: key_of(3)}, {}, good),
    }
    broken = Sealer(a, DEVICE, BOOT, next_seq=1, prev_hash=bytes(32)).seal_readings([])
    envelope = {"key": "A", "verdict": "ok"}
    return {
        "about": "known-answer vectors of docs/envelope.md; tests/agent/test_envelope_vectors.py",
        "keys": {name: {"seed": k.seed().hex(), "ed25519": k.public.hex(), "kid": k.kid.hex()}
                 for name, (k, _) in keys.items()},
        "records": {"provision_A": dcbor.dumps(provision).hex(),
                    "rotate_A_to_B": dcbor.dumps(rotate).hex()},
        "envelopes": [
            {**envelope, "name": "telemetry seq 0 (genesis prev)", "hex": e0.data.hex(),
             "hash": e0.hash.hex(), "seq": 0, "kind": "telemetry", "prev": e0.prev.hex()},
            {**envelope, "name": "event seq 1", "hex": e1.data.hex(), "hash": e1.hash.hex(),
             "seq": 1, "kind": "event", "prev": e1.prev.hex()},
            {**envelope, "name": "drop seq 4 declaring 2..3", "hex": drop.data.hex(),
             "hash": drop.hash.hex(), "seq": 4, "kind": "drop", "prev": drop.prev.hex()},
            {"key": "B", "verdict": "ok", "name": "telemetry seq 5 after a rotation to B",
             "hex": e5.data.hex(), "hash": e5.hash.hex(), "seq": 5, "kind": "telemetry",
             "prev": e5.prev.hex()},
            *({"key": "A", "verdict": reason, "name": f"invalid: {reason}", "hex": data.hex()}
              for reason, data in invalid.items()),
        ],
        "chains": [
            {"name": "declared drop and a rotation", "records": ["provision_A", "rotate_A_to_B"],
             "items": [e.data.hex() for e in (e0, e1, drop, e5)],
             "expect": {"ok": True, "dropped_declared": 2, "envelopes": 4, "gaps": 0}},
            {"name": "a removed envelope is a gap", "records": ["provision_A", "rotate_A_to_B"],
             "items": [e.data.hex() for e in (e0, e1, e2, e5)],
             "expect": {"ok": False, "gaps": 2, "envelopes": 4, "gap_ranges": [[3, 4]]}},
            {"name": "a broken link", "records": ["provision_A"],
             "items": [e0.data.hex(), broken.data.hex()],
             "expect": {"ok": False, "broken_links": 1, "envelopes": 2}},
            {"name": "a truncated tail, shown by the signed head",
             "records": ["provision_A", "rotate_A_to_B"],
             "items": [e.data.hex() for e in (e0, e1, drop)] + [head.hex()],
             "expect": {"ok": False, "missing_tail": 1, "head_seq": 5, "envelopes": 3}},
        ],
    }


def key_of(seed: int) -> bytes:
    return IdentityKey(bytes([seed]) * 32).kid


def registry(vectors: dict, names: list[str]) -> FleetRegistry:
    reg = FleetRegistry()
    for name in names:
        reg.add_record(dcbor.loads(bytes.fromhex(vectors["records"][name])))
    return reg


VECTORS = json.loads(PATH.read_text()) if PATH.exists() else {}


def test_the_agent_produces_exactly_the_vectors():
    assert build() == VECTORS


@pytest.mark.parametrize("vector", VECTORS.get("envelopes", []), ids=lambda v: v["name"])
def test_each_envelope_gets_its_verdict(vector):
    reg = registry(VECTORS, ["provision_A", "rotate_A_to_B"])
    data = bytes.fromhex(vector["hex"])
    if vector["verdict"] != "ok":
        with pytest.raises(EdgeAgentError) as info:
            open_envelope(data, reg.lookup)
        assert info.value.reason == vector["verdict"]
        return
    opened = open_envelope(data, reg.lookup)
    assert (opened.seq, opened.kind, opened.hash.hex(), opened.prev.hex()) == \
        (vector["seq"], vector["kind"], vector["hash"], vector["prev"])
    # an independent consumer: pycose checks the signature, cbor2 reads the payload
    from pycose.keys import OKPKey
    from pycose.keys.curves import Ed25519
    from pycose.messages import Sign1Message

    message = Sign1Message.decode(data)
    message.key = OKPKey(crv=Ed25519, x=bytes.fromhex(VECTORS["keys"][vector["key"]]["ed25519"]))
    assert message.verify_signature()
    payload = cbor2.loads(message.payload)
    assert payload[3] == vector["seq"] and payload[5] == vector["kind"]


@pytest.mark.parametrize("chain", VECTORS.get("chains", []), ids=lambda c: c["name"])
def test_each_chain_gets_its_report(chain):
    capture = b"".join(bytes.fromhex(item) for item in chain["items"])
    report = verify_capture(capture, registry(VECTORS, chain["records"]))
    device = report.devices[DEVICE]
    expect = dict(chain["expect"])
    assert report.ok == expect.pop("ok"), report.format()
    for field, value in expect.items():
        got = getattr(device, field)
        assert (json.loads(json.dumps(got)) if isinstance(got, list) else got) == value, \
            (field, report.format())


if __name__ == "__main__":
    PATH.parent.mkdir(parents=True, exist_ok=True)
    PATH.write_text(json.dumps(build(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {PATH}")
