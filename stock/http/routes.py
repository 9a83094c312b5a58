"""The API app (``create_api``): its state, the routes of ``stock/http/api.py``,
and the service's own routes (liveness, readiness, metrics, the OpenAPI document).

``stock.app.wiring.create_app`` builds on it: the console, the webhooks, the
location routes, the readiness checks and scrape hooks of the process's parts.
"""

from __future__ import annotations

import asyncio

from aiohttp import web
from redis.exceptions import RedisError

from stock.core.config import Settings
from stock.http.api import (
    BACKGROUND,
    BEFORE_SCRAPE,
    ENGINE,
    FRONT,
    MAX_BODY,
    METRICS,
    OPENAPI,
    RATE_LIMITS,
    READY_CHECKS,
    SETTINGS,
    SOLDOUT,
    adjust_stock,
    cancel,
    confirm,
    create_deduction,
    create_reservation,
    extend,
    get_limits,
    get_reservation,
    get_stock,
    json_response,
    put_limits,
    put_stock,
    release,
)
from stock.http.front import Front
from stock.http.metrics import Metrics
from stock.http.openapi import spec as openapi_spec
from stock.http.ratelimit import RateLimits
from stock.loops.soldout import SoldOut


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    checks: dict[str, str] = {}
    try:
        await asyncio.wait_for(
            request.app[ENGINE].ping(), timeout=request.app[SETTINGS].redis_timeout_s
        )
        checks["redis"] = "ok"
    except (RedisError, OSError, TimeoutError) as exc:
        checks["redis"] = f"error: {exc or type(exc).__name__}"
    for name, check in request.app[READY_CHECKS].items():
        checks[name] = await check()
    ready = all(v == "ok" for v in checks.values())
    return json_response(
        {"status": "ready" if ready else "unready", **checks}, 200 if ready else 503
    )


async def metrics(request: web.Request) -> web.Response:
    for hook in request.app[BEFORE_SCRAPE]:
        await hook()
    body = request.app[METRICS].render()
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4"})


async def openapi(request: web.Request) -> web.Response:
    return json_response(request.app[OPENAPI])


# -- wiring --------------------------------------------------------------------


def _routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/v1/stock/{sku}", get_stock)
    r.add_put("/v1/stock/{sku}", put_stock)
    r.add_post("/v1/stock/{sku}/adjust", adjust_stock)
    r.add_put("/v1/stock/{sku}/limits", put_limits)
    r.add_get("/v1/stock/{sku}/limits", get_limits)
    r.add_post("/v1/reservations", create_reservation)
    r.add_get("/v1/reservations/{order_id}", get_reservation)
    r.add_post("/v1/reservations/{order_id}/confirm", confirm)
    r.add_post("/v1/reservations/{order_id}/release", release)
    r.add_post("/v1/reservations/{order_id}/extend", extend)
    r.add_post("/v1/deductions", create_deduction)
    r.add_post("/v1/orders/{order_id}/cancel", cancel)
    r.add_get("/healthz", healthz)
    r.add_get("/readyz", readyz)
    r.add_get("/metrics", metrics)
    r.add_get("/openapi.json", openapi)


def create_api(settings: Settings) -> web.Application:
    """The API's routes and state; ``stock.app.wiring.create_app`` adds the console,
    the webhooks and the process's resources, then wraps every route."""
    app = web.Application(client_max_size=MAX_BODY)  # no middleware: see stock/http/front.py
    app[SETTINGS] = settings
    app[METRICS] = Metrics()
    app[BACKGROUND] = {}
    app[READY_CHECKS] = {}
    app[BEFORE_SCRAPE] = []
    app[OPENAPI] = openapi_spec()
    app[FRONT] = Front(
        app[METRICS],
        settings.max_inflight,
        MAX_BODY,
        settings.request_timeout_s,
        settings.queue_target_ms,
    )
    cache_ms = settings.soldout_cache_ms
    app[SOLDOUT] = SoldOut(cache_ms) if cache_ms else None
    per_customer, per_address = settings.rate_limit_per_customer, settings.rate_limit_per_address
    limited = per_customer or per_address
    app[RATE_LIMITS] = RateLimits(per_customer, per_address) if limited else None
    _routes(app)
    return app
