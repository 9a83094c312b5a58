"""Open the Redis client the settings ask for: standalone or cluster."""

from __future__ import annotations

from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster

from stock.config import Settings


class _Cluster(RedisCluster):
    """redis-py's cluster client, initialized before its first command.

    redis-py 8.1 routes a command that arrives before the client knows the slot
    map to its default node, not to the key's slot: a burst of first calls then
    draws MOVED replies, and every fifth MOVED makes the client close all its
    connections, failing the calls in flight on them. Knowing the slot map
    before the first command routes every call right.
    """

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        if self.get_default_node() is None:
            await self.initialize()
        return await super().execute_command(*args, **kwargs)


def connect(settings: Settings, **options: Any) -> Any:
    """A redis-py asyncio client (hiredis parser when installed), decoding to str.

    With ``redis_cluster`` the URL names any node; redis-py's cluster client
    discovers the rest and follows MOVED/ASK and failovers by itself.

    redis-py's pools raise MaxConnectionsError when they run dry instead of
    waiting, so a standalone client gets a BlockingConnectionPool (callers
    queue for a connection) and the engine bounds its operations in flight
    (``StockEngine``); a cluster client allows four times that per node, as an
    order may talk to several nodes at once.
    """
    options.setdefault("decode_responses", True)
    size = settings.redis_max_connections
    if settings.redis_cluster:
        return _Cluster.from_url(settings.redis_url, max_connections=4 * size, **options)
    pool = BlockingConnectionPool.from_url(
        settings.redis_url, max_connections=size, timeout=10, **options
    )
    return Redis.from_pool(pool)  # the client owns the pool: aclose() closes its connections
