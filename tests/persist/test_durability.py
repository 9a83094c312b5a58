"""What the writer waits for before PostgreSQL gets a batch, per server.

Redis 7.2+ and Valkey: WAITAOF (the events are fsynced in the AOF), also for pending
entries another connection read. Redis 7.0 has no WAITAOF: with replicas the writer
WAITs for one (the events are on another machine); with ``appendfsync always`` every
reply already follows its fsync; otherwise it warns once that a host crash can lose
about a second of events PostgreSQL already has (docs/persistence.md, "Durability").
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg
import pytest
from redis.exceptions import RedisError

from persist import durable_read
from persist.writer import CONSUMER, GROUP, Writer
from stock.core import keys
from stock.core.config import Settings
from stock.orders.engine import StockEngine
from stock.redis.client import connect
from tests.servers import EARLY_FSYNC, ServerProcess, confirms_fsync_early, fsync_shim_env

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
    servers: list[ServerProcess],
    tmp_path: Path,
    dsn: str,
    conn: asyncpg.Connection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = start(servers, tmp_path / "r", "--appendfsync", "everysec")
    with caplog.at_level(logging.WARNING, logger="persist.writer"):
        await one_round(server, dsn)
    assert await rows(conn) == 1
    assert any("appendfsync always" in r.getMessage() for r in caplog.records), caplog.text


@needs_redis7
async def test_redis70_appendfsync_always_needs_no_wait(
    servers: list[ServerProcess],
    tmp_path: Path,
    dsn: str,
    conn: asyncpg.Connection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = start(servers, tmp_path / "r", "--appendfsync", "always")
    with caplog.at_level(logging.WARNING, logger="persist.writer"):
        await one_round(server, dsn)
    assert await rows(conn) == 1
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


@needs_redis7
async def test_redis70_with_a_replica_waits_for_it(
    servers: list[ServerProcess],
    tmp_path: Path,
    dsn: str,
    conn: asyncpg.Connection,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """WAIT 1 on the reading connection: with the replica gone, nothing is applied."""
    monkeypatch.setattr(durable_read, "WAITAOF_MS", 2000)  # a loaded replica may take a while
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


async def test_pending_entries_read_elsewhere_wait_for_their_fsync(
    servers: list[ServerProcess],
    tmp_path: Path,
    dsn: str,
    conn: asyncpg.Connection,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A writer that died before its WAITAOF left an event delivered (pending) and not
    yet fsynced. Re-reading a pending list writes nothing, so a WAITAOF after it on
    another connection would return at once: the next writer must still wait for the
    fsync (Valkey; its disk stalled by tests/fsync_log.c)."""
    monkeypatch.setattr(durable_read, "WAITAOF_MS", 300)
    server = ServerProcess(tmp_path / "r", None, "--appendonly", "yes", "--appendfsync", "everysec")
    server.env = fsync_shim_env(tmp_path)
    servers.append(server.start())
    if await confirms_fsync_early(server.url):
        pytest.skip(EARLY_FSYNC)
    async with writer_on(server, dsn) as (writer, engine):
        (server.workdir / "fsync.delay").write_text("2000")  # each fsync takes 2 s more
        await engine.set_stock("DUR", 5)
        key = keys.events_key(keys.bucket_of("DUR", writer.settings.buckets))
        await engine.redis.xgroup_create(key, GROUP, id="0")
        assert await engine.redis.xreadgroup(GROUP, CONSUMER, {key: ">"}, 10)  # then died
        with pytest.raises(RedisError, match="not yet fsynced"):
            await writer.step()  # takes the buckets, re-reads their pending lists
        assert await rows(conn) == 0  # not applied: Redis may still lose it
        (server.workdir / "fsync.delay").write_text("0")
        for _ in range(100):  # once the stalled fsync is over (about 2 s)
            try:
                await drain(writer)
                break
            except RedisError:
                await asyncio.sleep(0.1)
        assert await rows(conn) == 1


