"""The webhook admin routes (DESIGN §11) and their metrics.

Every route is admin and needs PostgreSQL (503 ``unavailable`` without
``STOCK_DATABASE_URL`` or while it is unreachable), over the process's pool
(``stock/app/database.py``). The dispatcher of ``stock serve`` runs in
``stock/app/lifecycle.py``.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import Counter
from yarl import URL

from persist import webhooks
from stock.app.database import DATABASE
from stock.core.errors import InvalidRequest, NotFound
from stock.http.api import METRICS, admin, json_body, json_response, require

MAX_URL = 2048
MAX_SECRET = 256


# The webhooks' counters (exported, as 0, by every process, for the alert): the
# lifecycle's dispatcher counts into them (``stock/app/lifecycle.py``).
COUNTERS = web.AppKey("webhook_counters", dict)


async def _run(request: web.Request, call: Callable[[Any], Awaitable[Any]]) -> Any:
    return await request.app[DATABASE].run(call, "webhooks")


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
    created = await _run(request, lambda c: webhooks.subscribe(c, url, events, secret))
    return json_response(created, 201)


@admin
async def list_webhooks(request: web.Request) -> web.Response:
    found = await _run(request, webhooks.subscriptions)
    for sub in found:
        sub["created_at"] = sub["created_at"].isoformat()
    return json_response({"webhooks": found})


@admin
async def delete_webhook(request: web.Request) -> web.Response:
    sub = _subscription_id(request)
    if not await _run(request, lambda c: webhooks.unsubscribe(c, sub)):
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

    rows = await _run(request, read)
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


def setup_webhooks(app: web.Application) -> None:
    """Add the /v1/webhooks routes and their metrics (the dispatcher is the lifecycle's)."""
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
    app[COUNTERS] = counters
