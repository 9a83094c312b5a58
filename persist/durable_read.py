"""The writer's reads of the bucket streams, each ended by a wait for Redis's fsync.

Only events Redis has on disk may reach PostgreSQL: else a host crash (power, kernel,
VM) leaves PostgreSQL with events Redis lost, and Redis then numbers new events with
the ``seq`` of the lost ones. So each node's reads go on one connection of that node,
in one round trip, and end with ``WAITAOF 1 0``: it answers once the node has fsynced
every write of that connection, and reading from a consumer group is a write. On a
Redis Cluster the buckets' streams are grouped by the node that owns their slot
(redis-py's slot map) and every node gets its own round trip, concurrently.

**Pending entries.** Re-reading a pending list (``XREADGROUP ... 0``) writes nothing,
and its entries may have been delivered on another connection (a writer that died
before its wait, a connection that broke): WAITAOF would then return at once. An
``XAUTOCLAIM ... COUNT 1 JUSTID`` before it (the entry stays with the same consumer)
is a write that follows the delivery, so the wait covers the pending entries too.

**What a read waits for**, decided per node at its first read (``_decide``; made
again after the node's round trip failed or its wait timed out, and when a replica
attached later: see ``persist.durable_wait``): WAITAOF
where the server has it (Redis 7.2+, Valkey) and can confirm an fsync. Redis 7.0 and
7.1 have no WAITAOF, ``appendfsync no`` never confirms an fsync, and Valkey (every
release so far) confirms one it has not done under ``everysec`` (redis/redis#13793,
fixed in Redis 8.0; found by timed write + WAITAOF pairs): there the read WAITs
for a replica when the node has one, and else a warning is logged once (WAITAOF is
kept where it exists: it is right on a server with the fix). Under
``appendfsync always`` every reply follows its fsync. Where the node has a replica
the reads also ``WAIT 1`` for it (``WAITAOF+WAIT``): a failover promotes the
replica, and what it lacks is lost however well the master fsynced; with AOF off
the reads WAIT for the replica alone, and without either there is nothing to wait for.

**Moved slots, failed nodes.** A bucket whose read answered MOVED, ASK, TRYAGAIN or
CLUSTERDOWN was not read there (the command did not run): redis-py's slot map is
told (MOVED) and the bucket is read again next round, from its pending list
(``skipped``), as is every bucket of a node whose round trip failed or whose wait
timed out (entries may have been delivered). A slot in migration (ASK) is read
where it lives once the migration ends. After a node failed, the slot map is
reloaded (at most once a second). The round fails only when every node failed.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import (
    AskError,
    ClusterDownError,
    MovedError,
    ResponseError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import (
    TimeoutError as ReplyTimeout,
)

from persist.durable_wait import NO_WAIT, WAIT, WAITAOF, check_synced, config_pairs, online_replicas
from stock.core.config import Settings
from stock.redis.client import connect

log = logging.getLogger("persist.writer")

WAITAOF_MS = 2000  # how long a read waits for Redis to fsync what it returned
EARLY_S = 0.6  # two write + WAITAOF pairs under everysec answered faster: no fsyncs
REFRESH_S = 1.0  # at most one slot map reload per this long after a node failed
# Replies after which a bucket was not read (the command did not run there): read again.
NOT_HERE = (AskError, TryAgainError, ClusterDownError)  # (MovedError is an AskError)


@dataclass
class StreamRead:
    """One bucket's read: the head probe (the first entry after ``after``) and
    XREADGROUP from ``start`` (``0``: the pending list, ``>``: new entries)."""

    bucket: int
    key: str
    after: str
    start: str
    count: int


@dataclass
class ReadRound:
    """The raw replies (head, XREADGROUP) of each bucket read and fsynced; the buckets
    not read (to read from their pending lists next round); the node errors."""

    replies: dict[int, tuple[Any, Any]] = field(default_factory=dict)
    skipped: set[int] = field(default_factory=set)
    errors: dict[str, Exception] = field(default_factory=dict)


class DurableReads:
    """The writer's reads of the streams, through a client of their own."""

    def __init__(self, settings: Settings, group: str, consumer: str) -> None:
        # redis-py's reply parsing is off for XRANGE/XREADGROUP (rows are built from
        # the flat field lists directly; the reads here bypass it anyway). Bytes that
        # are not UTF-8 decode to surrogates instead of failing every read: the event
        # they belong to fails its COPY and is quarantined (persist.quarantine).
        self.client = connect(settings, encoding_errors="surrogateescape")
        for command in ("XREADGROUP", "XRANGE"):
            self.client.set_response_callback(command, _raw)
        self.cluster = settings.redis_cluster
        self.group = group
        self.consumer = consumer
        self.waits: dict[str, str] = {}  # node name -> WAITAOF, WAIT or NO_WAIT
        self.failing: set[str] = set()  # nodes whose last round trip failed
        self._stale = False  # reload the slot map before routing
        self.redirects = 0  # bucket reads answered MOVED, ASK, TRYAGAIN or CLUSTERDOWN
        self._reloaded = 0.0

    async def read(self, reads: Sequence[StreamRead]) -> ReadRound:
        result = ReadRound()
        by_node = await self._route(reads, result)
        outcomes = await asyncio.gather(
            *(self._read_node(node, node_reads, result) for node, node_reads in by_node),
            return_exceptions=True,
        )
        for (node, node_reads), outcome in zip(by_node, outcomes, strict=True):
            name = _name(node)
            if isinstance(outcome, BaseException):
                if not isinstance(outcome, Exception):
                    raise outcome  # cancelled
                result.errors[name] = outcome
                result.skipped.update(r.bucket for r in node_reads)
                self.waits.pop(name, None)  # it may come back with another config
                if name not in self.failing:
                    log.warning("writer: reads from %s failed: %r", name, outcome)
                self.failing.add(name)
                self._stale = True
            elif name in self.failing:
                self.failing.discard(name)
                log.info("writer: reads from %s work again", name)
        if by_node and len(result.errors) == len(by_node):
            raise next(iter(result.errors.values()))
        return result

    async def _route(
        self, reads: Sequence[StreamRead], result: ReadRound
    ) -> list[tuple[Any, list[StreamRead]]]:
        """The reads grouped by the node that serves their stream (one group, the
        server itself, on standalone)."""
        if not self.cluster:
            return [(None, list(reads))] if reads else []
        client = self.client
        if client.get_default_node() is None:
            await client.initialize()
        elif self._stale and time.monotonic() - self._reloaded >= REFRESH_S:
            self._stale, self._reloaded = False, time.monotonic()
            await client.nodes_manager.initialize()
        nodes: dict[str, tuple[Any, list[StreamRead]]] = {}
        for r in reads:
            try:
                node = client.get_node_from_key(r.key)
            except SlotNotCoveredError:
                result.skipped.add(r.bucket)
                self._stale = True
                continue
            nodes.setdefault(node.name, (node, []))[1].append(r)
        return list(nodes.values())

    async def _read_node(self, node: Any, reads: list[StreamRead], result: ReadRound) -> None:
        name = _name(node)
        wait = self.waits.get(name)
        if wait is None:
            wait = self.waits[name] = await self._decide(node, reads[0].key)
        commands: list[tuple[Any, ...]] = []
        for r in reads:
            if r.start == "0" and wait:  # (see "Pending entries")
                commands.append(
                    ("XAUTOCLAIM", r.key, self.group, self.consumer, 0, "0-0", "COUNT", 1, "JUSTID")
                )
            commands.append(("XRANGE", r.key, f"({r.after}", "+", "COUNT", 1))
            commands.append(
                (
                    "XREADGROUP",
                    "GROUP",
                    self.group,
                    self.consumer,
                    "COUNT",
                    r.count,
                    "STREAMS",
                    r.key,
                    r.start,
                )
            )
        commands.append(("ROLE",))  # a replica attached later? (persist.durable_wait)
        waits = wait.split("+") if wait else []
        if WAITAOF in waits:
            commands.append(("WAITAOF", 1, 0, WAITAOF_MS))
        if WAIT in waits:
            commands.append(("WAIT", 1, WAITAOF_MS))
        replies = await self._round_trip(node, commands, waits=bool(wait))
        synced = [replies.pop() for _ in waits][::-1]
        if WAIT not in waits and online_replicas(replies.pop()):
            log.info("writer: %s has a replica now: its reads will WAIT for it", name)
            self.waits.pop(name, None)  # decided again next round, which reads them again
            result.skipped.update(r.bucket for r in reads)
            return
        for each, reply in zip(waits, synced, strict=True):
            check_synced(each, reply)
        at = 0
        for r in reads:
            own = 3 if r.start == "0" and wait else 2
            mine, at = replies[at : at + own], at + own
            elsewhere = [e for e in mine if isinstance(e, NOT_HERE)]
            if elsewhere:
                await self._moved(elsewhere[0])
                result.skipped.add(r.bucket)
            else:
                result.replies[r.bucket] = (mine[-2], mine[-1])

    async def _decide(self, node: Any, key: str) -> str:
        """What reads from one node wait for (see the module's docstring); ``key``:
        a stream of that node with the writer's group, for ``_confirms_unsynced``."""

        async def send(*command: Any) -> Any:
            (reply,) = await self._round_trip(node, [command])
            if isinstance(reply, Exception):
                raise reply
            return reply

        found = re.search(r"connected_slaves:(\d+)", str(await send("INFO", "replication")))
        replica = bool(found and int(found.group(1)) > 0)
        local, unsafe = await self._local_wait(node, key, send, replica)
        if replica:
            # A failover promotes the replica: what it lacks is lost however well the
            # master fsynced (or without AOF), so the reads wait for it too.
            return f"{local}+{WAIT}" if local else WAIT
        if unsafe:
            log.warning(
                "writer: %s %s and has no replica: a host crash can lose up to about a "
                "second of events that PostgreSQL already has; set appendfsync always, add "
                "a replica, or use Redis 8.0+ with appendfsync everysec",
                _name(node),
                unsafe,
            )
        return local

    async def _local_wait(
        self, node: Any, key: str, send: Callable[..., Awaitable[Any]], replica: bool
    ) -> tuple[str, str]:
        """WAITAOF or NO_WAIT, and why a host crash can still lose events that
        PostgreSQL has ("" when it cannot, or without AOF: nothing to wait for; with a
        replica the reads WAIT for it and the fsync probe is not needed)."""
        try:
            policy = config_pairs(await send("CONFIG", "GET", "appendfsync")).get("appendfsync")
            if config_pairs(await send("CONFIG", "GET", "appendonly")).get("appendonly") != "yes":
                return NO_WAIT, ""
        except ResponseError:
            return NO_WAIT, ""  # CONFIG refused (managed Redis)
        try:
            await send("WAITAOF", 0, 0, 1)
            has_waitaof = policy != "no"
        except ResponseError as exc:
            if "unknown command" not in str(exc).lower():
                return NO_WAIT, ""
            has_waitaof = False
        local = WAITAOF if has_waitaof else NO_WAIT
        if policy == "always" or replica:
            return local, ""
        if has_waitaof and policy == "everysec" and await self._confirms_unsynced(node, key):
            return local, (
                "confirms fsyncs it has not done (WAITAOF under appendfsync everysec: "
                "redis/redis#13793, not fixed in Valkey)"
            )
        if has_waitaof:
            return local, ""
        return local, "has no WAITAOF (Redis 7.2+)" if policy != "no" else "never confirms an fsync"

    async def _confirms_unsynced(self, node: Any, key: str) -> bool:
        """Whether the node answers WAITAOF 1 0 before the fsync: of three writes each
        followed by WAITAOF, the second and the third each need a new fsync, which
        ``everysec`` starts at the earliest a second after the one before, so a
        correct server takes about two seconds for them and one with the bug a
        tenth of a second each (its event loop's tick). The writes make and drop a
        consumer of the writer's group (no key is added)."""
        pair = [
            ("XGROUP", "CREATECONSUMER", key, self.group, "fsync-probe"),
            ("XGROUP", "DELCONSUMER", key, self.group, "fsync-probe"),
            ("WAITAOF", 1, 0, WAITAOF_MS),
        ]
        await self._round_trip(node, pair, waits=True)
        started = time.monotonic()
        for _ in range(2):
            replies = await self._round_trip(node, pair, waits=True)
            if any(isinstance(r, Exception) for r in replies) or int(replies[-1][0]) != 1:
                return False  # (no group yet, or a wait that timed out: no verdict)
        return time.monotonic() - started < EARLY_S

    async def _moved(self, error: Exception) -> None:
        """Tell redis-py's slot map where a moved slot is now (as its own path does);
        after CLUSTERDOWN reload it. ASK and TRYAGAIN (a slot in migration) change
        nothing: the bucket is read again."""
        self.redirects += 1
        if self.cluster and isinstance(error, MovedError):
            await self.client.nodes_manager.move_slot(error)
        elif isinstance(error, ClusterDownError):
            self._stale = True

    async def _round_trip(
        self, node: Any, commands: Sequence[tuple[Any, ...]], waits: bool = False
    ) -> list[Any]:
        """Send ``commands`` on one connection of the node and read their raw replies
        (an error reply in place of its reply). ``waits``: the last one is a wait,
        whose reply may take WAITAOF_MS longer than the socket timeout."""
        conn = await self._borrow(node)
        try:
            await conn.send_packed_command(conn.pack_commands(commands))
            replies: list[Any] = []
            for i in range(len(commands)):
                try:
                    if waits and i == len(commands) - 1:
                        deadline = WAITAOF_MS / 1000 + (conn.socket_timeout or 10)
                        reply = conn.read_response(timeout=math.inf)  # (no silent None)
                        replies.append(await asyncio.wait_for(reply, deadline))
                    else:
                        replies.append(await conn.read_response())
                except ResponseError as exc:
                    replies.append(exc)
            return replies
        except TimeoutError as exc:
            raise ReplyTimeout(f"no reply to a wait from {_name(node)}") from exc
        finally:
            await self._return(node, conn)

    async def _borrow(self, node: Any) -> Any:
        if node is None:
            return await self.client.connection_pool.get_connection()
        conn = node.acquire_connection()
        try:
            await node.disconnect_if_needed(conn)
            await conn.connect()  # no-op when it is open
        except BaseException:
            node.release(conn)
            raise
        return conn

    async def _return(self, node: Any, conn: Any) -> None:
        if node is None:
            await self.client.connection_pool.release(conn)
        else:
            node.release(conn)

    async def raw_entry(self, stream: str, entry_id: str) -> list[bytes]:
        """One stream entry's fields and values as the bytes Redis holds."""
        reply = await self.client.xrange(stream, min=entry_id, max=entry_id, count=1)
        fields = reply[0][1] if reply else []
        return [str(f).encode("utf-8", "surrogateescape") for f in fields]

    async def oldest_after(self, offsets: dict[str, str]) -> int | None:
        """The time (ms) of the oldest entry after the offset of each stream, if any."""
        pipe = self.client.pipeline(transaction=False)
        for key, offset in offsets.items():
            pipe.xrange(key, min=f"({offset}", max="+", count=1)
        heads = await pipe.execute()
        return min((int(h[0][0].partition("-")[0]) for h in heads if h), default=None)


def entries_of(reply: Any) -> list[Any]:
    """The [id, [field, value, ...]] entries of a raw one-stream XREADGROUP reply."""
    if not reply:
        return []
    if isinstance(reply, dict):  # RESP3: {stream: entries}
        return [entry for entries in reply.values() for entry in entries or []]
    return list(reply[0][1])  # RESP2: [[stream, entries]]


def _raw(response: Any, **options: Any) -> Any:
    return response


def _name(node: Any) -> str:
    return "Redis" if node is None else str(node.name)