async def test_a_server_that_answers_waitaof_before_the_fsync_is_named(
    servers: list[ServerProcess],
    tmp_path: Path,
    dsn: str,
    conn: asyncpg.Connection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The writer tells an operator when the server's WAITAOF cannot give the guarantee
    (Valkey under everysec: the warning), and says nothing on one whose WAITAOF waits
    for the fsync; it copies events either way."""
    server = ServerProcess(tmp_path / "r", None, "--appendonly", "yes", "--appendfsync", "everysec")
    servers.append(server.start())
    early = await confirms_fsync_early(server.url)
    with caplog.at_level(logging.WARNING, logger="persist.writer"):
        await one_round(server, dsn)
    assert await rows(conn) == 1
    named = any("confirms fsyncs it has not done" in r.getMessage() for r in caplog.records)
    assert named == early, caplog.text


async def attached(primary: ServerProcess) -> None:
    """Until ``primary`` has one replica online."""
    client = connect(Settings(redis_url=primary.url))
    try:
        for _ in range(200):
            info = await client.info("replication")
            if info.get("slave0", {}).get("state") == "online":
                return
            await asyncio.sleep(0.05)
        raise AssertionError("the replica never attached")
    finally:
        await client.aclose()


async def refused_while_the_replica_is_stopped(
    replica: ServerProcess, writer: Writer, engine: StockEngine, conn: asyncpg.Connection
) -> None:
    """A stopped replica acknowledges nothing: a writer that WAITs for it applies no
    new event until it runs again (each failed round recovered as the writer's run
    loop does it: the buckets are read from their pending lists)."""
    before = await rows(conn)
    assert replica.proc is not None
    os.kill(replica.proc.pid, signal.SIGSTOP)
    try:
        await engine.set_stock("DUR", 7)
        with pytest.raises(RedisError, match="replica") as failed:
            await drain(writer)
        await writer._recover(failed.value)
        assert await rows(conn) == before  # not applied: the replica may not have it
    finally:
        os.kill(replica.proc.pid, signal.SIGCONT)
    for _ in range(50):
        try:
            await writer.step()
        except RedisError as exc:
            await writer._recover(exc)
            await asyncio.sleep(0.1)
        if await rows(conn) > before:
            break
    assert await rows(conn) == before + 1


async def test_a_replica_attached_after_the_first_read_is_waited_for(
    servers: list[ServerProcess],
    tmp_path: Path,
    dsn: str,
    conn: asyncpg.Connection,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The writer decided "WAITAOF" for a master without a replica (after a failover);
    then the old master came back as its replica: the writer must WAIT for it too, or
    a second failover leaves PostgreSQL ahead of Redis (issue 20 item 5)."""
    monkeypatch.setattr(durable_read, "WAITAOF_MS", 500)
    args = ("--appendonly", "yes", "--appendfsync", "always")
    primary = ServerProcess(tmp_path / "p", None, *args).start()
    servers.append(primary)
    async with writer_on(primary, dsn) as (writer, engine):
        await engine.set_stock("DUR", 5)
        await drain(writer)
        assert await rows(conn) == 1
        replica = ServerProcess(tmp_path / "s", None, "--replicaof", "127.0.0.1", str(primary.port))
        servers.append(replica.start())
        await attached(primary)
        await engine.set_stock("DUR", 6)
        await drain(writer)
        assert await rows(conn) == 2
        await refused_while_the_replica_is_stopped(replica, writer, engine, conn)


async def test_without_aof_a_master_with_a_replica_is_waited_for(
    servers: list[ServerProcess],
    tmp_path: Path,
    dsn: str,
    conn: asyncpg.Connection,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``appendonly no``: nothing to fsync, but a failover still promotes the replica,
    so the reads WAIT for it (issue 20 item 5: no wait at all before)."""
    monkeypatch.setattr(durable_read, "WAITAOF_MS", 500)
    primary = ServerProcess(tmp_path / "p", None, "--appendonly", "no").start()
    servers.append(primary)
    replica = ServerProcess(tmp_path / "s", None, "--replicaof", "127.0.0.1", str(primary.port))
    servers.append(replica.start())
    await attached(primary)
    async with writer_on(primary, dsn) as (writer, engine):
        await engine.set_stock("DUR", 5)
        await drain(writer)
        assert await rows(conn) == 1
        await refused_while_the_replica_is_stopped(replica, writer, engine, conn)
