"""Auto-pipelining on a Redis Cluster: one batch per node per event-loop tick.

redis-py 8.1 refuses EVALSHA in its cluster pipeline (redis/redis-py#2914; the
fix, #4206, is not in a release on the package index), and even so its pipeline
batches one caller's commands, not many callers'. Here every call is routed by
redis-py's own slot map (``get_node_from_key``) to an ``AutoPipeline`` of that
node, which borrows one connection of the node and writes the calls of one tick
(or of a full batch) in one write, exactly as on standalone.

The replies that say a call did not run are followed here, for every call
(``ClusterBatch.call``): MOVED (the slot map is told, ``move_slot``, as
redis-py's own path does, and the call joins the new node's batch), ASK (the
call goes to the node named, prefixed by ASKING in the same batch and so on the
same connection: redis-py sends its ASKING as a separate pooled command, which
often lands on another connection), NOSCRIPT (the script is loaded on that node)
and TRYAGAIN. A reshard answers TRYAGAIN to a call whose keys are split between
the two nodes while their slot migrates, for as long as that slot's keys take to
move: redis-py gives up after about 0.4 s, here the call is tried again with a
growing pause for ``redis_migration_wait_s`` (5 s by default).

A node that answers CLUSTERDOWN (a master taken out with ``del-node`` is reset
and says so for the slots a stale map still gives it), or a slot the map does
not cover, makes the slot map reload (``NodesManager.initialize``, which lets
the calls in flight finish) and the call wait and go again, within the same
budget. After that, or when the connection fails, the call goes again through
redis-py's cluster client (which closes every connection of the client on
CLUSTERDOWN, refreshes its slot map and retries). A call made with ``once`` is
never sent twice where it may have run:
it follows the redirections above (nothing ran), and any other failure reaches
the caller. A call that timed out (the node did not answer within
``socket_timeout``) is not resent either: the node is paused or overloaded, and
resending would only wait again.
"""

from __future__ import annotations

import asyncio
from binascii import crc_hqx
from collections.abc import Awaitable, Callable, Generator, Sequence
from typing import Any

from redis._parsers.base import BaseParser
from redis.crc import REDIS_CLUSTER_HASH_SLOTS
from redis.exceptions import (
    AskError,
    ClusterDownError,
    ConnectionError,
    MovedError,
    NoScriptError,
    SlotNotCoveredError,
    TryAgainError,
)

from stock.redis.client import RetryOnce
from stock.redis.pipeline import MAX_BATCH, AutoPipeline

# Failures after which redis-py's own path sends a repeatable call again: the call did
# not run where it was sent (redirections too many in a row, a slot uncovered, the
# cluster down), or the connection failed (maybe sent, maybe not).
_RESEND = (AskError, ClusterDownError, SlotNotCoveredError, ConnectionError)
# What ``follow`` handles after a call sent at once failed (``ClusterBatch.call``).
_FOLLOWED = (*_RESEND, TryAgainError, NoScriptError)

Fallback = Callable[[], Awaitable[Any]]

MAX_REDIRECTS = 5  # MOVED/ASK followed in a row (between TRYAGAIN pauses) for one call
MIGRATION_WAIT_S = 5.0  # TRYAGAIN waited out per call, when the client does not say
TRYAGAIN_FIRST_S = 0.01  # the first pause after a TRYAGAIN, doubling ...
TRYAGAIN_MAX_S = 0.2  # ... up to this


def slot_of(key: str) -> int:
    """``key``'s hash slot, as ``redis.crc.key_slot`` of the encoded key computes it
    (a hash tag's braces are ASCII, so the tag is the same in text and in UTF-8)."""
    start = key.find("{")
    if start > -1:
        end = key.find("}", start + 1)
        if end > start + 1:
            key = key[start + 1 : end]
    return crc_hqx(key.encode(), 0) % REDIS_CLUSTER_HASH_SLOTS


def _parse_error(message: str) -> Exception:
    """An error reply as redis-py's parsers make it (MovedError, AskError, ...)."""
    return BaseParser.parse_error(message)  # type: ignore[no-any-return,no-untyped-call]


