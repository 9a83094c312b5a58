"""The client layer: the Redis client the settings ask for (standalone or cluster),
and the one retry of a call that failed inside redis-py itself (``RetryOnce``)."""

from __future__ import annotations

import functools
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar

import redis
from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.cluster import PRIMARY
from redis.exceptions import ConnectionError, RedisError

from stock.core.config import Settings
from stock.core.errors import StockError, StoreUnavailable

log = logging.getLogger("stock.redis.client")
T = TypeVar("T")
P = ParamSpec("P")


class _Cluster(RedisCluster):
    """redis-py's cluster client, initialized before its first command, and able to
    follow a redirection to a master that joined after its last slot map load.

    redis-py 8.1 routes a command that arrives before the client knows the slot
    map to its default node, not to the key's slot: a burst of first calls then
    draws MOVED replies. Knowing the slot map before the first command routes
    every call right.

    An ASK can name a master the client has never seen (one just added with
    ``--cluster add-node``, slots on their way to it): redis-py's MOVED path adds
    such a node (``NodesManager.move_slot``), its ASK path looks the address up
    by name and fails on None (AttributeError deep in redis-py). ``get_node`` by
    name adds it here, as a primary, the way ``move_slot`` does.

    ``migration_wait_s``: how long a call answered TRYAGAIN is tried again
    (``stock.redis.cluster_pipeline``; ``Settings.redis_migration_wait_s``).
    """

    migration_wait_s = 5.0

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        if self.get_default_node() is None:
            await self.initialize()
        return await super().execute_command(*args, **kwargs)

    def get_node(
        self, host: str | None = None, port: int | None = None, node_name: str | None = None
    ) -> Any:
        node = super().get_node(host, port, node_name)
        if node is None and node_name and not (host and port):
            return self.known_node(*node_name.rsplit(":", 1))
        return node

    def known_node(self, host: str, port: int | str) -> Any:
        """The node at ``host:port``, added as a primary if the client does not know
        it yet (the target of a redirection: a master that just joined)."""
        manager = self.nodes_manager
        node = manager.get_node(host, int(port))
        if node is None:
            node = ClusterNode(host, int(port), PRIMARY, **manager.connection_kwargs)
            manager.set_nodes(manager.nodes_cache, {node.name: node})
        return node


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
    keeps redis-py's own retries, which follow MOVED and failovers; calls answered
    TRYAGAIN during a reshard are retried for ``redis_migration_wait_s`` by
    ``stock.redis.cluster_pipeline``.
    """
    options.setdefault("decode_responses", True)
    for name, value in deadlines(settings).items():
        options.setdefault(name, value)
    size = settings.redis_max_connections
    if settings.redis_cluster:
        # reinitialize_steps=0: a MOVED moves its slot in the client's map (redis-py's
        # default also reloads the whole map on every fifth MOVED, closing every
        # connection of the client under the calls in flight on them; a reshard
        # draws a MOVED per moved slot). A lost node still reloads it.
        options.setdefault("reinitialize_steps", 0)
        client = _Cluster.from_url(settings.redis_url, max_connections=4 * size, **options)
        assert isinstance(client, _Cluster)
        client.migration_wait_s = settings.redis_migration_wait_s
        return client
    options.setdefault(
        "retry", Retry(ExponentialWithJitterBackoff(0.01, 0.2), settings.redis_retries)
    )
    wait = settings.redis_connect_timeout_s + settings.redis_timeout_s
    pool = BlockingConnectionPool.from_url(
        settings.redis_url, max_connections=size, timeout=wait, **options
    )
    return Redis.from_pool(pool)  # the client owns the pool: aclose() closes its connections


class ClientFailure(ConnectionError):
    """A call failed inside redis-py itself, not with a RedisError, and again when
    it was run once more: its outcome is unknown, as with a lost reply (the API
    answers 503 ``unavailable``; the same request can be sent again)."""


_REDIS_PACKAGE = os.path.dirname(redis.__file__) + os.sep


def raised_in_redis_client(exc: BaseException) -> bool:
    """Whether ``exc`` came out of redis-py's own code. During a cluster failover its
    cluster client closes every node's connections (``aclose`` on CLUSTERDOWN, and
    when it reloads the slot map after MOVED replies), and calls in flight on those
    connections then fail with AttributeError or RuntimeError (closed transport)
    instead of a RedisError."""
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.startswith(_REDIS_PACKAGE):
            return True
        tb = tb.tb_next
    return False


class RetryOnce:
    """The retry of idempotent calls (the order operations, by ``order_id``; the
    cluster batch's repeatable fallbacks): one that failed inside redis-py is run
    once more at once, on a fresh connection; it replays or completes. A second
    such failure becomes ``ClientFailure``. RedisErrors are redis-py's own retries'
    business (``connect``), and any other failure is a bug: neither is retried."""

    def __init__(self, on_retry: Callable[[], object] | None = None) -> None:
        self.retries = 0  # calls run once more
        self.on_retry = on_retry  # the API's wiring counts them in stock_redis_errors

    async def __call__(self, call: Callable[[], Awaitable[T]], what: str) -> T:
        try:
            return await call()
        except Exception as exc:
            if not _client_failure(exc):
                raise
            self.retries += 1
            if self.on_retry is not None:
                self.on_retry()
            log.warning("%s: Redis client failure, trying once more: %r", what, exc)
        try:
            return await call()
        except Exception as exc:
            if not _client_failure(exc):
                raise
            raise ClientFailure(f"{what}: Redis client failure: {exc!r}") from exc


def _client_failure(exc: Exception) -> bool:
    if isinstance(exc, StockError | RedisError | OSError):
        return False
    return raised_in_redis_client(exc)


async def typed(call: Awaitable[T], what: str) -> T:
    """``call``, a failure inside redis-py raised as ClientFailure (a RedisError): the
    client's boundary for calls that are not retried (the engine's reads and admin
    writes, readiness, health), so what leaves it is a RedisError or our own bug."""
    try:
        return await call
    except Exception as exc:
        if not _client_failure(exc):
            raise
        raise ClientFailure(f"{what}: Redis client failure: {exc!r}") from exc


def store_boundary(call: Callable[P, Awaitable[T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    """``call`` with a RedisError (a ClientFailure too: ``typed``) that escapes it
    raised as StoreUnavailable (the engine's public operations: the boundary of the
    Redis client); the API's front then answers by the error's type alone."""

    @functools.wraps(call)
    async def bounded(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await typed(call(*args, **kwargs), call.__name__)
        except RedisError as exc:
            raise StoreUnavailable() from exc

    return bounded


class _Retrying(Protocol):
    retry: RetryOnce


S = TypeVar("S", bound=_Retrying)


def retried_once(
    operation: Callable[Concatenate[S, str, P], Awaitable[T]],
) -> Callable[Concatenate[S, str, P], Awaitable[T]]:
    """An idempotent operation method ``(self, op, ...)`` run through ``self.retry``
    (the engine's order operations: idempotent by ``order_id``)."""

    @functools.wraps(operation)
    async def run(self: S, op: str, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return await self.retry(lambda: operation(self, op, *args, **kwargs), op)

    return run
