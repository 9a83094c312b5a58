"""The auto-pipeline: batches of one tick (or of max_batch calls), each caller gets its
own reply or error, and a broken or closed connection fails only its own callers."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.exceptions import ResponseError, TimeoutError

from stock.client import connect
from stock.config import Settings
from stock.pipeline import AutoPipeline
from tests.servers import ServerProcess


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
