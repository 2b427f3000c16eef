"""A throwaway PostgreSQL (hil.postgres) for the fleet tests, one per session: it takes a
second or two to start. Fails, not skips, when Debian's postgresql is missing
(scripts/test.sh installs it)."""

from collections.abc import Iterator

import pytest

from hil.postgres import Postgres


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[Postgres]:
    with Postgres() as server:
        yield server


@pytest.fixture
def postgres_url(postgres_server: Postgres) -> Iterator[str]:
    """A fresh database per test on the shared server."""
    import uuid

    import psycopg

    name = f"t{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_server.url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    yield postgres_server.url.rsplit("/", 1)[0] + f"/{name}"
