"""Fixtures for the Modbus tests: a socat pty pair (the RS-485 cable) and an event sink."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.firmware_adapters.modbus.support import Sink, SocatPair


@pytest.fixture
def socat_pair(tmp_path: Path) -> Iterator[SocatPair]:
    pair = SocatPair(tmp_path).start()
    yield pair
    pair.kill()


@pytest.fixture
def sink() -> Sink:
    return Sink()
