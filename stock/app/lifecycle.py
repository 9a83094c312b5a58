"""What an API process runs besides its handlers, opened and closed with the app.

``running`` opens the Redis client and the engine, starts the reaper and the
writer as supervised loops (``stock/loops/supervise.py``), opens the readiness pool
that ``/readyz`` checks PostgreSQL over, and registers the metrics that mirror
them; on the way out it stops the loops (cancelling one stuck in a pass after
``LOOP_STOP_S``) and closes everything it opened. ``stock/http/api.py`` enters it
from the app's ``cleanup_ctx``; ``stock/app/serve.py`` runs the app.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from stock.core.config import Settings
from stock.http.metrics import Metrics
from stock.loops.payment_probe import PaymentProbe
from stock.loops.reaper import Reaper, expiry_lag_s
from stock.loops.soldout import SoldOut
from stock.loops.supervise import supervise
from stock.orders.engine import StockEngine
from stock.redis.client import connect

log = logging.getLogger("stock.app.lifecycle")

LOOP_STOP_S = 15  # how long the reaper and the writer get to stop (the writer flushes)


@dataclass(eq=False)
class Background:
    """The parts one API process opened: the engine and what runs beside it."""

    engine: StockEngine
    reaper: Reaper | None = None
    writer: Any = None  # persist.writer.Writer, with STOCK_DATABASE_URL
    readiness_pool: Any = None  # an asyncpg pool of one connection, with the writer
    payment_probe: PaymentProbe | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def named(self) -> dict[str, Any]:
        """The parts that run, by name (``reaper``, ``writer``, ...)."""
        parts = {
            "reaper": self.reaper,
            "writer": self.writer,
            "readiness_pool": self.readiness_pool,
            "payment_probe": self.payment_probe,
        }
        return {name: part for name, part in parts.items() if part is not None}


@asynccontextmanager
async def running(
    settings: Settings,
    metrics: Metrics,
    soldout: SoldOut | None,
    *,
    run_reaper: bool,
    run_writer: bool,
) -> AsyncIterator[Background]:
    """The engine, and the reaper and the writer running, until the block ends."""
    client = connect(settings)
    parts = Background(StockEngine(client, settings))
    parts.engine.retry.on_retry = metrics.redis_errors.inc
    # On a cluster the reaper and the writer get their own client: when a node is
    # lost, redis-py's cluster pipelines (the reaper's and writer's rounds over every
    # bucket) close *every* connection of their client before retrying, which would
    # fail the API's calls in flight on the healthy nodes.
    other = connect(settings) if settings.redis_cluster else client
    stop = asyncio.Event()
    try:
        if run_reaper:
            _start_reaper(parts, other if other is not client else None, metrics, soldout, stop)
        if run_writer and settings.database_url:
            await _start_writer(parts, other, settings, metrics, stop)
        yield parts
    finally:
        stop.set()
        await _stop(parts)
        if other is not client:
            await other.aclose()
        await client.aclose()


async def _stop(parts: Background) -> None:
    """Wait for the loops (a loop stuck in a pass, a call that never returns, is
    cancelled after LOOP_STOP_S), then close what they used."""
    if parts.tasks:
        _done, stuck = await asyncio.wait(parts.tasks, timeout=LOOP_STOP_S)
        for task in stuck:
            log.warning("%s did not stop within %d s; cancelling it", task.get_name(), LOOP_STOP_S)
            task.cancel()
        await asyncio.gather(*parts.tasks, return_exceptions=True)
    if parts.payment_probe is not None:
        await parts.payment_probe.aclose()
    if parts.readiness_pool is not None:
        await parts.readiness_pool.close()


def _start_reaper(
    parts: Background,
    own_client: Any,
    metrics: Metrics,
    soldout: SoldOut | None,
    stop: asyncio.Event,
) -> None:
    """The reaper, on the engine's client and scripts unless it has ``own_client``."""
    engine, settings = parts.engine, parts.engine.settings
    if settings.payment_status_url:
        parts.payment_probe = PaymentProbe(engine, settings, metrics.registry)
    if own_client is None:
        reaper = Reaper(engine.redis, settings, engine.scripts, parts.payment_probe)
    else:
        reaper = Reaper(own_client, settings, None, parts.payment_probe)
    if soldout is not None:
        reaper.on_return = soldout.back  # its expiries give stock back
    parts.reaper = reaper

    def refresh() -> None:
        metrics.expired.set(reaper.stats.expired_total)
        metrics.reaper_batch.set(reaper.stats.last_batch)

    metrics.on_scrape(refresh)
    loop = functools.partial(reaper.run, stop, metrics)
    task = asyncio.create_task(supervise("reaper", loop, stop, counters=metrics), name="reaper")
    parts.tasks.append(task)


async def _start_writer(
    parts: Background, client: Any, settings: Settings, metrics: Metrics, stop: asyncio.Event
) -> None:
    import asyncpg

    from persist.writer import Writer

    writer = parts.writer = Writer(client, settings, settings.database_url)
    # /readyz checks PostgreSQL over this one connection (opened at its first use; the
    # writer's own is busy with its transactions).
    parts.readiness_pool = await asyncpg.create_pool(
        settings.database_url,
        min_size=0,
        max_size=1,
        max_inactive_connection_lifetime=0,
        timeout=2,
    )
    counted = quarantined = 0

    def refresh() -> None:
        nonlocal counted, quarantined
        metrics.quarantined.inc(max(0, writer.stats.quarantined - quarantined))
        quarantined = max(quarantined, writer.stats.quarantined)
        metrics.flush_lag.set(writer.stats.flush_lag_s)
        metrics.writer_batch.set(writer.stats.last_batch)
        metrics.writer_events.set(writer.stats.events_total)
        metrics.writer_buckets.set(writer.stats.owned_buckets)
        metrics.buckets.set(settings.buckets)
        metrics.pg_errors.inc(max(0, writer.stats.pg_errors - counted))  # the writer's
        counted = max(counted, writer.stats.pg_errors)

    metrics.on_scrape(refresh)
    loop = functools.partial(writer.run, stop, metrics)
    task = asyncio.create_task(supervise("writer", loop, stop, counters=metrics), name="writer")
    parts.tasks.append(task)


async def measure_expiry_lag(reaper: Reaper, settings: Settings, metrics: Metrics) -> None:
    """The expiry lag as Redis has it now (not the reaper's last figure, which stops
    with the reaper), read on a scrape; when Redis does not answer the gauge keeps
    its last value and ``stock_redis_errors`` counts the miss."""
    try:
        lag = await asyncio.wait_for(
            expiry_lag_s(reaper.redis, settings.buckets), timeout=settings.redis_timeout_s
        )
    except Exception as exc:  # (a scrape answers whatever Redis's client raised)
        metrics.redis_errors.inc()
        log.warning("metrics: expiry lag not measured: %r", exc)
        return
    metrics.expiry_lag.set(lag)


async def postgres_check(pool: Any) -> str:
    """SELECT 1 on the process's readiness pool (one connection, kept open: opened
    again only after it broke, never once per request): ``ok`` or the error."""
    import asyncpg

    try:
        async with asyncio.timeout(2):
            await pool.fetchval("SELECT 1")
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
        return f"error: {exc or type(exc).__name__}"
    return "ok"
