"""Operational figures for the console's health panel and the dashboards.

The health figures are read from the shared state (Redis and PostgreSQL), not
from this process's own reaper or writer: with ``stock serve --workers N`` any
worker answers the health route, and it must answer for all of them.

- expiry lag: the age of the oldest due entry over every bucket's expiry index;
- flush lag: the age of the oldest stream entry after the offset PostgreSQL
  recorded, over every bucket;
- writer buckets held: the writers' advisory locks in ``pg_locks``;
- the last reconcile: a small JSON record ``stock reconcile`` leaves in Redis
  (``keys.reconcile_key``);
- payment-probe outcomes: the ``stock_payment_probe`` counter (of every worker
  in multiprocess mode), where the probe runs.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson
from redis.exceptions import RedisError

from stock.core import keys
from stock.core.config import Settings
from stock.redis.client import typed

RECONCILE_DRIFTS_KEPT = 50  # drift lines kept in the record (the count is always whole)
WRITER_LOCK = 0x5704  # persist.writer.WRITER_LOCK (first key of its advisory locks)
PAYMENT_PROBE = "stock_payment_probe"  # a counter with an ``outcome`` label

_HELD = """
SELECT count(DISTINCT objid) AS held, count(DISTINCT pid) AS writers FROM pg_locks
WHERE locktype = 'advisory' AND granted AND classid = $1 AND objsubid = 2
  AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
"""


def iso_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


async def record_reconcile(
    client: Any, checked: int, drifts: list[str], whole: bool, ms: int | None = None
) -> dict[str, Any]:
    """Leave the outcome of one reconcile where the service can read it."""
    record = {
        "at": iso_now(),
        "at_ms": int(time.time() * 1000) if ms is None else ms,
        "checked": checked,
        "drifting": len(drifts),
        "drifts": drifts[:RECONCILE_DRIFTS_KEPT],
        "whole": whole,  # every SKU, or only the ones named on the command line
    }
    await client.set(keys.reconcile_key(), orjson.dumps(record))
    return record


async def last_reconcile(client: Any) -> dict[str, Any] | None:
    raw = await client.get(keys.reconcile_key())
    if raw is None:
        return None
    try:
        record = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


async def server_ms(client: Any) -> int:
    seconds, micros = await client.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def expiry_lag_s(client: Any, settings: Settings, now_ms: int) -> float:
    """Age of the oldest due, unexpired line over every bucket (0 when none is due)."""
    pipe = client.pipeline(transaction=False)
    for bucket in range(settings.buckets):
        pipe.zrange(keys.due_key(bucket), 0, 0, withscores=True)
    heads = await pipe.execute()
    oldest = min((head[0][1] for head in heads if head), default=now_ms)
    return max(0.0, (now_ms - oldest) / 1000)


async def flush_lag_s(client: Any, settings: Settings, conn: Any, now_ms: int) -> float:
    """Age of the oldest event not yet recorded in PostgreSQL, over every bucket."""
    from persist.events import read_offsets

    streams = keys.all_events_keys(settings.buckets)
    offsets = await read_offsets(conn, streams)
    pipe = client.pipeline(transaction=False)
    for stream in streams:
        pipe.xrange(stream, min=f"({offsets[stream]}", max="+", count=1)
    heads = await pipe.execute()
    oldest = [int(str(head[0][0]).partition("-")[0]) for head in heads if head]
    return max(0.0, (now_ms - min(oldest)) / 1000) if oldest else 0.0


async def writer_buckets(conn: Any, settings: Settings) -> dict[str, int]:
    row = await conn.fetchrow(_HELD, WRITER_LOCK)
    return {"buckets": settings.buckets, "held": row["held"], "writers": row["writers"]}


def payment_probe(registry: Any) -> dict[str, float] | None:
    """Outcome -> count of the payment probe's counter, when this build has one."""
    for metric in registry.collect():
        if metric.name == PAYMENT_PROBE:
            return {
                s.labels.get("outcome", ""): s.value
                for s in metric.samples
                if s.name.endswith("_total")
            }
    return None


def _error(exc: BaseException) -> str:
    return f"error: {exc or type(exc).__name__}"


async def health(client: Any, settings: Settings, pool: Any, registry: Any) -> dict[str, Any]:
    """The pipeline's health as one JSON object; a failing part is reported, not raised."""
    body: dict[str, Any] = {
        "redis": "ok",
        "postgres": "not configured",
        "expiry_lag_s": None,
        "flush_lag_s": None,
        "writer": None,
        "reconcile": None,
        "payment_probe": payment_probe(registry),
        "buckets": settings.buckets,
    }
    now_ms = 0
    try:  # (typed: a failure inside redis-py is a RedisError too)
        now_ms = await typed(server_ms(client), "health")
        body["expiry_lag_s"] = await typed(expiry_lag_s(client, settings, now_ms), "health")
        body["reconcile"] = await typed(last_reconcile(client), "health")
    except (RedisError, OSError) as exc:
        body["redis"] = _error(exc)
    if pool is None:
        return body
    try:
        async with pool.acquire(timeout=2) as conn:
            body["writer"] = await writer_buckets(conn, settings)
            if now_ms:
                lag = flush_lag_s(client, settings, conn, now_ms)
                body["flush_lag_s"] = await typed(lag, "health")
        body["postgres"] = "ok"
    except RedisError as exc:
        body["redis"] = _error(exc)
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
        body["postgres"] = _error(exc)
    return body
