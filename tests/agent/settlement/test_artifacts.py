"""The committed artifact is what the committed sources compile to (auditable from source)."""

from __future__ import annotations

import json

from agent.settlement import artifacts


def test_compiling_the_sources_reproduces_the_committed_artifact() -> None:
    committed = json.loads(artifacts.ARTIFACT_PATH.read_text())
    rebuilt = json.loads(json.dumps(artifacts.compile_sources()))
    for name in artifacts.SOURCES:
        assert rebuilt["contracts"][name]["bytecode"] == committed["contracts"][name]["bytecode"], (
            f"{name}: run `python -m agent.settlement.artifacts` and commit artifact.json")
        assert rebuilt["contracts"][name]["abi"] == committed["contracts"][name]["abi"]
        assert rebuilt["contracts"][name]["source_sha256"] == \
            committed["contracts"][name]["source_sha256"]
    assert rebuilt["compiler"] == committed["compiler"] == "vyper 0.4.3"


def test_load_gives_deployable_bytecode_and_the_abi() -> None:
    channel = artifacts.load("EvEdgeChannel")
    names = {item.get("name") for item in channel.abi}
    assert {"open", "deposit", "coopClose", "close", "challenge", "settle", "withdraw",
            "read", "Opened", "Deposited", "Closing", "Settled", "Credited"} <= names
    assert channel.bytecode[:2] != b"" and len(channel.bytecode) > 1000
