"""The persistence tests' helpers; the PostgreSQL server and its per-test database
come from ``tests.postgres`` (a plugin of the top conftest)."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from dataclasses import replace

import asyncpg
import pytest

from stock.core.config import Settings


@pytest.fixture
async def pg(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(dsn)
    yield conn
    await conn.close()


@pytest.fixture
def psettings(settings: Settings, dsn: str) -> Settings:
    """The backend's settings with the test database and a small, quick writer."""
    return replace(settings, database_url=dsn, writer_batch=500, writer_interval_ms=20)


WRITER_COMMAND = [sys.executable, "-m", "stock.app.cli", "writer"]
