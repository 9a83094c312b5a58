"""The webhook dispatcher: sends the outbox's deliveries, at least once.

Each poll claims due rows in one statement (``FOR UPDATE SKIP LOCKED``, so
several dispatchers never claim the same row): a claimed row turns ``sending``
with a lease (``next_at`` = now + timeout + margin) and ``attempts`` + 1, which
also fences the outcome (a row claimed again after a lost lease is not
overwritten by the first claimer). The POST carries ``X-Stock-Event-Id`` and
``X-Stock-Signature: sha256=<HMAC-SHA256 of the body>``; a 2xx answer marks the
row delivered. Anything else retries after ``base * 2^(attempts-1)`` seconds (at
most 5 minutes), the last try at the end of the retry window (``webhook_retry_s``
from the row's ``enqueued_at``, the writer's insert, not the event's time), after
which the row is ``failed``. A dispatcher that dies mid-send leaves a ``sending`` row that
is claimed again when its lease ends, so it goes out again with the same id.

A slow receiver holds only its own rows: at most ``PER_SUBSCRIPTION`` requests
in flight per subscription, ``webhook_concurrency`` in all, each bounded by
``webhook_timeout_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import time
from dataclasses import dataclass
from datetime import UTC
from typing import Any

import aiohttp
import asyncpg
import orjson

from persist.webhooks import data
from stock.core.config import Settings
from stock.loops.supervise import Backoff

log = logging.getLogger("persist.dispatcher")

PER_SUBSCRIPTION = 4  # requests in flight per subscription
MAX_BACKOFF_S = 300.0
LEASE_MARGIN_S = 5.0  # beyond the request timeout, to record the outcome
CLEANUP_EVERY_S = 600.0
PG_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)

# $1 rows at most, $2 lease (s), $3 per subscription, ($4, $5) subscriptions' rows in flight
_CLAIM = """
WITH due AS (
    SELECT d.id FROM (SELECT id FROM webhook_subscriptions ORDER BY random()) AS s
    CROSS JOIN LATERAL (
        SELECT d.id FROM webhook_deliveries d
        WHERE d.subscription_id = s.id AND d.state IN ('pending', 'sending')
          AND d.next_at <= now()
          AND (d.type <> 'stock.changed' OR NOT EXISTS (
              SELECT 1 FROM webhook_throttle t WHERE t.subscription_id = d.subscription_id
                AND t.sku = d.sku AND t.not_before > now()))
        ORDER BY d.next_at, d.id
        LIMIT greatest(0, $3 - coalesce((SELECT u.n FROM unnest($4::uuid[], $5::int[])
                                         AS u(id, n) WHERE u.id = s.id), 0))
        FOR UPDATE OF d SKIP LOCKED
    ) AS d
    LIMIT $1
),
claimed AS (
    UPDATE webhook_deliveries d SET state = 'sending', attempts = d.attempts + 1,
        next_at = now() + make_interval(secs => $2)
    FROM due, webhook_subscriptions s
    WHERE d.id = due.id AND s.id = d.subscription_id
    RETURNING d.id, d.event_id, d.subscription_id, d.type, d.sku, d.order_id, d.available,
        d.reserved, d.sold, d.seq, d.created_at, d.attempts, d.next_at, s.url, s.secret,
        d.location
),
throttled AS (
    INSERT INTO webhook_throttle (subscription_id, sku, not_before)
    SELECT DISTINCT ON (subscription_id, sku) subscription_id, sku, next_at FROM claimed
    WHERE type = 'stock.changed'
    ON CONFLICT (subscription_id, sku) DO UPDATE SET not_before = excluded.not_before
)
SELECT * FROM claimed
"""
# $1 id, $2 attempts (the claim's), $3 delivered, $4 HTTP status, $5 error,
# $6 backoff base (s), $7 retry window (s), $8 longest backoff (s)
_OUTCOME = """
WITH done AS (
    UPDATE webhook_deliveries d SET
        state = CASE
            WHEN $3 THEN 'delivered'
            WHEN now() >= d.enqueued_at + make_interval(secs => $7) THEN 'failed'
            WHEN d.type = 'stock.changed' AND EXISTS (
                SELECT 1 FROM webhook_deliveries n WHERE n.subscription_id = d.subscription_id
                  AND n.sku = d.sku AND n.type = 'stock.changed' AND n.state = 'pending')
                THEN 'superseded'
            ELSE 'pending' END,
        delivered_at = CASE WHEN $3 THEN now() END,
        next_at = least(
            now() + make_interval(secs => least($6 * 2 ^ (d.attempts - 1), $8)),
            d.enqueued_at + make_interval(secs => $7)),
        last_status = $4, last_error = $5
    WHERE d.id = $1 AND d.state = 'sending' AND d.attempts = $2
    RETURNING d.state, d.subscription_id, d.sku, d.type
),
throttled AS (
    UPDATE webhook_throttle t SET not_before = now() + interval '1 second' FROM done
    WHERE done.type = 'stock.changed' AND t.subscription_id = done.subscription_id
      AND t.sku = done.sku
)
SELECT state FROM done
"""
# Old finished rows, rows the writer offered while their subscription was being
# deleted, and throttle marks long past.
_CLEANUP = """
WITH marks AS (DELETE FROM webhook_throttle WHERE not_before < now() - interval '1 hour')
DELETE FROM webhook_deliveries d
WHERE (d.state IN ('delivered', 'superseded', 'failed')
       AND coalesce(d.delivered_at, d.next_at) < now() - make_interval(secs => $1))
   OR (d.state = 'pending'
       AND NOT EXISTS (SELECT 1 FROM webhook_subscriptions s WHERE s.id = d.subscription_id))
