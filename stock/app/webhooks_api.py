"""The webhook admin routes (DESIGN §11) and the dispatcher of ``stock serve``.

Every route is admin and needs PostgreSQL (503 ``unavailable`` without
``STOCK_DATABASE_URL`` or while it is unreachable). The pool is opened at the
first call, so the API starts while PostgreSQL is away.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from aiohttp import web
from prometheus_client import Counter
from yarl import URL

from persist import webhooks
from stock.core.errors import InvalidRequest, NotFound, Unavailable
from stock.http.api import BACKGROUND, METRICS, SETTINGS, admin, json_body, json_response, require

MAX_URL = 2048
MAX_SECRET = 256


@dataclass
class _Db:
    """The API's PostgreSQL pool, opened at first use."""

    dsn: str
    pool: asyncpg.Pool | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def run(self, call: Callable[[Any], Awaitable[Any]]) -> Any:
        if not self.dsn:
            raise Unavailable("webhooks need PostgreSQL: set STOCK_DATABASE_URL")
        try:
            async with self.lock:
                if self.pool is None:
                    self.pool = await asyncpg.create_pool(
                        self.dsn, min_size=0, max_size=4, timeout=5
                    )
            async with self.pool.acquire(timeout=5) as conn:
                return await call(conn)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
            raise Unavailable(f"PostgreSQL unavailable: {type(exc).__name__}") from exc


DB = web.AppKey("webhooks_db", _Db)


def validate_subscription(body: dict[str, Any]) -> tuple[str, list[str], str]:
    """(url, events, secret) of a POST /v1/webhooks body, or InvalidRequest naming the field."""
    url, events, secret = require(body, "url"), require(body, "events"), require(body, "secret")
    if not isinstance(url, str) or not 0 < len(url) <= MAX_URL:
        raise InvalidRequest(f"url must be a string of 1 to {MAX_URL} characters", field="url")
    try:
        parsed = URL(url)
    except ValueError:
        raise InvalidRequest("url is not a valid URL", field="url") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise InvalidRequest("url must be an http or https URL with a host", field="url")
    if not isinstance(events, list) or not events:
        raise InvalidRequest("events must be a non-empty list of event types", field="events")
    for event in events:
        if event not in webhooks.EVENT_TYPES:
            known = ", ".join(webhooks.EVENT_TYPES)
            raise InvalidRequest(f"unknown event type {event!r} (known: {known})", field="events")
    if len(set(events)) != len(events):
        raise InvalidRequest("events must not name a type twice", field="events")
    if not isinstance(secret, str) or not 0 < len(secret) <= MAX_SECRET:
        raise InvalidRequest(
            f"secret must be a string of 1 to {MAX_SECRET} characters", field="secret"
        )
    return url, events, secret


def _subscription_id(request: web.Request) -> str:
    try:
        return str(uuid.UUID(request.match_info["id"]))
    except ValueError:
        raise NotFound("no such webhook") from None


@admin
async def create_webhook(request: web.Request) -> web.Response:
    url, events, secret = validate_subscription(
        await json_body(request, {"url", "events", "secret"})
    )
    created = await request.app[DB].run(lambda c: webhooks.subscribe(c, url, events, secret))
    return json_response(created, 201)


@admin
async def list_webhooks(request: web.Request) -> web.Response:
    found = await request.app[DB].run(webhooks.subscriptions)
    for sub in found:
        sub["created_at"] = sub["created_at"].isoformat()
    return json_response({"webhooks": found})


@admin
async def delete_webhook(request: web.Request) -> web.Response:
    sub = _subscription_id(request)
    if not await request.app[DB].run(lambda c: webhooks.unsubscribe(c, sub)):
        raise NotFound("no such webhook")
    return web.Response(status=204)


@admin
async def list_deliveries(request: web.Request) -> web.Response:
    sub = _subscription_id(request)
    state = request.query.get("status")
    if state is not None and state not in webhooks.STATES:
        known = ", ".join(webhooks.STATES)
        raise InvalidRequest(f"status must be one of {known}", field="status")

    async def read(conn: Any) -> list[dict[str, Any]] | None:
        if not await webhooks.exists(conn, sub):
            return None
        return await webhooks.deliveries(conn, sub, state)

    rows = await request.app[DB].run(read)
    if rows is None:
        raise NotFound("no such webhook")
    return json_response({"deliveries": [_delivery(r) for r in rows]})


def _delivery(row: dict[str, Any]) -> dict[str, Any]:
    out = {
        "id": str(row["event_id"]),
        "type": row["type"],
        "sku": row["sku"],
        "state": row["state"],
        "attempts": row["attempts"],
        "data": webhooks.data(row),
    }
    for name in ("created_at", "next_at", "delivered_at"):
        out[name] = row[name].isoformat() if row[name] is not None else None
    out.update(last_status=row["last_status"], last_error=row["last_error"])
    return out


def setup_webhooks(app: web.Application, run_dispatcher: bool) -> None:
    """Add the /v1/webhooks routes, their metrics, and (with PostgreSQL) a dispatcher."""
    settings = app[SETTINGS]
    app[DB] = _Db(settings.database_url)
    r = app.router
    r.add_post("/v1/webhooks", create_webhook)
    r.add_get("/v1/webhooks", list_webhooks)
    r.add_delete("/v1/webhooks/{id}", delete_webhook)
    r.add_get("/v1/webhooks/{id}/deliveries", list_deliveries)
    registry = app[METRICS].registry  # exported (as 0) by every process, for the alert
    counters = {
        "delivered": Counter(
            "stock_webhook_deliveries", "Webhook deliveries answered 2xx", registry=registry
        ),
        "failed": Counter(
            "stock_webhook_deliveries_failed",
            "Webhook deliveries given up after STOCK_WEBHOOK_RETRY_S",
            registry=registry,
        ),
    }
    dispatch = run_dispatcher and bool(settings.database_url)
    app.cleanup_ctx.append(_lifetime(dispatch, counters))


def _lifetime(
    dispatch: bool, counters: dict[str, Counter]
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def lifetime(app: web.Application) -> AsyncIterator[None]:
        from persist.dispatcher import Dispatcher

        stop, task = asyncio.Event(), None
        if dispatch:
            dispatcher = Dispatcher(app[SETTINGS], app[SETTINGS].database_url)
            app[BACKGROUND]["webhooks"] = dispatcher
            _watch(app, dispatcher, counters)
            task = asyncio.create_task(dispatcher.run(stop), name="webhooks")
        yield
        stop.set()
        if task is not None:
            await asyncio.gather(task, return_exceptions=True)
        db = app[DB]
        if db.pool is not None:
            await db.pool.close()

    return lifetime


def _watch(app: web.Application, dispatcher: Any, counters: dict[str, Counter]) -> None:
    counted = dict.fromkeys(counters, 0)

    def refresh() -> None:
        for name, counter in counters.items():
            now = getattr(dispatcher.stats, name)
            counter.inc(max(0, now - counted[name]))
            counted[name] = max(counted[name], now)

    app[METRICS].on_scrape(refresh)
