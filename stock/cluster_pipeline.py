"""Auto-pipelining on a Redis Cluster: one batch per node per event-loop tick.

redis-py 8.1 refuses EVALSHA in its cluster pipeline (redis/redis-py#2914; the
fix, #4206, is not in a release on the package index), and even so its pipeline
batches one caller's commands, not many callers'. Here every call is routed by
redis-py's own slot map (``get_node_from_key``) to an ``AutoPipeline`` of that
node, which borrows one connection of the node and writes the calls of one tick
(or of a full batch) in one write, exactly as on standalone.

redis-py stays in charge of the topology. When a node answers MOVED, ASK,
TRYAGAIN or CLUSTERDOWN (the call did not run) or the connection to it fails,
the call goes again through redis-py's cluster client, which follows the
redirection, refreshes its slot map (so later calls route right) and retries.
A MOVED is first followed here, once (the call did not run): the slot map is
told (``move_slot``, as redis-py's own path does) and the call joins the new
node's batch; an ASK likewise, prefixed by ASKING. A call made with ``once`` is
never sent twice: any failure but those redirections reaches the caller. A call that timed out
(the node did not answer within ``socket_timeout``) is not resent either: the
node is paused or overloaded, and resending would only wait again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from redis._parsers.base import BaseParser
from redis.exceptions import (
    AskError,
    ClusterDownError,
    ConnectionError,
    MovedError,
    NoScriptError,
    SlotNotCoveredError,
    TryAgainError,
)

from stock.pipeline import MAX_BATCH, AutoPipeline

# Failures after which redis-py's own path sends a repeatable call again: the call did
# not run where it was sent (a redirection, a slot in migration or uncovered, the
# cluster down), or the connection failed (maybe sent, maybe not).
_RESEND = (AskError, TryAgainError, ClusterDownError, SlotNotCoveredError, ConnectionError)

Fallback = Callable[[], Awaitable[Any]]


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

    async def call(
        self, key: str, command: Sequence[Any], fallback: Fallback | None, source: str = ""
    ) -> Any:
        client = self.client
        if client.get_default_node() is None:  # no slot map yet
            await client.initialize()
        try:
            return await self._send(self.pipe_for(client.get_node_from_key(key)), command, source)
        except AskError as exc:  # MOVED or ASK: it did not run; follow it once, batched
            try:
                return await self._redirect(exc, command, source)
            except _RESEND:
                if fallback is None:
                    raise
        except _RESEND:
            if fallback is None:
                raise
        self.fallbacks += 1
        try:
            return await fallback()
        except AttributeError:
            # redis-py 8.1 closes every connection of the client when it reloads the
            # slot map (after MOVED replies), under calls in flight on them: those fail
            # inside redis-py ('NoneType' ... 'writelines'). Only idempotent calls get
            # a fallback, so the call is sent once more, on a fresh connection.
            self.fallbacks += 1
            return await fallback()

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

    async def _redirect(self, exc: AskError, command: Sequence[Any], source: str) -> Any:
        """Follow one MOVED (telling redis-py's slot map, as its own path does) or
        one ASK, in the batch of the node it names."""
        self.redirects += 1
        moved = isinstance(exc, MovedError)
        if moved:
            await self.client.nodes_manager.move_slot(exc)
        node = self.client.get_node(host=exc.host, port=exc.port)
        if node is None:
            raise exc
        return await self._send(self.pipe_for(node), command, source, asking=not moved)

    async def aclose(self) -> None:
        pipes, self._pipes = list(self._pipes.values()), {}
        await asyncio.gather(*(p.aclose() for p in pipes), *self._closing)
