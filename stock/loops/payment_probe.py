"""Payment-aware expiry (DESIGN §9): ask the payment service before expiring.

With ``STOCK_PAYMENT_STATUS_URL`` set, the reaper does not expire a due
reservation blindly. It claims the due line (``defer.lua`` pushes its expiry
index entry ahead, so no other reaper asks at the same time and the line comes
due again for the next try) and hands the order to ``PaymentProbe``, which
asks ``GET <url>`` in the background and acts on the answer:

- ``paid``: confirm the order (ledger reason ``payment-probe``);
- ``unpaid`` or 404: expire its lines now (reason ``payment-unpaid``);
- ``pending``, a timeout, a 5xx, a refused connection: keep holding; the line
  comes due again after a backoff (first retry within 2 s, then doubling with
  the time since expiry, at most 30 s apart);
- a line more than ``STOCK_PAYMENT_GRACE_S`` past its expiry is expired
  without asking (reason ``payment-grace-exhausted``).

Probes run as tasks bounded by a semaphore, never inside the reaper's pass,
so a hanging payment service delays only its own orders.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson
from prometheus_client import CollectorRegistry, Counter, Histogram

from stock.core import keys
from stock.core.config import Settings
from stock.core.errors import StockError, StoreUnavailable

log = logging.getLogger("stock.payments")

CONCURRENCY = 256  # probes in flight per process (a hanging one holds a slot until its timeout)
FIRST_RETRY_MS = 1_000  # defer.lua: half the time overdue, within these bounds
MAX_RETRY_MS = 30_000

# (bucket, members, reason) -> lines expired; the reaper's expire.lua call
ExpireLines = Callable[[int, list[str], str], Awaitable[int]]


def status_url(template: str, order_id: str) -> str:
    """The template with ``{order_id}`` percent-encoded, ``/`` included."""
    return template.replace("{order_id}", quote(order_id, safe=""))


class PaymentProbe:
    def __init__(
        self, engine: Any, settings: Settings, registry: CollectorRegistry | None = None
    ) -> None:
        self.engine = engine
        self.template = settings.payment_status_url
        self.timeout = aiohttp.ClientTimeout(total=settings.payment_probe_timeout_ms / 1000)
        self.grace_ms = settings.payment_grace_s * 1000
        self._slots = asyncio.Semaphore(CONCURRENCY)
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._claimed: dict[str, dict[int, list[str]]] = {}  # order -> bucket -> members
        self._session: aiohttp.ClientSession | None = None
        self.outcomes = Counter(
            "stock_payment_probe", "Payment probes by outcome", ["outcome"], registry=registry
        )
        self.latency = Histogram(
            "stock_payment_probe_seconds", "Payment probe latency", registry=registry
        )

    async def handle_due(
        self, bucket: int, now_ms: int, claimed: list[tuple[str, int]], expire: ExpireLines
    ) -> int:
        """The reaper's claimed lines of one bucket (member, expires_ms): expire those
        past the grace now, start a probe for each other order not already asked.
        Returns the lines expired here."""
        exhausted = [m for m, exp in claimed if now_ms - exp >= self.grace_ms]
        expired = 0
        if exhausted:
            expired = await expire(bucket, exhausted, "payment-grace-exhausted")
            self.outcomes.labels("grace_exhausted").inc(len(exhausted))
        for member, exp in claimed:
            if now_ms - exp < self.grace_ms:
                order_id = keys.split_member(member)[1]
                self._claimed.setdefault(order_id, {}).setdefault(bucket, []).append(member)
                if order_id not in self._inflight:
                    task = asyncio.create_task(self._probe(order_id, expire), name=order_id)
                    self._inflight[order_id] = task
                    task.add_done_callback(self._forget)
        return expired

    def _forget(self, task: asyncio.Task[None]) -> None:
        self._inflight.pop(task.get_name(), None)
        self._claimed.pop(task.get_name(), None)

    async def ask(self, order_id: str) -> str:
        """``paid``, ``pending``, ``unpaid`` or ``error`` (timeout, 5xx, refused)."""
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=self.timeout, connector=aiohttp.TCPConnector(limit=CONCURRENCY)
            )
        started = time.monotonic()
        try:
            async with self._session.get(status_url(self.template, order_id)) as response:
                if response.status == 404:
                    return "unpaid"
                if response.status != 200:
                    return "error"
                status = orjson.loads(await response.read()).get("status")
                return status if status in ("paid", "pending", "unpaid") else "error"
        except (aiohttp.ClientError, TimeoutError, ValueError, AttributeError) as exc:
            log.debug("payment probe of %r failed: %r", order_id, exc)
            return "error"
        finally:
            self.latency.observe(time.monotonic() - started)

    async def _probe(self, order_id: str, expire: ExpireLines) -> None:
        async with self._slots:
            outcome = await self.ask(order_id)
        self.outcomes.labels(outcome).inc()
        try:
            if outcome == "paid":
                await self.engine.confirm(order_id, reason="payment-probe")
            elif outcome == "unpaid":
                await self._expire_order(order_id, expire)
        except StoreUnavailable:  # Redis away: the line stays claimed and comes due again
            log.exception("payment probe of %r: acting on %s failed", order_id, outcome)
        except StockError as exc:  # released or confirmed meanwhile: nothing to decide
            log.info("payment probe of %r: %s answered %s", order_id, outcome, exc.code)
        except Exception:  # the line stays claimed and comes due again: log, go on
            log.exception("payment probe of %r: acting on %s failed", order_id, outcome)

    async def _expire_order(self, order_id: str, expire: ExpireLines) -> None:
        """Expire the order's lines the reapers claimed while it was asked (a line of
        another bucket claimed later is asked about again, and expired then)."""
        claimed = self._claimed.get(order_id, {})
        await asyncio.gather(
            *(expire(bucket, members, "payment-unpaid") for bucket, members in claimed.items())
        )

    async def aclose(self) -> None:
        for task in list(self._inflight.values()):
            task.cancel()
        await asyncio.gather(*self._inflight.values(), return_exceptions=True)
        if self._session is not None:
            await self._session.close()