"""


@dataclass
class DispatchStats:
    delivered: int = 0
    retried: int = 0  # attempts that failed and will be tried again
    failed: int = 0  # deliveries given up at the end of the retry window
    in_flight: int = 0


def signature(secret: str, body: bytes) -> str:
    """The ``X-Stock-Signature`` header of ``body``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def payload(row: Any) -> bytes:
    """The JSON body of one delivery: {"id", "type", "created_at", "data"}."""
    at = row["created_at"].astimezone(UTC)
    created = at.strftime("%Y-%m-%dT%H:%M:%S.") + f"{at.microsecond // 1000:03d}Z"
    return orjson.dumps(
        {
            "id": str(row["event_id"]),
            "type": row["type"],
            "created_at": created,
            "data": data(row),
        }
    )


class Dispatcher:
    """Outbox -> receivers. ``run`` loops until stopped; ``poll`` is one claim."""

    def __init__(
        self,
        settings: Settings,
        dsn: str,
        poll_s: float = 0.2,
        pool: asyncpg.Pool | None = None,
    ) -> None:
        self.settings = settings
        self.dsn = dsn
        self.poll_s = poll_s
        self.stats = DispatchStats()
        self.pool = pool  # the process's pool (stock serve), else one of its own
        self._own_pool = pool is None
        self.session: aiohttp.ClientSession | None = None
        self.in_flight: dict[Any, int] = {}  # subscription id -> requests in flight
        self.tasks: set[asyncio.Task[None]] = set()
        self._freed = asyncio.Event()
        self._next_cleanup = 0.0

    async def start(self) -> None:
        if self.session is None:
            connector = aiohttp.TCPConnector(limit=self.settings.webhook_concurrency)
            self.session = aiohttp.ClientSession(connector=connector)
        if self.pool is None:
            self.pool = await asyncpg.create_pool(self.dsn, min_size=1, max_size=4, timeout=10)

    async def aclose(self, grace_s: float = 5.0) -> None:
        """Let the requests in flight finish (within ``grace_s``), then close. A request
        cut short stays ``sending`` and goes again when its lease ends."""
        if self.tasks:
            _done, pending = await asyncio.wait(self.tasks, timeout=grace_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self.session is not None:
            await self.session.close()
            self.session = None
        if self.pool is not None and self._own_pool:
            await self.pool.close()
            self.pool = None

    async def poll(self) -> bool:
        """Claim what is due (as many as there are free slots) and start sending it;
        returns whether it filled every free slot (more may be due)."""
        await self.start()
        assert self.pool is not None
        free = self.settings.webhook_concurrency - self.stats.in_flight
        if free <= 0:
            return False
        busy = [(sub, n) for sub, n in self.in_flight.items() if n > 0]
        lease = self.settings.webhook_timeout_s + LEASE_MARGIN_S
        per_sub = min(PER_SUBSCRIPTION, self.settings.webhook_concurrency)
        rows = await self.pool.fetch(
            _CLAIM, free, lease, per_sub, [s for s, _ in busy], [n for _, n in busy]
        )
        for row in rows:
            sub = row["subscription_id"]
            self.in_flight[sub] = self.in_flight.get(sub, 0) + 1
            self.stats.in_flight += 1
            task = asyncio.create_task(self._deliver(row))
            self.tasks.add(task)
            task.add_done_callback(self._done)
        if time.monotonic() >= self._next_cleanup:
            self._next_cleanup = time.monotonic() + CLEANUP_EVERY_S
            await self.pool.execute(_CLEANUP, float(self.settings.retention_s))
        return len(rows) >= free

    def _done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        self._freed.set()
        if not task.cancelled() and task.exception() is not None:
            log.warning("webhooks: delivery task failed: %r", task.exception())

    async def _deliver(self, row: Any) -> None:
        sub = row["subscription_id"]
        try:
            status, error = await self._post(row)
            await self._record(row, status, error)
        finally:
            self.in_flight[sub] -= 1
            if not self.in_flight[sub]:
                del self.in_flight[sub]
            self.stats.in_flight -= 1

    async def _post(self, row: Any) -> tuple[int | None, str | None]:
        """POST one delivery; (HTTP status, error text)."""
        assert self.session is not None
        body = payload(row)
        headers = {
            "Content-Type": "application/json",
            "X-Stock-Event-Id": str(row["event_id"]),
            "X-Stock-Signature": signature(row["secret"], body),
        }
        timeout = aiohttp.ClientTimeout(total=self.settings.webhook_timeout_s)
        try:
            async with self.session.post(
                row["url"], data=body, headers=headers, timeout=timeout, allow_redirects=False
            ) as response:
                return response.status, None if response.status < 300 else response.reason
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            return None, f"{type(exc).__name__}: {exc}"[:500]

    async def _record(self, row: Any, status: int | None, error: str | None) -> None:
        assert self.pool is not None
        ok = status is not None and 200 <= status < 300
        args = (
            row["id"],
            row["attempts"],
            ok,
            status,
            error,
            self.settings.webhook_retry_base_s,
            float(self.settings.webhook_retry_s),
            MAX_BACKOFF_S,
        )
        for _ in range(3):  # a stock.changed put back may meet a newer one being offered
            try:
                state = await self.pool.fetchval(_OUTCOME, *args)
                break
            except asyncpg.UniqueViolationError:
                await asyncio.sleep(0.01)
        else:
            return  # stays sending; claimed again when its lease ends
        if state == "delivered":
            self.stats.delivered += 1
        elif state == "failed":
            self.stats.failed += 1
            log.warning(
                "webhooks: delivery %s to %s failed for good: %s",
                row["event_id"],
                row["url"],
                error or status,
            )
        elif state is not None:
            self.stats.retried += 1

    async def run(self, stop: asyncio.Event) -> None:
        """Dispatch until ``stop`` is set; back off with jitter while PostgreSQL is away."""
        failing = False
        backoff = Backoff(self.poll_s)
        try:
            while not stop.is_set():
                self._freed.clear()
                delay = self.poll_s
                try:
                    full = await self.poll()
                    if failing:
                        log.info("webhooks: PostgreSQL is back, dispatching")
                        failing = False
                        backoff.reset()
                    if full and self.stats.in_flight < self.settings.webhook_concurrency:
                        continue  # more may be due
                except PG_ERRORS as exc:
                    if not failing:
                        log.warning("webhooks: PostgreSQL error, backing off: %s", exc)
                    failing = True
                    delay = backoff.delay()
                await _wait_any(stop, self._freed, delay)
        finally:
            await self.aclose()


async def _wait_any(stop: asyncio.Event, freed: asyncio.Event, seconds: float) -> None:
    waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(freed.wait())]
    try:
        await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*waits, return_exceptions=True)
