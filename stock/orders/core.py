"""The parts every order path shares: the client, the scripts, the order record.

``OrderCore`` is what the engine and both backends (``stock/orders/standalone.py``,
``stock/orders/cluster.py``) hold: the Redis client and its scripts, the settings,
the in-flight bound of a cluster, and the few calls they all make (read an order's
record, call a script on one bucket group). Neither backend reaches into the engine.
"""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict
from collections.abc import Awaitable, Sequence
from typing import Any, TypeVar

from stock.core import formats, keys, validate
from stock.core.config import Settings
from stock.core.errors import NotFound, OrderClosed
from stock.core.validate import Item
from stock.redis.line_layout import LineCall, line_call
from stock.redis.scripts import LinesReply, Scripts, parse_lines

T = TypeVar("T")


class InFlight(asyncio.Semaphore):
    """The cluster's bound on operations in flight: an ``asyncio.Semaphore`` whose
    uncontended ``async with`` takes a slot at once (Python 3.11's ``acquire``
    first scans the waiters with a generator, on every order)."""

    async def __aenter__(self) -> None:
        if self._value > 0 and not self._waiters:
            self._value -= 1
            return
        await self.acquire()

    async def __aexit__(self, *exc: object) -> None:
        if self._waiters:
            self.release()
        else:
            self._value += 1


class OrderCore:
    """The client, scripts and settings of one engine, and the calls its paths share."""

    def __init__(self, client: Any, settings: Settings) -> None:
        self.redis = client
        self.settings = settings
        self.cluster = settings.redis_cluster
        self.scripts = Scripts(client)
        self.retention_ms = settings.retention_s * 1000
        self.deduct_hold_ms = 10_000  # a cluster deduct's holds, until it is confirmed
        # redis-py's cluster pools fail instead of waiting when they run dry: bound
        # the operations in flight so a stampede queues here. (Standalone calls
        # share an auto-pipeline and a blocking pool, which queue by themselves.)
        self.inflight = InFlight(settings.redis_max_connections) if self.cluster else None

    async def outside(self, waiting: Awaitable[T]) -> T:
        """Await ``waiting`` without holding an in-flight slot (the caller holds one on
        a cluster): a wait must not keep other operations out."""
        if self.inflight is None:
            return await waiting
        self.inflight.release()
        try:
            return await waiting
        finally:
            await asyncio.shield(self.inflight.acquire())

    @staticmethod
    def token() -> str:
        """An attempt's token on a cluster (the tag of its lines): 48 random bits, as
        ``secrets.token_hex(6)`` but without a system call per order. The tokens
        only tell attempts apart, they guard nothing: ``random`` (seeded from the
        OS, seeded again in a forked child) is enough."""
        return f"{random.getrandbits(48):012x}"

    async def pause(self, seconds: float) -> None:
        await self.outside(asyncio.sleep(seconds))

    async def record(self, order_id: str, lifetime_ms: int = 0) -> tuple[str, str, list[Item]]:
        """The order's kind, phase and items. On a cluster with ``lifetime_ms`` (a
        transition) the directory's lifetime is extended to it in the same call."""
        validate.order_id(order_id)
        okey = keys.order_key(order_id)
        if self.cluster and lifetime_ms:
            found = await self.scripts("order", [okey], ["read", lifetime_ms])
            raw = found[0] if found else None
        elif self.scripts.pipeline is not None:  # ride the (per-node) auto-pipeline
            raw = await self.scripts.pipeline.execute("GET", okey)
        else:
            raw = await self.redis.get(okey)
        if raw is None:
            raise NotFound(f"unknown order {order_id!r}", order_id=order_id)
        record = formats.parse_record(raw)
        if record.phase in formats.TOMBSTONES:
            raise OrderClosed(f"order {order_id!r} was {record.phase}", state=record.phase)
        return record.kind, record.phase, formats.parse_spec(record.spec)

    async def get(self, key: str) -> str | None:
        """GET through the (per-node) auto-pipeline: on a cluster, an ASK is followed
        there on one connection (redis-py's own path can end in "TTL exhausted")."""
        pipe = self.scripts.pipeline
        raw = await (pipe.execute("GET", key) if pipe is not None else self.redis.get(key))
        return None if raw is None else str(raw)

    async def hgetall(self, key: str) -> dict[str, str]:
        """HGETALL through the (per-node) auto-pipeline: on a cluster a lost node fails
        only this call (redis-py's own path would close every connection of the
        client, under the API's calls in flight on the healthy nodes)."""
        pipe = self.scripts.pipeline
        if pipe is None:
            return {str(k): str(v) for k, v in (await self.redis.hgetall(key)).items()}
        flat = await pipe.execute("HGETALL", key)
        if isinstance(flat, dict):
            return {str(k): str(v) for k, v in flat.items()}
        return {str(flat[i]): str(flat[i + 1]) for i in range(0, len(flat), 2)}

    async def exists(self, key: str) -> bool:
        """EXISTS through the (per-node) auto-pipeline (see ``hgetall``)."""
        pipe = self.scripts.pipeline
        return bool(
            await (pipe.execute("EXISTS", key) if pipe is not None else self.redis.exists(key))
        )

    async def hmget(self, key: str, *fields: str) -> list[str | None]:
        """HMGET, through the (per-node) auto-pipeline."""
        if self.scripts.pipeline is not None:
            return list(await self.scripts.pipeline.execute("HMGET", key, *fields))
        return list(await self.redis.hmget(key, *fields))

    async def group_call(self, op: str, call: LineCall) -> LinesReply:
        """Script ``op`` on one bucket group on a cluster (``group_calls``)."""
        (outcome,) = await self.group_calls(op, [call])
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    async def group_calls(
        self, op: str, calls: Sequence[LineCall]
    ) -> list[LinesReply | BaseException]:
        """Script ``op`` for each call (one bucket group each, ``call.items``; by
        default the call carries the bucket's copy of the order) at once on a
        cluster: each group's reply or its error, in order, as
        ``asyncio.gather(..., return_exceptions=True)`` but with no task per group:
        on a cluster each call is sent when it is made (``Scripts``), so awaiting
        them one by one waits for the slowest only. (Only the rare redirections and
        retries of a call, ``ClusterBatch.follow``, wait their turn behind the
        groups before it.)"""
        buckets, retention_ms = self.settings.buckets, self.retention_ms
        encoded = [line_call(c, buckets=buckets, retention_ms=retention_ms) for c in calls]
        sent = [self.scripts(op, keys_, args) for keys_, args in encoded]  # all at once
        outcomes: list[LinesReply | BaseException] = []
        for i, call in enumerate(sent):
            try:
                outcomes.append(parse_lines(await call, calls[i].order_id))
            except asyncio.CancelledError:
                for unread in sent[i + 1 :]:
                    close = getattr(unread, "close", None)
                    if close is not None:
                        close()  # the reply is nobody's
                raise
            except Exception as exc:  # a refusal (StockError), or the call failed
                outcomes.append(exc)
        return outcomes

    def groups(self, items: Sequence[Item]) -> list[list[Item]]:
        if len(items) == 1:  # most orders
            return [[items[0]]]
        by_bucket: dict[int, list[Item]] = defaultdict(list)
        for item in items:
            by_bucket[keys.bucket_of(item.sku, self.settings.buckets)].append(item)
        return list(by_bucket.values())
