"""Shared fixtures: a real mosquitto on a free loopback port (DESIGN s8).

- ``mosquitto``: plain MQTT, persistence on, no queue limit; stopped by pid in teardown.
- ``broker_factory``: start more brokers with any ``hil.broker.BrokerOptions`` (TLS, ACL,
  ``max_queued_messages``); every broker it started is stopped in teardown, even on failure.
- ``pki``: a throw-away CA, server cert for 127.0.0.1 and client certs (``dev1``, ``dev2``,
  ``fleet``) made with ``cryptography``; ``tls_mosquitto`` requires a client cert.

Tests that need mosquitto fail (not skip) when it is missing: the README's test command
installs it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hil.broker import BrokerOptions, Mosquitto, Pki, make_pki


@pytest.fixture
def broker_factory(tmp_path: Path) -> Iterator[Callable[..., Mosquitto]]:
    started: list[Mosquitto] = []

    def start(options: BrokerOptions | None = None, name: str = "broker") -> Mosquitto:
        broker = Mosquitto(tmp_path / f"{name}{len(started)}", options or BrokerOptions())
        started.append(broker)
        return broker.start()

    yield start
    for broker in started:
        broker.kill()


@pytest.fixture
def mosquitto(broker_factory: Callable[..., Mosquitto]) -> Mosquitto:
    return broker_factory()


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"), ["dev1", "dev2", "fleet"])


@pytest.fixture
def tls_mosquitto(broker_factory: Callable[..., Mosquitto], pki: Pki) -> Mosquitto:
    return broker_factory(BrokerOptions(pki=pki), name="tls")
