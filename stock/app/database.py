"""The process's one PostgreSQL pool, shared by everything that needs the database.

The readiness check, the console's ledger and health, the webhook routes, the
writer (which holds one connection for its bucket locks) and the dispatcher all
take connections from this pool; ``stock/app/lifecycle.py`` opens it with the app
and closes it last. It opens no connection until one is asked for, so the API
starts while PostgreSQL is away.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
from aiohttp import web

from stock.core.errors import Unavailable

# The writer's connection (held), the dispatcher's outcomes, the routes, /readyz.
POOL_MAX = 10
PG_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)


class Database:
    """``dsn``'s pool once ``open`` ran; ``pool`` is None without a database."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.pool: asyncpg.Pool | None = None

    async def open(self) -> asyncpg.Pool | None:
        """The pool (no connection yet: each is opened at its first use)."""
        if self.dsn and self.pool is None:
            self.pool = await asyncpg.create_pool(
                self.dsn, min_size=0, max_size=POOL_MAX, timeout=5
            )
        return self.pool

    async def close(self) -> None:
        if self.pool is not None:
            pool, self.pool = self.pool, None
            await pool.close()

    async def run(self, call: Callable[[Any], Awaitable[Any]], what: str) -> Any:
        """``call(connection)``; Unavailable (503) without a database or while it is
        unreachable. ``what``: who needs it, for the message."""
        if self.pool is None:
            raise Unavailable(f"{what} need PostgreSQL: set STOCK_DATABASE_URL")
        try:
            async with self.pool.acquire(timeout=5) as conn:
                return await call(conn)
        except PG_ERRORS as exc:
            raise Unavailable(f"PostgreSQL unavailable: {type(exc).__name__}") from exc


async def postgres_check(database: Database) -> str:
    """SELECT 1 over the process's pool: ``ok`` or the error."""
    try:
        async with asyncio.timeout(2):
            if database.pool is None:
                return "error: no pool"
            await database.pool.fetchval("SELECT 1")
    except PG_ERRORS as exc:
        return f"error: {exc or type(exc).__name__}"
    return "ok"


DATABASE = web.AppKey("database", Database)  # the app's, opened by the lifecycle
