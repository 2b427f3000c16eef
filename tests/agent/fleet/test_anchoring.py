"""Anchoring on chain: the anchor contract (source and committed artifact), the ingest
submitting each period's Merkle root through the JSON-RPC node, and the logbook proving
offline that a block holds the root's Anchored event (agent.fleet.inclusion). On the
in-process chain (eth-tester + py-evm) and on anvil."""

from __future__ import annotations

import asyncio
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent import dcbor
from agent.errors import MalformedEnvelope, SettlementError
from agent.fleet import anchor
from agent.fleet.anchor_chain import ARTIFACT, AnchorClient, compile_anchor, deploy_anchor
from agent.fleet.db import open_database
from agent.fleet.inclusion import RECEIPTS_ROOT, check_inclusion, header_rlp, make_inclusion
from agent.fleet.ingest import AnchorSettings, Ingest, IngestConfig
from agent.fleet.logbook import make_bundle, verify_bundle
from agent.fleet.mqtt import BrokerConfig
from agent.keys import IdentityKey, SettlementKey
from agent.readings import Reading
from agent.settlement.chain import InProcessChain
from agent.topics import telemetry_topic
from agent.uplink import MqttConfig, Uplink
from tests.agent.settlement.conftest import anvil_url  # noqa: F401  (fixture)

from .helpers import Device, register

VIN = "WVWZZZ1JZXW000009"
DAY = 86_400 * 10**9
ROOT = bytes(range(32))


@pytest.fixture(scope="module")
def chain():
    return InProcessChain.start()


def funded_key(chain) -> SettlementKey:
    key = SettlementKey.generate()
    chain.fund(key.address)
    return key


def test_the_artifact_is_the_source_compiled():
    assert compile_anchor() == json.loads(ARTIFACT.read_text())


def test_the_contract_keeps_the_first_anchoring(chain):
    key = funded_key(chain)
    contract, _ = deploy_anchor(chain.w3, key)
    client = AnchorClient(chain.w3, contract, key)
    assert client.anchored_at(ROOT) == 0
    first = client.submit(ROOT, 3, 10, 20)
    at = client.anchored_at(ROOT)
    assert at > 0
    chain.advance_time(3600)
    again = client.submit(ROOT, 3, 10, 20)          # a retry: no revert, no new time
    assert client.anchored_at(ROOT) == at and again.block > first.block
    with pytest.raises(SettlementError) as refused:
        client.submit(bytes(32), 3, 10, 20)
    assert refused.value.reason == "rejected"
    with pytest.raises(SettlementError):
        client.submit(ROOT[::-1], 0, 10, 20)        # no leaves
    # the re-anchoring logged nothing: only the first transaction proves the root
    assert check_inclusion(first.inclusion, ROOT, contract).timestamp == at
    with pytest.raises(MalformedEnvelope, match="no Anchored event"):
        check_inclusion(again.inclusion, ROOT, contract)


def car_envelopes(car: Device):
    sealed = [car.sealer.seal_readings([Reading("Vehicle.VehicleIdentification.VIN", VIN, "",
                                                DAY)])]
    for day in range(1, 4):
        sealed += car.envelopes(2, ts0=day * DAY)
        sealed.append(car.sealer.seal_readings(
            [Reading("Vehicle.TraveledDistance", 1000.0 + 100 * day, "km", day * DAY + 10)]))
    return sealed


def ingest_and_anchor(tmp_path, url, node, contract, key, sealed, car):
    """`fleet ingest` with anchoring: the envelopes arrive over MQTT, are stored, and the
    period's root is anchored (anchor_now: what the period timer calls)."""
    db_url = f"sqlite:///{tmp_path / 'fleet.db'}"
    db = open_database(db_url)
    register(db, car)

    async def main() -> dict[str, int]:
        stop = asyncio.Event()
        ingest = Ingest(IngestConfig(BrokerConfig(url, "ingest-anchor"), db_url,
                                     anchor=AnchorSettings(node, contract, key, 3600)),
                        IdentityKey(bytes([3]) * 32))
        task = asyncio.create_task(ingest.run(stop))
        try:
            await asyncio.wait_for(ingest.ready.wait(), 20)
            async with Uplink(MqttConfig.from_url(url, car.name)) as up:
                await up.wait_connected()
                for envelope in sealed:
                    await up.publish(telemetry_topic(car.name), envelope.data)
            async with asyncio.timeout(20):
                while ingest.counters["stored"] < len(sealed):
                    await asyncio.sleep(0.05)
            await ingest.anchor_now()
            return dict(ingest.counters)
        finally:
            stop.set()
            await asyncio.wait_for(task, 20)

    return db, asyncio.run(main())


