"""Fixtures: real valkey-server processes, one standalone and one 3-master cluster,
started once per session; each test gets fresh clients and an empty keyspace."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from redis.asyncio import RedisCluster

from stock.core.config import Settings
from stock.orders.engine import StockEngine
from stock.redis.client import connect
from tests.servers import Cluster, ServerProcess

# PostgreSQL (an embedded server per session, a migrated database per test), a fake
# payment service, and `stock serve` as a child process
pytest_plugins = ["tests.postgres", "tests.payment_service", "tests.service"]

BUCKETS = 16


@pytest.fixture(scope="session")
def standalone_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = ServerProcess(tmp_path_factory.mktemp("standalone")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    nodes = Cluster(tmp_path_factory.mktemp("cluster")).start()
    yield nodes
    nodes.stop()


@pytest.fixture(params=["standalone", "cluster"])
def settings(request: pytest.FixtureRequest) -> Settings:
    """Settings for one backend; every test using it runs on both."""
    if request.param == "cluster":
        server: Any = request.getfixturevalue("cluster")
        return Settings(redis_url=server.url, redis_cluster=True, buckets=BUCKETS)
    server = request.getfixturevalue("standalone_server")
    return Settings(redis_url=server.url, buckets=BUCKETS)


async def flush(client: Any) -> None:
    if isinstance(client, RedisCluster):
        await client.flushall(target_nodes=RedisCluster.PRIMARIES)
    else:
        await client.flushall()


@pytest.fixture
async def redis(settings: Settings) -> AsyncIterator[Any]:
    client = connect(settings)
    await flush(client)
    yield client
    await client.aclose()


@pytest.fixture
async def engine(redis: Any, settings: Settings) -> StockEngine:
    return StockEngine(redis, settings)
