"""Schema migrations: plain SQL files in ``persist/migrations``, applied in name order.

Each file runs in its own transaction together with its row in
``schema_migrations``, under a session advisory lock, so running ``stock migrate``
twice, or from two processes at once, applies every file exactly once.
"""

from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path

import asyncpg

log = logging.getLogger("persist.migrate")

MIGRATE_LOCK = 0x5704_0001  # pg_advisory_lock key for migrations

_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    text PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


def migration_files() -> list[tuple[str, str]]:
    """(version, SQL) for every ``NNNN_name.sql`` file, in order."""
    folder = Path(str(resources.files("persist") / "migrations"))
    return [(path.stem, path.read_text()) for path in sorted(folder.glob("[0-9]*.sql"))]


async def migrate(dsn: str) -> list[str]:
    """Apply the pending migrations; returns the versions applied by this call."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", MIGRATE_LOCK)
        try:
            return await _apply(conn)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATE_LOCK)
    finally:
        await conn.close()


async def _apply(conn: asyncpg.Connection) -> list[str]:
    await conn.execute(_TABLE)
    done = {row["version"] for row in await conn.fetch("SELECT version FROM schema_migrations")}
    applied = []
    for version, sql in migration_files():
        if version in done:
            continue
        async with conn.transaction():
            await conn.execute(sql)
            await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", version)
        log.debug("migrate: applied %s", version)
        applied.append(version)
    if applied:  # one line, not one per file: `stock dev`'s first screen stays short
        log.info("migrate: applied %d (%s .. %s)", len(applied), applied[0], applied[-1])
    return applied
