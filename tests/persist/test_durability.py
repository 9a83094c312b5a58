"""What the writer waits for before PostgreSQL gets a batch, per server.

Redis 7.2+ and Valkey: WAITAOF (the events are fsynced in the AOF). Redis 7.0 has
no WAITAOF: with replicas the writer WAITs for one (the events are on another
machine); with ``appendfsync always`` every reply already follows its fsync;
otherwise it warns once that a host crash can lose about a second of events
PostgreSQL already has (README, "Persistence").
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg
import pytest
from redis.exceptions import RedisError

from persist import writer as writer_module
from persist.writer import Writer
from stock.client import connect
from stock.config import Settings
from stock.engine import StockEngine
from tests.servers import ServerProcess

REDIS7 = os.environ.get("STOCK_TEST_REDIS7", "/usr/bin/redis-server")
needs_redis7 = pytest.mark.skipif(
    not Path(REDIS7).exists(), reason=f"no Redis 7.0 at {REDIS7} (make ci-deps installs it)"
)


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[list[ServerProcess]]:
    started: list[ServerProcess] = []
    yield started
    for server in started:
        server.stop()


def start(servers: list[ServerProcess], path: Path, *args: str) -> ServerProcess:
    server = ServerProcess(path, None, "--appendonly", "yes", *args, binary=REDIS7).start()
    servers.append(server)
    return server


@pytest.fixture
async def conn(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(dsn)
    yield conn
    await conn.close()


@asynccontextmanager
async def writer_on(server: ServerProcess, dsn: str) -> AsyncIterator[tuple[Writer, StockEngine]]:
    settings = Settings(redis_url=server.url, database_url=dsn, buckets=4)
    client = connect(settings)
    writer = Writer(client, settings, dsn)
    try:
        yield writer, StockEngine(client, settings)
    finally:
        await writer.aclose()
        await client.aclose()


async def drain(writer: Writer) -> None:
    """Writer rounds until one finds nothing more (the first reads the pending lists)."""
    for _ in range(3):
        await writer.step()


async def one_round(server: ServerProcess, dsn: str) -> None:
    """Write one event and drain it."""
    async with writer_on(server, dsn) as (writer, engine):
        await engine.set_stock("DUR", 5)
        await drain(writer)


async def rows(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("SELECT count(*) FROM stock_ledger"))


@needs_redis7
async def test_redis70_everysec_without_replicas_warns(
    servers: list[ServerProcess], tmp_path: Path, dsn: str, conn: asyncpg.Connection,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    server = start(servers, tmp_path / "r", "--appendfsync", "everysec")
    with caplog.at_level(logging.WARNING, logger="persist.writer"):
        await one_round(server, dsn)
    assert await rows(conn) == 1
    assert any("appendfsync always" in r.getMessage() for r in caplog.records), caplog.text


@needs_redis7
async def test_redis70_appendfsync_always_needs_no_wait(
    servers: list[ServerProcess], tmp_path: Path, dsn: str, conn: asyncpg.Connection,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    server = start(servers, tmp_path / "r", "--appendfsync", "always")
    with caplog.at_level(logging.WARNING, logger="persist.writer"):
        await one_round(server, dsn)
    assert await rows(conn) == 1
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


@needs_redis7
async def test_redis70_with_a_replica_waits_for_it(
    servers: list[ServerProcess], tmp_path: Path, dsn: str, conn: asyncpg.Connection,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """WAIT 1 on the reading connection: with the replica gone, nothing is applied."""
    monkeypatch.setattr(writer_module, "WAITAOF_MS", 300)
    primary = start(servers, tmp_path / "p", "--appendfsync", "everysec")
    replica = start(servers, tmp_path / "s", "--replicaof", "127.0.0.1", str(primary.port))
    client = connect(Settings(redis_url=primary.url))
    try:
        for _ in range(100):
            info = await client.info("replication")
            if (
                info.get("connected_slaves") == 1
                and info.get("slave0", {}).get("state") == "online"
            ):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the replica never attached")
        async with writer_on(primary, dsn) as (writer, engine):
            await engine.set_stock("DUR", 5)
            await drain(writer)
            assert await rows(conn) == 1
            replica.kill()
            await engine.set_stock("DUR", 6)
            with pytest.raises(RedisError, match="replica"):
                await drain(writer)
            assert await rows(conn) == 1  # not applied: it may not be on another machine
    finally:
        await client.aclose()