def edit(bundle: bytes, change) -> bytes:
    decoded = dcbor.loads(bundle)
    change(decoded)
    return dcbor.dumps(decoded)


def test_ingest_anchors_and_the_logbook_proves_it_offline(tmp_path, mosquitto, chain):
    key = funded_key(chain)
    contract, _ = deploy_anchor(chain.w3, key)
    car = Device("car-anchor", seed=21)
    sealed = car_envelopes(car)
    db, counters = ingest_and_anchor(tmp_path, mosquitto.url, chain.w3, contract, key,
                                     sealed, car)
    assert counters["anchor_periods"] == 1 and counters["anchored"] == 1
    assert anchor.pending_periods(db) == []
    bundle = make_bundle(db, VIN)
    report = verify_bundle(bundle)
    assert report.ok, report.format()
    assert report.anchored == 4 and report.recorded == 0  # VIN + three odometer envelopes
    (line,) = report.anchorings
    assert f"anchored by 0x{key.address.hex()}" in line and "block hash 0x" in line
    text = report.format()
    assert "4 envelope(s) anchored on chain:" in text

    # what an operator rewriting history would have to forge, and fails at
    def receipt(b):
        b["anchors"][0]["inclusion"]["receipt"] = b["anchors"][0]["inclusion"]["receipt"][:-1]

    def header(b, field=RECEIPTS_ROOT):  # flip a byte of one header field
        import rlp

        fields = rlp.decode(b["anchors"][0]["inclusion"]["header"])
        fields[field] = bytes([fields[field][0] ^ 1]) + fields[field][1:]
        b["anchors"][0]["inclusion"]["header"] = rlp.encode(fields)

    def block(b):
        b["anchors"][0]["block"] += 1

    def other_contract(b):
        b["anchors"][0]["contract"] = bytes(20)

    for change, reason in ((receipt, "not under the header's receiptsRoot"),
                           (header, "not under the header's receiptsRoot"),
                           (block, "the proof is for block"),
                           (other_contract, "no Anchored event")):
        forged = verify_bundle(edit(bundle, change))
        assert not forged.ok and any(reason in f for f in forged.failures), forged.failures
    # The limit of offline checking (agent.fleet.inclusion): a header made up around the
    # true receipt verifies, under ANOTHER block hash; only a look-up of the block on a
    # node or explorer tells the two apart, which is why the verifier prints the hash.
    made_up = verify_bundle(edit(bundle, lambda b: header(b, field=0)))  # parentHash
    assert made_up.ok and made_up.anchorings != report.anchorings
    db.close()


def test_a_node_that_is_down_leaves_the_root_pending(tmp_path, mosquitto, chain):
    key = funded_key(chain)
    contract, _ = deploy_anchor(chain.w3, key)
    car = Device("car-pending", seed=22)
    sealed = car_envelopes(car)
    db, counters = ingest_and_anchor(tmp_path, mosquitto.url, "http://127.0.0.1:9", contract,
                                     key, sealed, car)
    assert counters["anchor_periods"] == 1 and counters.get("anchored", 0) == 0
    assert counters["anchor_failed_node-unavailable"] == 1
    (pending,) = anchor.pending_periods(db)
    assert pending[1] == len(sealed)
    # the next period (here: a worker with the node back) submits it
    done = AnchorClient(chain.w3, contract, key).submit(*pending)
    anchor.record_anchoring(db, pending[0], done.tx_hash, done.block, done.chain_id,
                            done.contract, done.inclusion)
    assert anchor.pending_periods(db) == []
    assert verify_bundle(make_bundle(db, VIN)).anchored == 4
    db.close()


