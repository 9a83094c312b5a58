"""Open the Redis client the settings ask for: standalone or cluster."""

from __future__ import annotations

import socket
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff

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


def deadlines(settings: Settings) -> dict[str, Any]:
    """redis-py's connection options for the deadline settings (DESIGN §4): connect
    and reply timeouts, TCP keepalive (a dead peer is noticed on an idle connection
    too) and a PING before reusing a connection idle longer than the health check."""
    options: dict[str, Any] = {
        "socket_connect_timeout": settings.redis_connect_timeout_s,
        "socket_timeout": settings.redis_timeout_s,
        "health_check_interval": settings.redis_health_check_s,
    }
    idle = settings.redis_keepalive_s
    if idle:
        options["socket_keepalive"] = True
        keepalive = {"TCP_KEEPIDLE": idle, "TCP_KEEPINTVL": max(1, idle // 3), "TCP_KEEPCNT": 3}
        options["socket_keepalive_options"] = {
            getattr(socket, name): value
            for name, value in keepalive.items()
            if hasattr(socket, name)  # (macOS has no TCP_KEEPIDLE)
        }
    return options


def connect(settings: Settings, **options: Any) -> Any:
    """A redis-py asyncio client (hiredis parser when installed), decoding to str.

    With ``redis_cluster`` the URL names any node; redis-py's cluster client
    discovers the rest and follows MOVED/ASK and failovers by itself.

    redis-py's pools raise MaxConnectionsError when they run dry instead of
    waiting, so a standalone client gets a BlockingConnectionPool (callers
    queue for a connection) and the engine bounds its operations in flight
    (``StockEngine``); a cluster client allows four times that per node, as an
    order may talk to several nodes at once.

    Every call has a deadline (``deadlines``); a standalone call is retried
    ``redis_retries`` times (redis-py's default, 10, made a call with a 2 s
    timeout last half a minute when Redis stops answering). The cluster client
    keeps redis-py's own retries, which follow MOVED and failovers.
    """
    options.setdefault("decode_responses", True)
    for name, value in deadlines(settings).items():
        options.setdefault(name, value)
    size = settings.redis_max_connections
    if settings.redis_cluster:
        return _Cluster.from_url(settings.redis_url, max_connections=4 * size, **options)
    options.setdefault("retry", Retry(ExponentialWithJitterBackoff(0.01, 0.2),
                                      settings.redis_retries))  # fmt: skip
    wait = settings.redis_connect_timeout_s + settings.redis_timeout_s
    pool = BlockingConnectionPool.from_url(
        settings.redis_url, max_connections=size, timeout=wait, **options
    )
    return Redis.from_pool(pool)  # the client owns the pool: aclose() closes its connections
