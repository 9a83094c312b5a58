"""What an API process runs besides its handlers, opened and closed with the app.

``running`` is the one owner of the process's background loops and pool. It opens
the Redis client and the engine and the process's one PostgreSQL pool
(``stock/app/database.py``), and starts every loop under the same supervisor
(``stock/loops/supervise.py``: restarted if it ends, counted in
``stock_loop_restarts``): the reaper (whose passes run the payment probes), the
writer, the webhook dispatcher and the console's gauges; it registers the metrics
that mirror them. On the way out it stops the loops (cancelling one stuck in a
pass after ``LOOP_STOP_S``) and closes everything it opened, the pool last.
``stock/app/wiring.py`` enters it from the app's ``cleanup_ctx``;
``stock/app/serve.py`` runs the app.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Counter

from stock.app.console import GAUGE_PERIOD_S, Gauges
from stock.app.database import Database
from stock.core.config import Settings
from stock.http.metrics import Metrics
from stock.loops.payment_probe import PaymentProbe
from stock.loops.reaper import Reaper, expiry_lag_s
from stock.loops.soldout import SoldOut
from stock.loops.supervise import run_loop, supervise
from stock.orders.core import OrderCore
from stock.orders.engine import StockEngine
from stock.orders.sharded import ShardedSkus
from stock.redis.client import connect

log = logging.getLogger("stock.app.lifecycle")

LOOP_STOP_S = 15  # how long the loops get to stop (the writer flushes)


@dataclass(eq=False)
class Background:
    """The parts one API process opened: the engine and what runs beside it."""

    engine: StockEngine
    reaper: Reaper | None = None
    database: Database | None = None
    writer: Any = None  # persist.writer.Writer, with STOCK_DATABASE_URL
    dispatcher: Any = None  # persist.dispatcher.Dispatcher, beside the writer
    payment_probe: PaymentProbe | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def named(self) -> dict[str, Any]:
        """The parts that run, by name (``reaper``, ``writer``, ...)."""
        parts = {
            "reaper": self.reaper,
            "writer": self.writer,
            "webhooks": self.dispatcher,
            "payment_probe": self.payment_probe,
        }
        return {name: part for name, part in parts.items() if part is not None}


@asynccontextmanager
async def running(
    settings: Settings,
    metrics: Metrics,
    soldout: SoldOut | None,
    database: Database,
    *,
    run_reaper: bool,
    run_writer: bool,
    webhook_counters: dict[str, Counter] | None = None,
) -> AsyncIterator[Background]:
    """The engine, the pool, and the loops running, until the block ends. The
    writer and the dispatcher run with ``run_writer`` and a database."""
    client = connect(settings)
    parts = Background(StockEngine(client, settings), database=database)
    parts.engine.retry.on_retry = metrics.redis_errors.inc
    # On a cluster the reaper and the writer get their own client: when a node is
    # lost, redis-py's cluster pipelines (the reaper's and writer's rounds over every
    # bucket) close *every* connection of their client before retrying, which would
    # fail the API's calls in flight on the healthy nodes.
    other = connect(settings) if settings.redis_cluster else client
    stop = asyncio.Event()
    try:
        await database.open()
        gauges = Gauges(metrics, parts.engine).step
        _supervised(parts, "console-gauges", gauges, GAUGE_PERIOD_S, stop, metrics)
        if run_reaper:
            _start_reaper(parts, other if other is not client else None, metrics, soldout, stop)
        if run_writer and database.pool is not None:
            _start_writer(parts, other, settings, metrics, stop)
            _start_dispatcher(parts, settings, metrics, stop, webhook_counters or {})
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
    if parts.database is not None:
        await parts.database.close()


def _supervised(
    parts: Background,
    name: str,
    step: Callable[[], Awaitable[bool]],
    idle_s: float,
    stop: asyncio.Event,
    metrics: Metrics,
) -> None:
    """``step`` as a pass loop (``run_loop``: errors counted, ``idle_s`` between
    passes) under the supervisor."""
    loop = functools.partial(run_loop, name, step, stop, idle_s=idle_s, counters=metrics)
    _task(parts, name, loop, stop, metrics)


def _task(
    parts: Background,
    name: str,
    loop: Callable[[], Awaitable[object]],
    stop: asyncio.Event,
    metrics: Metrics,
) -> None:
    """``loop`` under the supervisor (restarted if it ends, counted), as a task."""
    task = asyncio.create_task(supervise(name, loop, stop, counters=metrics), name=name)
    parts.tasks.append(task)


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
    _task(parts, "reaper", functools.partial(reaper.run, stop, metrics), stop, metrics)
    # the sharded SKUs' rebalancer (DESIGN §12) runs where the reaper does, and on a
    # cluster on the reaper's own client: redis-py's own path (TIME, HSET) closes
    # every connection of its client when a node is lost, which must not be the API's
    rebalancer = ShardedSkus(OrderCore(own_client, settings)) if own_client else engine.sharded
    _task(parts, "rebalancer", functools.partial(rebalancer.run, stop), stop, metrics)


def _start_writer(
    parts: Background, client: Any, settings: Settings, metrics: Metrics, stop: asyncio.Event
) -> None:
    from persist.writer import Writer

    assert parts.database is not None
    pool = parts.database.pool
    writer = parts.writer = Writer(client, settings, settings.database_url, pool=pool)
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
    _task(parts, "writer", functools.partial(writer.run, stop, metrics), stop, metrics)


def _start_dispatcher(
    parts: Background,
    settings: Settings,
    metrics: Metrics,
    stop: asyncio.Event,
    counters: dict[str, Counter],
) -> None:
    """The webhook dispatcher, on the process's pool; its counts mirrored in
    ``counters`` (``delivered``, ``failed``) at each scrape."""
    from persist.dispatcher import Dispatcher

    assert parts.database is not None
    pool = parts.database.pool
    dispatcher = parts.dispatcher = Dispatcher(settings, settings.database_url, pool=pool)
    counted = dict.fromkeys(counters, 0)

    def refresh() -> None:
        for name, counter in counters.items():
            now = getattr(dispatcher.stats, name)
            counter.inc(max(0, now - counted[name]))
            counted[name] = max(counted[name], now)

    metrics.on_scrape(refresh)
    _task(parts, "webhooks", functools.partial(dispatcher.run, stop), stop, metrics)


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
