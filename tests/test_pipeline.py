"""The auto-pipeline: batches of one tick (or of max_batch calls), each caller gets its
own reply or error, and a broken or closed connection fails only its own callers."""

from __future__ import annotations

import asyncio
import inspect
import signal
import tomllib
from collections.abc import AsyncIterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import hiredis
import pytest
from packaging.requirements import Requirement
from redis.asyncio.cluster import ClusterNode, NodesManager, RedisCluster
from redis.cluster import PRIMARY
from redis.exceptions import AskError, MovedError, ResponseError, TimeoutError

from stock.core.config import Settings
from stock.redis.client import connect
from stock.redis.cluster_pipeline import _parse_error
from stock.redis.pipeline import AutoPipeline, streams
from tests.servers import ServerProcess

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
async def client(standalone_server: ServerProcess) -> AsyncIterator[Any]:
    redis = connect(Settings(redis_url=standalone_server.url))
    await redis.flushall()
    yield redis
    await redis.aclose()


async def test_calls_of_one_tick_share_a_batch(client: Any) -> None:
    pipeline = AutoPipeline(client, max_batch=1000)
    replies = await asyncio.gather(*(pipeline.execute("INCR", "n") for _ in range(300)))
    assert replies == list(range(1, 301))  # in the order they were made
    assert pipeline.commands == 300
    assert pipeline.batches == 1
    assert await client.get("n") == "300"


async def test_a_full_batch_goes_out_at_once(client: Any) -> None:
    """The 100th call writes its batch before the tick ends (so Redis starts on it
    while the caller's loop goes on); the last 50 go out at the end of the tick."""
    pipeline = AutoPipeline(client, max_batch=100)
    assert await pipeline.execute("PING") == "PONG"  # the connection is open
    futures = [pipeline.execute("INCR", "n") for _ in range(250)]
    assert pipeline.batches == 1 + 2
    assert await asyncio.gather(*futures) == list(range(1, 251))
    assert pipeline.batches == 1 + 3


async def test_an_error_stays_with_its_caller(client: Any) -> None:
    pipeline = AutoPipeline(client)
    await client.set("text", "abc")
    results = await asyncio.gather(
        pipeline.execute("INCR", "a"),
        pipeline.execute("INCR", "text"),
        pipeline.execute("INCR", "a"),
        return_exceptions=True,
    )
    assert results[0] == 1 and results[2] == 2
    assert isinstance(results[1], ResponseError)


async def test_a_dead_server_fails_every_caller(tmp_path: Any) -> None:
    server = ServerProcess(tmp_path / "dying").start()
    redis = connect(Settings(redis_url=server.url))
    pipeline = AutoPipeline(redis)
    try:
        assert await pipeline.execute("PING") == "PONG"  # raw replies: no redis-py callbacks
        server.kill()
        results = await asyncio.gather(
            *(pipeline.execute("PING") for _ in range(5)), return_exceptions=True
        )
        assert all(isinstance(r, Exception) for r in results)
    finally:
        await redis.aclose()
        server.stop()


async def test_a_server_that_stops_answering_times_out(tmp_path: Any) -> None:
    """A write whose replies do not come within the client's socket timeout fails its
    callers with TimeoutError; the next call gets a fresh connection."""
    server = ServerProcess(tmp_path / "paused").start()
    redis = connect(Settings(redis_url=server.url), socket_timeout=0.5)
    pipeline = AutoPipeline(redis)
    try:
        assert await pipeline.execute("PING") == "PONG"
        server.proc.send_signal(signal.SIGSTOP)
        try:
            results = await asyncio.wait_for(
                asyncio.gather(
                    *(pipeline.execute("PING") for _ in range(3)), return_exceptions=True
                ),
                timeout=10,
            )
        finally:
            server.proc.send_signal(signal.SIGCONT)
        assert all(isinstance(r, TimeoutError) for r in results), results
        assert await pipeline.execute("PING") == "PONG"
    finally:
        await redis.aclose()
        server.stop()


async def test_the_pipeline_closes_with_its_client(
    client: Any, standalone_server: ServerProcess
) -> None:
    """The borrowed connection goes when the pipeline or its client is closed."""

    async def connection_ids() -> set[str]:
        return {c["id"] for c in await client.client_list()}

    pipeline = AutoPipeline(client)
    own = str(await pipeline.execute("CLIENT", "ID"))
    assert own in await connection_ids()
    await pipeline.aclose()
    assert own not in await connection_ids()

    other = connect(Settings(redis_url=standalone_server.url))
    pipeline = AutoPipeline(other)
    own = str(await pipeline.execute("CLIENT", "ID"))
    assert own in await connection_ids()
    await other.aclose()
    await asyncio.sleep(0.1)  # the server notices the closed socket
    assert own not in await connection_ids()


