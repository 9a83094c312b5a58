"""The operator console (DESIGN §11): one static page and the admin JSON routes it needs.

``GET /console`` serves ``stock/static/console.html`` (with its script and style
beside it, no build step, nothing from elsewhere). The page keeps the admin
token in sessionStorage and does everything through the JSON API; the routes
added here are the two it needs besides the existing ones:

- ``GET /v1/stock/{sku}/ledger?limit=50``: the SKU's newest ledger rows from
  PostgreSQL (404 ``not_found`` where no database is configured). The ledger
  has no index on ``sku`` (one would slow the writer's COPY), so the rows are
  looked for among the newest ``LEDGER_WINDOW`` ledger rows, a bounded scan of
  the primary key.
- ``GET /v1/admin/health``: ``persist.ops.health``.
- ``POST /v1/admin/orders/{order_id}/confirm|release|cancel`` with
  ``{"reason"}`` (required): the same operations as the public routes, with the
  operator's reason on the ledger rows they write.

Registered by ``setup_console``, from ``stock.app.wiring.create_app``.
"""

from __future__ import annotations

import logging
from importlib import resources
from typing import Any

import asyncpg
from aiohttp import web
from redis.exceptions import RedisError

from persist import ops
from stock.app.database import DATABASE
from stock.core import keys, validate
from stock.core.errors import InvalidRequest, NotFound, Unavailable
from stock.http import api
from stock.http.api import ENGINE, METRICS, SETTINGS, admin, iso_ms, json_body, json_response
from stock.http.metrics import Metrics
from stock.orders.engine import StockEngine

log = logging.getLogger("stock.app.console")

LEDGER_WINDOW = 200_000  # newest ledger rows searched for a SKU's rows
LEDGER_MAX = 500
ASSETS = {
    "console.js": "application/javascript",
    "console.css": "text/css",
}
HEADERS = {
    # the page loads only its own files; the token never leaves for another origin
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
GAUGE_PERIOD_S = 1.0
RECONCILE_EVERY = 2  # read the reconcile record every this many periods

# $1: the SKU's shard names (one for an ordinary SKU; DESIGN §12), whose seqs are
# their own: newest first by server time, then seq
_LEDGER = """
SELECT id, order_id, op, qty, at_ms, available, reserved, sold, seq, reason, sku
FROM stock_ledger
WHERE sku = ANY($1::text[]) AND id > (SELECT coalesce(max(id), 0) FROM stock_ledger) - $3
ORDER BY at_ms DESC, seq DESC, id DESC
LIMIT $2
"""


def static_file(name: str) -> bytes:
    """A file of ``stock/static/`` (the console's, the index's, the API reference's)."""
    return (resources.files("stock") / "static" / name).read_bytes()


async def page(request: web.Request) -> web.Response:
    return web.Response(body=static_file("console.html"), content_type="text/html", headers=HEADERS)


async def asset(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in ASSETS:
        raise NotFound(f"no console file {name!r}")
    return web.Response(body=static_file(name), content_type=ASSETS[name], headers=HEADERS)


@admin
async def ledger(request: web.Request) -> web.Response:
    sku = validate.sku(request.match_info["sku"])
    limit = validate.query_int(request.query.get("limit", "50"), "limit", 1, LEDGER_MAX)
    pool = request.app[DATABASE].pool
    if pool is None:
        raise NotFound("the ledger needs PostgreSQL (STOCK_DATABASE_URL)")
    try:
        async with pool.acquire(timeout=2) as conn:
            names = await request.app[ENGINE].shard_names(sku)
            rows = await conn.fetch(_LEDGER, names, limit, LEDGER_WINDOW, timeout=5)
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
        log.warning("ledger of %s: PostgreSQL error: %s", sku, exc)
        raise Unavailable("ledger store unavailable, retry shortly") from None
    items = [
        {
            **{
                k: row[k]
                for k in (
                    "id",
                    "order_id",
                    "op",
                    "qty",
                    "available",
                    "reserved",
                    "sold",
                    "seq",
                    "reason",
                )
            },
            "at": iso_ms(row["at_ms"]),
            **({"shard": keys.base_sku(row["sku"])[1]} if len(names) > 1 else {}),
        }
        for row in rows
    ]
    return json_response({"sku": sku, "rows": items, "window": LEDGER_WINDOW})


@admin
async def health(request: web.Request) -> web.Response:
    app = request.app
    pool = app[DATABASE].pool
    registry = app[METRICS].all_processes()  # the payment probe's counts of every worker
    body = await ops.health(app[ENGINE].redis, app[SETTINGS], pool, registry)
    return json_response(body)


def _reason(body: dict[str, Any]) -> str:
    reason = api.require(body, "reason")
    if not isinstance(reason, str) or not reason.strip() or len(reason) > 200:
        raise InvalidRequest("reason must be 1 to 200 characters", field="reason")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in reason):
        raise InvalidRequest("reason must not hold control characters", field="reason")
    return reason


def _order_action(op: str) -> Any:
    """An admin order operation that records the operator's reason in the ledger."""

    @admin
    async def handler(request: web.Request) -> web.Response:
        order_id = validate.order_id(request.match_info["order_id"])
        reason = _reason(await json_body(request, {"reason"}))
        call = getattr(request.app[ENGINE], op)
        return await api.order_op(request, op, lambda: call(order_id, reason=reason))

    return handler


class Gauges:
    """Keep this process's gauges fresh: in multiprocess mode a scrape reaches one
    worker, so each one refreshes its own; and the last reconcile's drift. One
    ``step`` a period, run by ``stock/app/lifecycle.py`` under its supervisor."""

    def __init__(self, metrics: Metrics, engine: StockEngine) -> None:
        self.metrics = metrics
        self.engine = engine
        self.tick = 0

    async def step(self) -> bool:
        metrics, self.tick = self.metrics, self.tick + 1
        try:
            if metrics.multiprocess:
                metrics.refresh()
            if (self.tick - 1) % RECONCILE_EVERY == 0:
                record = await ops.last_reconcile(self.engine.redis)
                if record is not None:
                    metrics.reconcile_drifting.set(float(record.get("drifting", 0)))
                    metrics.reconcile_at.set(float(record.get("at_ms", 0)) / 1000)
        except (RedisError, OSError):
            pass  # Redis away: the gauges keep their last values
        return False


def setup_console(app: web.Application) -> None:
    """Add the console's page, files and admin routes (its gauges loop is the
    lifecycle's: ``Gauges``)."""
    r = app.router
    r.add_get("/console", page)
    r.add_get("/console/{name}", asset)
    r.add_get("/v1/stock/{sku}/ledger", ledger)
    r.add_get("/v1/admin/health", health)
    for op in ("confirm", "release", "cancel"):
        r.add_post(f"/v1/admin/orders/{{order_id}}/{op}", _order_action(op))