def _ignore_result(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # read, so that a failure is not logged as never retrieved


class NodePipeline(AutoPipeline):
    """An AutoPipeline over one connection of one cluster node (a redis-py
    ``ClusterNode``, which lends it from its own pool)."""

    reply_error = staticmethod(_parse_error)

    def __init__(self, client: Any, node: Any, max_batch: int = MAX_BATCH) -> None:
        super().__init__(client, max_batch)
        self.node = node

    async def _borrow(self) -> Any:
        conn = self.node.acquire_connection()
        try:
            await self.node.disconnect_if_needed(conn)
            await conn.connect()  # no-op when it is open
        except BaseException:
            self.node.release(conn)
            raise
        return conn

    async def _return(self, conn: Any) -> None:
        self.node.release(conn)


class Pending:
    """A call of ``ClusterBatch.call``, already sent to ``node`` (None when the slot
    map did not cover its slot): awaited for its outcome, its reply or
    ``ClusterBatch.follow``'s when it did not run there; ``close`` when it will not
    be awaited (its reply is nobody's)."""

    __slots__ = ("batch", "command", "fallback", "key", "node", "reply", "source")

    def __init__(
        self,
        batch: ClusterBatch,
        node: Any,
        reply: asyncio.Future[Any] | None,
        key: str,
        command: Sequence[Any],
        fallback: Fallback | None,
        source: str,
    ) -> None:
        self.batch, self.node, self.reply, self.key = batch, node, reply, key
        self.command, self.fallback, self.source = command, fallback, source

    def __await__(self) -> Generator[Any, None, Any]:
        """(A generator, not a coroutine: one level less at every wait.)"""
        reply = self.reply
        if reply is not None:
            try:
                return (yield from reply.__await__())
            except _FOLLOWED as exc:
                followed = self.batch.follow(
                    self.key, self.command, self.fallback, self.source, self.node, exc
                )
                return (yield from followed.__await__())
        followed = self.batch.follow(self.key, self.command, self.fallback, self.source)
        return (yield from followed.__await__())

    def close(self) -> None:
        if self.reply is not None:
            self.reply.add_done_callback(_ignore_result)


class ClusterBatch:
    """Per-node auto-pipelines for one redis-py asyncio cluster client."""

    def __init__(self, client: Any, max_batch: int = MAX_BATCH) -> None:
        self.client = client
        self.max_batch = max_batch
        self._pipes: dict[str, NodePipeline] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._retired = [0, 0]  # batches and commands of pipelines replaced since
        self.fallbacks = 0  # calls sent again through redis-py's cluster client
        self.redirects = 0  # MOVED or ASK replies followed here
        self.tryagains = 0  # TRYAGAIN replies waited out here
        self.reloads = 0  # slot map reloads after CLUSTERDOWN or an uncovered slot
        self.retry = RetryOnce()  # a fallback that failed inside redis-py

    @property
    def batches(self) -> int:
        """Writes so far (one per batch), over every node."""
        return self._retired[0] + sum(p.batches for p in self._pipes.values())

    @property
    def commands(self) -> int:
        return self._retired[1] + sum(p.commands for p in self._pipes.values())

    def pipe_for(self, node: Any) -> NodePipeline:
        """The node's pipeline; a new one when redis-py has replaced the node object
        (a reinitialization), the old one closed in the background."""
        pipe = self._pipes.get(node.name)
        if pipe is not None and pipe.node is node:
            return pipe
        if pipe is not None:
            self._retired[0] += pipe.batches
            self._retired[1] += pipe.commands
            task = asyncio.ensure_future(pipe.aclose())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        pipe = self._pipes[node.name] = NodePipeline(self.client, node, self.max_batch)
        return pipe

    async def execute(self, *command: Any) -> Any:
        """A command whose first argument is its only key (GET, HMGET, PEXPIRE):
        raw RESP reply, as ``AutoPipeline.execute``; resent through redis-py when
        it did not reach its node."""
        return await self.call(command[1], command, lambda: self.client.execute_command(*command))

    async def evalsha(
        self,
        sha: str,
        source: str,
        keys: Sequence[str],
        args: Sequence[Any],
        fallback: Fallback | None,
    ) -> Any:
        """EVALSHA on the node of ``keys`` (all in one slot); ``fallback`` (None for
        a call that must never be sent twice) runs it through redis-py instead."""
        command = ("EVALSHA", sha, len(keys), *keys, *args)
        return await self.call(keys[0], command, fallback, source)

    def call(
        self, key: str, command: Sequence[Any], fallback: Fallback | None, source: str = ""
    ) -> Pending:
        """Send ``command`` now to the node of ``key``'s slot by the client's slot map
        (no coroutine, no redis-py call); await the result for its reply, the
        replies that say it did not run there followed (``follow``, which also
        routes a call whose slot the map does not cover: not loaded yet, or a node
        lost). Sent at once, so that the calls of one order made one after the
        other travel in the same batches without a task each."""
        nodes = self.client.nodes_manager.slots_cache.get(slot_of(key))
        if not nodes:
            return Pending(self, None, None, key, command, fallback, source)
        node = nodes[0]
        pipe = self._pipes.get(node.name)
        if pipe is None or pipe.node is not node:
            pipe = self.pipe_for(node)
        return Pending(self, node, pipe.execute(*command), key, command, fallback, source)

    async def follow(
        self,
        key: str,
        command: Sequence[Any],
        fallback: Fallback | None,
        source: str = "",
        node: Any = None,
        failed: BaseException | None = None,
    ) -> Any:
        """Send ``command`` to the node of ``key``'s slot, following the replies that
        say it did not run there: MOVED (the slot map is told) and ASK (ASKING first,
        in the same batch), each at most ``MAX_REDIRECTS`` times in a row; TRYAGAIN
        (a multi-key call in a slot whose keys are half migrated), and CLUSTERDOWN or
        an uncovered slot (the slot map reloaded), tried again with a growing pause
        for ``migration_wait_s``. These are followed for ``once`` calls too: nothing
        ran. Any other failure in ``_RESEND`` goes to ``fallback`` (redis-py's path),
        or to the caller when there is none. ``failed``: how the call already sent
        to ``node`` (by ``call``) failed, followed first (NOSCRIPT: sent again
        there, the script loaded)."""
        client = self.client
        if node is None:
            if client.get_default_node() is None:  # no slot map yet
                await client.initialize()
            node = client.get_node_from_key(key)
        asking, hops = False, 0
        waited, pause = 0.0, TRYAGAIN_FIRST_S
        budget = getattr(client, "migration_wait_s", MIGRATION_WAIT_S)
        if isinstance(failed, NoScriptError):
            failed = None  # nothing ran: _send loads the script and sends again
        while True:
            try:
                if failed is not None:
                    first, failed = failed, None
                    raise first
                return await self._send(self.pipe_for(node), command, source, asking)
            except AskError as exc:  # MOVED too (a subclass)
                hops += 1
                target = await self._redirected(exc, key) if hops <= MAX_REDIRECTS else None
                if target is None:
                    return await self._fall_back(exc, fallback)
                node, asking = target
                continue
            except TryAgainError:
                if waited >= budget:
                    raise
                self.tryagains += 1
            except (ClusterDownError, SlotNotCoveredError) as exc:
                if waited >= budget or not await self._reload():
                    return await self._fall_back(exc, fallback)
            except _RESEND as exc:
                return await self._fall_back(exc, fallback)
            await asyncio.sleep(pause)  # (after a TRYAGAIN or a reload)
            waited, pause = waited + pause, min(pause * 2, TRYAGAIN_MAX_S)
            node, asking, hops = client.get_node_from_key(key), False, 0

    async def _redirected(self, exc: AskError, key: str) -> tuple[Any, bool] | None:
        """Where a MOVED (the slot map is told) or an ASK reply sends the call, and
        whether ASKING goes first; None for an ASK to a node not in the slot map."""
        if isinstance(exc, MovedError):
            self.redirects += 1
            await self.client.nodes_manager.move_slot(exc)
            return self.client.get_node_from_key(key), False
        node = self._node_at(exc.host, exc.port)
        if node is None:
            return None
        self.redirects += 1
        return node, True

    async def _reload(self) -> bool:
        """Reload the slot map after CLUSTERDOWN or an uncovered slot: a stale entry (a
        master taken out by ``del-node`` is reset and answers CLUSTERDOWN for the slots
        it gave away). Gently: redis-py's own path first closes every connection of
        the client, under the calls in flight. False when no node has the whole map."""
        self.reloads += 1
        try:
            await self.client.nodes_manager.initialize()
        except Exception:  # redis-py's path decides
            return False
        return True

    async def _fall_back(self, exc: BaseException, fallback: Fallback | None) -> Any:
        """redis-py's own path for a repeatable call; the error for a ``once`` call."""
        if fallback is None:
            raise exc
        self.fallbacks += 1
        # redis-py 8.1 closes every connection of the client when it reloads the slot
        # map (a lost node, CLUSTERDOWN), under calls in flight on them: those fail
        # inside redis-py ('NoneType' ... 'writelines'). Only idempotent calls get a
        # fallback, so such a call is sent once more, on a fresh connection.
        return await self.retry(fallback, "cluster fallback")

    def _node_at(self, host: str, port: int) -> Any:
        """The node an ASK names, added to the client's nodes if new (a master that
        just joined; ``stock.redis.client``'s cluster client does that)."""
        known = getattr(self.client, "known_node", None)
        return known(host, port) if known else self.client.get_node(host=host, port=port)

    async def _send(
        self, pipe: NodePipeline, command: Sequence[Any], source: str, asking: bool = False
    ) -> Any:
        """Send on ``pipe``; on NOSCRIPT (nothing ran) load the script on that node and
        send once more. ``asking``: prefix ASKING (an ASK redirection), in the same
        batch and so on the same connection, right before the call."""
        for attempt in (1, 2):
            try:
                if asking:
                    pipe.execute("ASKING").add_done_callback(_ignore_result)
                return await pipe.execute(*command)
            except NoScriptError:
                if attempt == 2 or not source:
                    raise
                await pipe.execute("SCRIPT", "LOAD", source)
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        pipes, self._pipes = list(self._pipes.values()), {}
        await asyncio.gather(*(p.aclose() for p in pipes), *self._closing)
