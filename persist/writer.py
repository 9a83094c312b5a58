"""The writer: drains every bucket's event stream into PostgreSQL, exactly once in effect.

Each round reads the owned buckets' streams with XREADGROUP (one consumer
group ``stock-writer``, consumer ``writer``; one pipelined round trip), applies
everything read in one PostgreSQL transaction (``persist.events.apply_batch``)
that also records the stream offsets, then XACKs and trims the streams up to
the offsets (XTRIM MINID). A crash anywhere leaves entries pending (delivered,
not acknowledged): a bucket is always read from its pending list (id ``0``)
first and from ``>`` only once that is empty, and entries at or below the
recorded offset are skipped and acknowledged. Each node's reads end with a wait
for Redis's fsync (``persist.durable_read``): a Redis host crash cannot leave
PostgreSQL with events Redis lost.

**Two writers at once.** Buckets are partitioned with PostgreSQL session
advisory locks ``pg_try_advisory_lock(WRITER_LOCK, bucket)``, taken on the same
connection that runs the batch transactions, so a writer can only commit for
buckets it holds. The first writer takes every free bucket; the others stand by
and take over the buckets of a writer whose connection ends (crash, SIGKILL,
network) within ``rebalance_s``. Every writer uses the same consumer name, so a
takeover reads the pending entries of the writer it replaces. If a writer that
lost its lock still reads ``>`` once before it notices, the new owner sees a gap
(its reply does not start at the first entry after its offset) and goes back to
the pending list instead of skipping past the entries the other one took.

**PostgreSQL down.** The round fails, the batch is dropped from memory (it is
still pending in Redis), the writer backs off with jitter (logging once per
state change; ``stock.loops.supervise.run_loop``) and re-reads the pending entries
when PostgreSQL is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from redis.exceptions import RedisError, ResponseError

from persist.durable_read import DurableReads, StreamRead, entries_of
from persist.events import Chunk, StreamId, apply_batch, decode, prepare, read_offsets
from persist.quarantine import POISON_ERRORS, screened
from stock.core import keys
from stock.core.config import Settings
from stock.loops.supervise import LoopCounters, run_loop
from stock.redis.scripts import Scripts

log = logging.getLogger("persist.writer")

WRITER_LOCK = 0x5704  # first key of the writer's pg_try_advisory_lock(int, int)
GROUP = "stock-writer"
PROBE = 16  # entries asked of a bucket that was empty last time
CONSUMER = "writer"

PG_ERRORS = (
    asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError, OSError,
    TimeoutError,
)  # fmt: skip

_TRY_LOCKS = "SELECT b FROM unnest($2::int[]) AS b WHERE pg_try_advisory_lock($1, b)"


@dataclass
class WriterStats:
    """Counters for metrics: flush lag is the age of the oldest event read but not flushed."""

    events_total: int = 0
    batches_total: int = 0
    last_batch: int = 0
    batch_sizes: deque[int] = field(default_factory=lambda: deque(maxlen=256))
    owned_buckets: int = 0
    pg_errors: int = 0
    redis_errors: int = 0
    gaps: int = 0
    quarantined: int = 0  # events set aside in event_quarantine
    oldest_unflushed_ms: int | None = None

    @property
    def flush_lag_s(self) -> float:
        if self.oldest_unflushed_ms is None:
            return 0.0
        return max(0.0, time.time() - self.oldest_unflushed_ms / 1000)


@dataclass
class _Read:
    """What one round read from one bucket."""

    bucket: int
    acked: bool  # whether to acknowledge up to the offset after the commit
    fresh: Chunk | None  # the entries above the offset
    full: bool


class Writer:
    """Streams -> PostgreSQL. ``run`` loops until stopped; ``step`` is one round."""

    def __init__(self, client: Any, settings: Settings, dsn: str, rebalance_s: float = 2.0) -> None:
        self.redis = client
        self.settings = settings
        self.dsn = dsn
        self.rebalance_s = rebalance_s
        self.stats = WriterStats()
        self.conn: asyncpg.Connection | None = None
        self.owned: set[int] = set()
        self.pending: set[int] = set()  # buckets to read from id 0 (their pending list)
        self.offsets: dict[int, StreamId] = {}  # recorded in PostgreSQL
        self.delivered: dict[int, StreamId] = {}  # the last entry read (>= offset)
        self._prefetched: list[_Read] | None = None
        self._acking: asyncio.Future[None] | None = None
        self.hot: set[int] = set()  # buckets whose last read was full
        self.idle: set[int] = set()  # buckets whose last read was empty
        self._next_rebalance = 0.0
        self.scripts = Scripts(client)
        self.durable = DurableReads(settings, GROUP, CONSUMER)  # its own client

    # -- PostgreSQL side ----------------------------------------------------

    async def _connect(self) -> asyncpg.Connection:
        if self.conn is None or self.conn.is_closed():
            self.owned.clear()
            self._prefetched = None  # read for locks that this new session may not get
            self.conn = await asyncpg.connect(self.dsn, timeout=10)
            await prepare(self.conn)
            self._next_rebalance = 0.0
        if time.monotonic() >= self._next_rebalance:
            await self._acquire(self.conn)
            self._next_rebalance = time.monotonic() + self.rebalance_s
        return self.conn

    async def _acquire(self, conn: asyncpg.Connection) -> None:
        free = [b for b in range(self.settings.buckets) if b not in self.owned]
        if not free:
            return
        got = [r["b"] for r in await conn.fetch(_TRY_LOCKS, WRITER_LOCK, free)]
        if not got:
            return
        offsets = await read_offsets(conn, [keys.events_key(b) for b in got])
        await self._ensure_groups(got)
        for b in got:
            self.offsets[b] = self.delivered[b] = offsets[keys.events_key(b)]
            self.pending.add(b)
        self.owned.update(got)
        self.stats.owned_buckets = len(self.owned)
        log.info("writer: now holds %d of %d buckets", len(self.owned), self.settings.buckets)

    async def _ensure_groups(self, buckets: list[int]) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for b in buckets:
            pipe.xgroup_create(keys.events_key(b), GROUP, id="0", mkstream=True)
        for reply in await pipe.execute(raise_on_error=False):
            if isinstance(reply, Exception) and "BUSYGROUP" not in str(reply):
                raise reply

    async def aclose(self) -> None:
        """Close everything the writer opened."""
        with contextlib.suppress(RedisError):
            await self._acked()
        await self.close()
        await self.durable.client.aclose()

    async def close(self) -> None:
        """Close the PostgreSQL connection (which releases the bucket locks)."""
        if self.conn is not None and not self.conn.is_closed():
            await self.conn.close()
        self.conn = None
        self.owned.clear()
        self.stats.owned_buckets = 0

    # -- one round ----------------------------------------------------------

    async def step(self) -> tuple[int, bool]:
        """Read, apply and acknowledge one batch; returns (events applied, more waiting).

        With a backlog, the next batch is read from Redis while this one commits, and
        this one is acknowledged while the next one commits.
        """
        conn = await self._connect()
        if not self.owned:
            return 0, False
        reads, self._prefetched = self._prefetched or await self._read(), None
        chunks = [r.fresh for r in reads if r.fresh]
        count = sum(len(c.entries) for c in chunks)
        more = any(r.full for r in reads)
        backlog = chunks and more and not self.pending
        ahead = asyncio.ensure_future(self._read()) if backlog else None
        try:
            if chunks:
                await self._apply(conn, chunks, count)
            await self._acked()  # the previous batch's (acknowledges are in order)
            self._acking = asyncio.ensure_future(self._ack(reads))
            if ahead is not None:
                self._prefetched = await ahead
            else:
                await self._acked()
        finally:
            if ahead is not None and not ahead.done():
                ahead.cancel()
                await asyncio.gather(ahead, return_exceptions=True)
        return count, more

    async def _apply(self, conn: asyncpg.Connection, chunks: list[Chunk], count: int) -> None:
        oldest = min(c.first.ms for c in chunks)
        known = self.stats.oldest_unflushed_ms
        self.stats.oldest_unflushed_ms = oldest if known is None else min(known, oldest)
        try:
            new_offsets = await apply_batch(conn, chunks)
        except POISON_ERRORS as exc:  # a bad event: set it aside, apply the others
            log.warning("writer: batch refused (%r); screening it for bad events", exc)
            found: list[tuple[str, str, str]] = []
            new_offsets = await apply_batch(conn, chunks, screened(self.durable.raw_entry, found))
            self.stats.quarantined += len(found)
        for b in self.owned:
            self.offsets[b] = new_offsets.get(keys.events_key(b), self.offsets[b])
        self.stats.events_total += count
        self.stats.batches_total += 1
        self.stats.last_batch = count
        self.stats.batch_sizes.append(count)
        self.stats.oldest_unflushed_ms = None

    async def _read(self) -> list[_Read]:
        """One read of every owned bucket (``persist.durable_read``: what it returns
        is fsynced by Redis); a bucket not read this round is read from its pending
        list next round."""
        buckets = sorted(self.owned)
        counts = self._counts(buckets)
        done = await self.durable.read([StreamRead(b, keys.events_key(b), str(self.delivered[b]),
                                                   "0" if b in self.pending else ">", counts[b])
                                        for b in buckets])  # fmt: skip
        self.pending.update(done.skipped)
        self.stats.redis_errors += bool(done.errors)
        reads, missing = [], []
        for b in buckets:
            if b not in done.replies:
                continue
            head, reply = done.replies[b]
            if isinstance(reply, ResponseError) and "NOGROUP" in str(reply):
                missing.append(b)  # the stream was deleted (FLUSHALL): make the group again
                continue
            for r in (head, reply):
                if isinstance(r, Exception):
                    raise r
            reads.append(self._sort(b, head, entries_of(reply), counts[b]))
        if missing:
            await self._ensure_groups(missing)
            self.pending.update(missing)
        return reads

    def _counts(self, buckets: list[int]) -> dict[int, int]:
        """Entries to ask each bucket for, at most the batch in all: a small probe
        for buckets that were empty last time, an even share for the others, and
        what is left shared among the buckets that had more waiting (a flash sale
        on one SKU fills one stream)."""
        batch = self.settings.writer_batch
        base = max(1, batch // len(buckets))
        probe = min(base, PROBE)
        counts = {b: probe if b in self.idle else base for b in buckets}
        hot = [b for b in buckets if b in self.hot]
        if hot:
            left = batch - sum(counts[b] for b in buckets if b not in self.hot)
            share = max(base, left // len(hot))
            counts.update(dict.fromkeys(hot, share))
        return counts

    def _sort(self, bucket: int, head: list[Any], entries: list[Any], count: int) -> _Read:
        """Split a bucket's reply into fresh events and entries only to acknowledge."""
        key, offset = keys.events_key(bucket), self.offsets[bucket]
        try:
            live = [(entry_id, decode(fields)) for entry_id, fields in entries if fields]
        except Exception:  # a malformed entry: [] fails its COPY and is quarantined
            live = [(entry_id, _decoded(fields)) for entry_id, fields in entries if fields]
        if live and StreamId.parse(live[0][0]) <= offset:  # ids ascend: drop the known ones
            live = [(i, f) for i, f in live if StreamId.parse(i) > offset]
        fresh = (
            Chunk(key, StreamId.parse(live[0][0]), StreamId.parse(live[-1][0]), live)
            if live
            else None
        )
        full = len(entries) >= count
        self.hot.discard(bucket)
        self.idle.discard(bucket)
        if full:
            self.hot.add(bucket)
        elif not entries:
            self.idle.add(bucket)
        if bucket in self.pending:
            if not live and not full:
                self.pending.discard(bucket)  # pending list drained: read new entries next
        elif fresh and head and fresh.first != StreamId.parse(head[0][0]):
            # Another writer (that lost its lock) took the entries in between: they
            # are in the pending list, so read it again instead of skipping them.
            self.stats.gaps += 1
            log.warning("writer: gap in %s before %s; re-reading pending", key, fresh.first)
            self.pending.add(bucket)
            return _Read(bucket, False, None, True)
        if fresh:
            self.delivered[bucket] = max(self.delivered[bucket], fresh.last)
        more = full or bool(live and bucket in self.pending)
        return _Read(bucket, bool(entries), fresh, more)

    async def _acked(self) -> None:
        """Wait for the acknowledgement in flight, if any (its error is raised here)."""
        acking, self._acking = self._acking, None
        if acking is not None:
            await acking

    async def _ack(self, reads: list[_Read]) -> None:
        """Acknowledge (and trim) each bucket read up to its offset: ``lua/writer_ack.lua``,
        one call per bucket (its own slot on a cluster), run concurrently."""
        calls = []
        for r in reads:
            if r.acked:
                offset = self.offsets[r.bucket]
                trim = str(offset.next()) if r.fresh else ""
                calls.append(
                    self.scripts(
                        "writer_ack", [keys.events_key(r.bucket)], [GROUP, str(offset), trim]
                    )
                )
        await asyncio.gather(*calls)

    # -- the loop -----------------------------------------------------------

    async def run(self, stop: asyncio.Event, counters: LoopCounters | None = None) -> None:
        """Flush until ``stop`` is set. Any error of a round is logged and counted, the
        round's state dropped, and the writer backs off and goes on
        (``stock.loops.supervise.run_loop``); a graceful stop flushes what is waiting."""
        idle = self.settings.writer_interval_ms / 1000
        try:
            healthy = await run_loop(
                "writer", self._round, stop, idle_s=idle, recover=self._recover,
                counters=counters,
            )  # fmt: skip
            if healthy:
                await self._flush_on_stop()
        finally:
            await self.aclose()

    async def _round(self) -> bool:
        return (await self.step())[1]

    async def _recover(self, exc: BaseException) -> str:
        """Drop what the failed round left; name what is down. After anything but a
        Redis error the PostgreSQL connection is dropped too (its state is unknown)."""
        self._failed()
        if isinstance(exc, RedisError):
            self.stats.redis_errors += 1
            return "Redis"
        self.stats.pg_errors += 1
        await self._drop_connection()
        await self._peek_lag()
        return "PostgreSQL" if isinstance(exc, PG_ERRORS) else "unexpected"

    async def _flush_on_stop(self, budget_s: float = 5.0) -> None:
        """A graceful stop (SIGTERM) flushes what is waiting, within a budget; what is
        left stays in Redis for the next writer."""
        deadline = time.monotonic() + budget_s
        try:
            while time.monotonic() < deadline:
                pending_round = bool(self.pending) or not self.owned
                count, more = await self.step()
                if not count and not more and not pending_round:
                    break  # (a round of pending lists is followed by one of new events)
        except Exception as exc:  # the next writer takes it from the pending list
            log.warning("writer: final flush stopped: %s", exc)

    def _failed(self) -> None:
        self.pending.update(self.owned)  # whatever was read is still pending in Redis
        self.delivered.update({b: self.offsets[b] for b in self.owned})
        self._prefetched = None
        if self._acking is not None and self._acking.done():
            self._acking.exception()  # retrieved: raised once, in the step that failed
            self._acking = None

    async def _peek_lag(self) -> None:
        """While PostgreSQL is away: the oldest event after the known offsets, so
        that flush lag keeps growing during an outage."""
        offsets = {keys.events_key(b): str(offset) for b, offset in self.offsets.items()}
        with contextlib.suppress(RedisError):
            oldest = await self.durable.oldest_after(offsets)
            self.stats.oldest_unflushed_ms = oldest or self.stats.oldest_unflushed_ms

    async def _drop_connection(self) -> None:
        conn, self.conn = self.conn, None
        self.owned.clear()
        self.stats.owned_buckets = 0
        if conn is not None:
            conn.terminate()


def _decoded(fields: Any) -> list[str]:
    try:
        return decode(fields)
    except Exception:
        return []