async def test_no_server_fails_every_caller() -> None:
    redis = connect(Settings(redis_url="redis://127.0.0.1:1/0"))
    pipeline = AutoPipeline(redis)
    try:
        results = await asyncio.wait_for(
            asyncio.gather(*(pipeline.execute("PING") for _ in range(3)), return_exceptions=True),
            timeout=30,
        )
        assert all(isinstance(r, Exception) for r in results)
    finally:
        await redis.aclose()


# -- what the pipelines rely on in redis-py (no public seam: stock/redis/pipeline.py) --------


def test_redis_py_is_a_version_the_pipelines_were_checked_with() -> None:
    """pyproject.toml bounds redis-py above: a version the tests below have not
    passed on is not installed by accident."""
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (redis_py,) = [r for r in map(Requirement, dependencies) if r.name == "redis"]
    assert any(spec.operator in ("<", "<=", "==", "~=") for spec in redis_py.specifier), redis_py
    assert redis_py.specifier.contains(version("redis")), (version("redis"), str(redis_py))


async def test_an_open_connection_lends_its_streams(client: Any) -> None:
    """The pool lends an open, authenticated connection whose asyncio streams carry
    raw RESP both ways, nothing of it held back by redis-py's own parser; closed, it
    has none; given back, the pool opens the next one again."""
    pool = client.connection_pool
    conn = await pool.get_connection()
    try:
        assert conn.is_connected
        reader, writer = streams(conn)
        assert isinstance(reader, asyncio.StreamReader)
        assert isinstance(writer, asyncio.StreamWriter)
        writer.write(hiredis.pack_command(("PING",)) + hiredis.pack_command(("ECHO", "é")))
        data = b""
        while data.count(b"\r\n") < 3:
            data += await asyncio.wait_for(reader.read(1 << 16), 5)
        assert data == b"+PONG\r\n$2\r\n\xc3\xa9\r\n"
        await conn.disconnect()
        assert streams(conn) == (None, None)
    finally:
        await pool.release(conn)
    again = await pool.get_connection()
    try:
        assert again.is_connected and isinstance(streams(again)[1], asyncio.StreamWriter)
    finally:
        await pool.release(again)


def test_the_cluster_client_parts_the_batch_uses() -> None:
    """stock/redis/cluster_pipeline.py borrows a node's connections, routes by the client's
    slot map, tells it of a MOVED, and parses error replies as redis-py does."""
    used = {
        ClusterNode: ("acquire_connection", "release", "disconnect_if_needed"),
        RedisCluster: ("get_node_from_key", "get_node", "get_default_node", "initialize"),
        NodesManager: ("move_slot", "initialize", "get_node", "set_nodes"),
    }
    for owner, names in used.items():
        for name in names:
            assert callable(getattr(owner, name, None)), f"{owner.__name__}.{name}"
    for awaited in (
        ClusterNode.disconnect_if_needed,
        RedisCluster.initialize,
        NodesManager.move_slot,
        NodesManager.initialize,
    ):
        assert inspect.iscoroutinefunction(awaited), awaited
    for plain in (ClusterNode.acquire_connection, NodesManager.get_node, NodesManager.set_nodes):
        assert not inspect.iscoroutinefunction(plain), plain
    # stock.redis.client adds a master it has not seen (the target of an ASK) as move_slot does
    manager = NodesManager([ClusterNode("127.0.0.1", 7000)], False, {"decode_responses": True})
    assert manager.get_node("127.0.0.1", 7001) is None
    node = ClusterNode("127.0.0.1", 7001, PRIMARY, **manager.connection_kwargs)
    manager.set_nodes(manager.nodes_cache, {node.name: node})
    assert manager.get_node("127.0.0.1", 7001) is node and node.server_type == PRIMARY
    moved = _parse_error("MOVED 3999 127.0.0.1:6381")
    assert isinstance(moved, MovedError) and isinstance(moved, AskError)
    assert (moved.slot_id, moved.host, moved.port) == (3999, "127.0.0.1", 6381)
    ask = _parse_error("ASK 12 127.0.0.1:6382")
    assert isinstance(ask, AskError) and not isinstance(ask, MovedError)
