"""The compiled contracts: load the committed artifact, or rebuild it from the Vyper sources.

The agent never compiles at run time (no vyper on the Pi): it loads ``artifact.json``,
committed next to the sources. ``python -m agent.settlement.artifacts`` rewrites the artifact
from ``channel.vy`` and ``token.vy`` with the pinned compiler; a test checks that compiling
the sources reproduces the committed bytes exactly, so the artifact can be audited from source.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from agent.errors import SettlementError

HERE = Path(__file__).resolve().parent
ARTIFACT_PATH = HERE / "artifact.json"
COMPILER_VERSION = "0.4.3"
EVM_VERSION = "prague"  # default of vyper 0.4.3; py-evm 0.12 and anvil 1.x both run it
SOURCES = {"EvEdgeChannel": "channel.vy", "EvEdgeToken": "token.vy"}


@dataclass(frozen=True, slots=True)
class Compiled:
    name: str
    abi: list[dict[str, object]]
    bytecode: bytes
    source_sha256: str


def compile_sources() -> dict[str, object]:
    """Compile both sources with vyper (test extra only) into the artifact's JSON shape."""
    import vyper
    from vyper.compiler.settings import Settings

    if vyper.__version__ != COMPILER_VERSION:
        raise SettlementError(f"the artifact is built with vyper {COMPILER_VERSION}, "
                              f"found {vyper.__version__}", reason="compiler-version")
    contracts: dict[str, object] = {}
    for name, filename in SOURCES.items():
        source = (HERE / filename).read_text()
        out = vyper.compile_code(source, contract_path=filename,
                                 output_formats=["abi", "bytecode"],
                                 settings=Settings(evm_version=EVM_VERSION))
        contracts[name] = {
            "source": filename,
            "source_sha256": hashlib.sha256(source.encode()).hexdigest(),
            "abi": out["abi"],
            "bytecode": out["bytecode"],
        }
    return {"compiler": f"vyper {COMPILER_VERSION}", "evm_version": EVM_VERSION,
            "contracts": contracts}


@cache
def load(name: str) -> Compiled:
    """One contract of the committed artifact (``EvEdgeChannel`` or ``EvEdgeToken``)."""
    try:
        data = json.loads(ARTIFACT_PATH.read_text())
        entry = data["contracts"][name]
        return Compiled(name=name, abi=entry["abi"],
                        bytecode=bytes.fromhex(entry["bytecode"].removeprefix("0x")),
                        source_sha256=entry["source_sha256"])
    except (OSError, ValueError, KeyError) as exc:
        raise SettlementError(f"cannot load contract {name!r} from {ARTIFACT_PATH}",
                              reason="artifact") from exc


def write_artifact(path: Path = ARTIFACT_PATH) -> None:
    path.write_text(json.dumps(compile_sources(), indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    write_artifact()
    print(f"wrote {ARTIFACT_PATH}")