@pytest.mark.anvil
def test_anchoring_on_anvil_rebuilds_the_header_from_the_node(anvil_url):  # noqa: F811
    from web3 import Web3

    w3 = Web3(Web3.HTTPProvider(anvil_url))
    key = SettlementKey.generate()
    w3.provider.make_request("anvil_setBalance", [Web3.to_checksum_address(key.address),
                                                  hex(10**20)])
    contract, _ = deploy_anchor(anvil_url, key)
    done = AnchorClient(anvil_url, contract, key).submit(ROOT, 9, 1, 2)
    # on a real node the header comes from the JSON block and must hash to its hash
    block = w3.eth.get_block(done.block)
    assert Web3.keccak(header_rlp(block)) == block["hash"]
    anchoring = check_inclusion(done.inclusion, ROOT, contract)
    assert (anchoring.block_number, anchoring.leaves) == (done.block, 9)
    assert anchoring.block_hash == bytes(block["hash"]) and anchoring.submitter == key.address
    receipts = [w3.eth.get_transaction_receipt(h) for h in block["transactions"]]
    with pytest.raises(MalformedEnvelope, match="receiptsRoot"):
        make_inclusion(block, receipts[:-1] + [dict(receipts[-1], status=0)], 0)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mangled_inclusion_proofs_raise_only_our_error(chain, data):
    if not hasattr(test_mangled_inclusion_proofs_raise_only_our_error, "proof"):
        key = funded_key(chain)
        contract, _ = deploy_anchor(chain.w3, key)
        done = AnchorClient(chain.w3, contract, key).submit(ROOT, 1, 1, 2)
        test_mangled_inclusion_proofs_raise_only_our_error.proof = (done.inclusion, contract)
    proof, contract = test_mangled_inclusion_proofs_raise_only_our_error.proof
    mangled = dict(proof)
    field = data.draw(st.sampled_from(["header", "receipt", "nodes", "index"]))
    if field == "index":
        mangled["index"] = data.draw(st.integers(min_value=0, max_value=300))
    elif field == "nodes":
        mangled["nodes"] = data.draw(st.lists(st.binary(max_size=80), max_size=4))
    else:
        raw = bytearray(proof[field])
        for _ in range(data.draw(st.integers(min_value=1, max_value=4))):
            pos = data.draw(st.integers(min_value=0, max_value=len(raw) - 1))
            raw[pos] = data.draw(st.integers(min_value=0, max_value=255))
        cut = data.draw(st.integers(min_value=0, max_value=len(raw)))
        mangled[field] = bytes(raw[:cut] if data.draw(st.booleans()) else raw)
    try:
        check_inclusion(mangled, ROOT, contract)
    except MalformedEnvelope as exc:
        assert exc.reason == "anchor-inclusion"
    else:
        assert mangled == proof or mangled["receipt"] == proof["receipt"]


@pytest.mark.anvil
def test_cli_deploys_the_anchor_contract(anvil_url, tmp_path, capsys):  # noqa: F811
    from web3 import Web3

    from agent.cli import main
    from agent.fleet.ingest import load_or_create_anchor_key

    path = tmp_path / "anchor.key"
    key = load_or_create_anchor_key(path)
    assert path.stat().st_mode & 0o777 == 0o600
    w3 = Web3(Web3.HTTPProvider(anvil_url))
    w3.provider.make_request("anvil_setBalance", [Web3.to_checksum_address(key.address),
                                                  hex(10**20)])
    assert main(["fleet", "anchor-deploy", "--node", anvil_url, "--anchor-key", str(path)]) == 0
    out = capsys.readouterr().out
    address = bytes.fromhex(out.split("anchor contract 0x")[1][:40])
    assert w3.eth.get_code(Web3.to_checksum_address(address)) != b""
    assert AnchorClient(anvil_url, address, key).anchored_at(ROOT) == 0
    # a half-given anchoring configuration is a one-line error, not a traceback
    commit_key = tmp_path / "commit.key"
    assert main(["fleet", "ingest", "--mqtt", "mqtt://127.0.0.1:1", "--db",
                 f"sqlite:///{tmp_path / 'f.db'}", "--anchor-node", anvil_url,
                 "--commit-key", str(commit_key)]) != 0
    assert "--anchor-node/--anchor-contract" in capsys.readouterr().err
    assert not commit_key.exists()  # refused before any key file was made
