"""Open the Redis client the settings ask for: standalone or cluster."""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis, RedisCluster

from stock.config import Settings


def connect(settings: Settings, **options: Any) -> Any:
    """A redis-py asyncio client (hiredis parser when installed), decoding to str.

    With ``redis_cluster`` the URL names any node; redis-py's cluster client
    discovers the rest and follows MOVED/ASK and failovers by itself.
    """
    options.setdefault("decode_responses", True)
    if settings.redis_cluster:
        return RedisCluster.from_url(settings.redis_url, **options)
    return Redis.from_url(settings.redis_url, **options)
