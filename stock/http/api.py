"""The HTTP API v1 (DESIGN §6): an aiohttp app factory with thin handlers.

``stock/http/front.py`` wraps every handler: errors become ``{"error", "message",
...}`` with the status of their code, requests past ``STOCK_MAX_INFLIGHT`` get
503 ``overloaded``, and each request is counted; handlers only parse, validate
and call the engine (and, with ``STOCK_SOLDOUT_CACHE_MS``, ``stock/loops/soldout.py``
answers sold-out SKUs from memory). A failure the Redis client layer could not
mend arrives typed (``stock.redis.client``). ``stock/http/routes.py`` builds the
app (``create_api``) with the service routes; ``stock.app.wiring.create_app``
adds the console and the webhooks and opens the Redis client, the engine, the
reaper and the writer with the app.
"""

from __future__ import annotations

import functools
import hmac
import time
from collections.abc import Awaitable, Callable, Set
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web

from stock.core import validate
from stock.core.config import Settings
from stock.core.errors import InsufficientStock, InvalidRequest, StockError
from stock.core.validate import Item
from stock.http.front import Front, Handler
from stock.http.front import error_response as error_response  # re-exported (console)
from stock.http.front import json_response as json_response
from stock.http.metrics import Metrics
from stock.http.ratelimit import RateLimits
from stock.loops.soldout import SoldOut
from stock.orders.engine import OrderResult, StockEngine
from stock.orders.locations import Locations

MAX_BODY = 64 * 1024
SETTINGS = web.AppKey("settings", Settings)
ENGINE = web.AppKey("engine", StockEngine)
METRICS = web.AppKey("metrics", Metrics)
BACKGROUND = web.AppKey("background", dict)
# What the app layer plugs in (stock/app/wiring.py): named readiness checks (each
# answers "ok" or the error), hooks run before a scrape, the OpenAPI document.
READY_CHECKS = web.AppKey("ready_checks", dict)
BEFORE_SCRAPE = web.AppKey("before_scrape", list)
OPENAPI = web.AppKey("openapi", dict)
SOLDOUT: web.AppKey[SoldOut | None] = web.AppKey("soldout")  # STOCK_SOLDOUT_CACHE_MS > 0
FRONT = web.AppKey("front", Front)
RATE_LIMITS: web.AppKey[RateLimits | None] = web.AppKey("rate_limits")  # DESIGN §10
RESERVE_FIELDS = frozenset({"order_id", "items", "ttl_s", "customer_id"})
DEDUCT_FIELDS = frozenset({"order_id", "items", "customer_id"})
RETURNS_STOCK = ("release", "cancel")  # order operations that give stock back


def iso_ms(ms: int) -> str | None:
    """Epoch milliseconds as ISO 8601 UTC, e.g. ``2026-11-23T06:07:20.534Z``."""
    if not ms:
        return None
    seconds, millis = divmod(ms, 1000)
    return f"{_iso_second(seconds)}.{millis:03d}Z"


@functools.lru_cache(maxsize=4096)
def _iso_second(seconds: int) -> str:
    # a flash sale answers thousands of expiries within the same second
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")


async def json_body(request: web.Request, allowed: Set[str]) -> dict[str, Any]:
    """The request body as a JSON object with no field outside ``allowed``."""
    raw = await request.read()
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidRequest("body must be valid JSON", field="body") from None
    if not isinstance(body, dict):
        raise InvalidRequest("body must be a JSON object", field="body")
    if not body.keys() <= allowed:
        unknown = sorted(set(body) - allowed)
        raise InvalidRequest(f"unknown field {unknown[0]!r}", field=unknown[0])
    return body


def require(body: dict[str, Any], name: str) -> Any:
    if name not in body:
        raise InvalidRequest(f"{name} is required", field=name)
    return body[name]


def order_body(result: OrderResult, with_expiry: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"order_id": result.order_id, "status": result.status}
    if with_expiry:
        body["expires_at"] = iso_ms(result.expires_ms)
    body["items"] = [_item(line.sku, line.qty, line.allocations) for line in result.lines]
    return body


def _item(sku: str, qty: int, allocations: str) -> dict[str, Any]:
    """An answered item; on a SKU with locations its ``allocations`` (DESIGN §13)."""
    if not allocations:
        return {"sku": sku, "qty": qty}
    parts = (part.rpartition(":") for part in allocations.split(","))
    return {
        "sku": sku,
        "qty": qty,
        "allocations": [{"location": n, "qty": int(q)} for n, _, q in parts],
    }


def admin(handler: Handler) -> Handler:
    """Admin routes need ``Authorization: Bearer <STOCK_ADMIN_TOKEN>`` (constant time)."""

    async def guarded(request: web.Request) -> web.StreamResponse:
        token = request.app[SETTINGS].admin_token
        given = request.headers.get("Authorization", "")
        expected = f"Bearer {token}"
        # aiohttp hands over header bytes that are not UTF-8 as surrogates: compare bytes
        given_bytes = given.encode("utf-8", "surrogateescape")
        if not token or not hmac.compare_digest(given_bytes, expected.encode()):
            return error_response("unauthorized", 401, "admin route: bad or missing bearer token")
        return await handler(request)

    return guarded


# -- handlers ------------------------------------------------------------------


def _counters(
    request: web.Request,
    counters: Any,
    sent: float,
    shards: int | None = None,
    located: dict[str, Any] | None = None,
) -> web.Response:
    """Counters read or written by a call sent at monotonic time ``sent``, with the
    SKU's shard count on the stock routes (DESIGN §12) and, from ``located``, its
    ``in_transit``, ``locations`` and ``allocation`` (DESIGN §13)."""
    body = counters.as_dict()
    if shards is not None:
        body["shards"] = shards
    if located:
        body.update(located)
    if min(body["available"], body["reserved"], body["sold"]) < 0:
        request.app[METRICS].oversell.inc()
    soldout = request.app[SOLDOUT]
    if soldout is not None:
        soldout.seen(counters.sku, counters.available, sent)
    return json_response(body)


async def get_stock(request: web.Request) -> web.Response:
    sku = validate.sku(request.match_info["sku"])
    sent = time.monotonic()
    counters, shards, located = await Locations(request.app[ENGINE]).view(sku)
    return _counters(request, counters, sent, shards, located)


@admin
async def put_stock(request: web.Request) -> web.Response:
    """``available`` and/or ``shards`` (DESIGN §12: ``{"shards": k}`` alone changes
    only the shards)."""
    sku = validate.sku(request.match_info["sku"])
    body = await json_body(request, {"available", "reason", "shards"})
    engine = request.app[ENGINE]
    if "shards" not in body:
        require(body, "available")
    shards = body.get("shards")
    if shards is not None or "shards" in body:
        shards = validate.int_in(shards, "shards", 1, engine.settings.max_shards)
    available = body.get("available")
    if available is not None or "available" in body:
        available = validate.int_in(available, "available", 0, 10**12)
    reason, sent = _reason(body), time.monotonic()
    written = None
    if available is not None:
        written = await engine.set_stock(sku, available, reason)
    if shards is not None:
        if shards > 1 and await Locations(engine).read(sku):
            raise InvalidRequest(
                "a SKU with locations cannot be sharded yet (DESIGN §13)", field="shards"
            )
        await engine.set_shards(sku, shards)
    counters, now = await engine.stock_view(sku)
    # available alone: the counters the set wrote (atomic with it), as before
    return _counters(request, written if shards is None and written else counters, sent, now)


@admin
async def adjust_stock(request: web.Request) -> web.Response:
    sku = validate.sku(request.match_info["sku"])
    body = await json_body(request, {"delta", "reason", "expected_available", "location"})
    delta = validate.int_in(require(body, "delta"), "delta", -(10**12), 10**12)
    if delta == 0:
        raise InvalidRequest("delta must not be 0", field="delta")
    expected = body.get("expected_available")
    if expected is not None:
        expected = validate.int_in(expected, "expected_available", 0, 10**12)
    reason, sent = _reason(body), time.monotonic()
    if "location" in body:  # a SKU with locations (DESIGN §13)
        where = validate.location(body["location"])
        located = Locations(request.app[ENGINE])
        counters = await located.adjust(sku, where, delta, expected, reason)
        return _counters(request, counters, sent, located=await located.read(sku))
    counters = await request.app[ENGINE].adjust(sku, delta, expected, reason)
    return _counters(request, counters, sent)


def _reason(body: dict[str, Any]) -> str:
    return validate.reason(body.get("reason", ""))


async def order_op(
    request: web.Request, op: str, call: Callable[[], Awaitable[OrderResult]], created: int = 200
) -> web.Response:
    """Run one order operation and count its outcome (the engine runs one that failed
    inside the Redis client once more: ``stock.redis.client.RetryOnce``)."""
    app = request.app
    metrics, soldout = app[METRICS], app[SOLDOUT]
    sent = time.monotonic() if soldout is not None else 0.0
    try:
        result = await call()
    except StockError as exc:
        metrics.outcome(op, exc.code)
        if soldout is not None and isinstance(exc, InsufficientStock):
            soldout.refused(exc.details["items"], sent)
        raise
    metrics.outcome(op, "replay" if result.replay else "ok")
    if soldout is not None and op in RETURNS_STOCK:
        soldout.back(line.sku for line in result.lines)
    with_expiry = op in ("reserve", "extend")
    return json_response(order_body(result, with_expiry), 200 if result.replay else created)


async def limited_body(
    request: web.Request, limits: RateLimits | None, allowed: Set[str]
) -> dict[str, Any]:
    """The body, after the caller's rate limits (429 RateLimited past one): its address
    before the body is read, its ``customer_id`` after; before any script runs."""
    if limits is None:
        return await json_body(request, allowed)
    limits.check_address(request.remote)
    body = await json_body(request, allowed)
    customer = body.get("customer_id")
    if isinstance(customer, str):
        limits.check_customer(customer)
    return body


async def create_reservation(request: web.Request) -> web.Response:
    app = request.app  # (a property: read once)
    body = await limited_body(request, app[RATE_LIMITS], RESERVE_FIELDS)
    order_id, items = require(body, "order_id"), require(body, "items")
    ttl = validate.ttl_s(body["ttl_s"]) if "ttl_s" in body else None
    customer = body.get("customer_id")  # the engine validates it, order_id and items
    engine = app[ENGINE]
    if app[SOLDOUT] is not None:
        items, refusal = await _sold_out(request, "reserve", order_id, items, customer)
        if refusal is not None:
            return refusal
    return await order_op(
        request, "reserve", lambda: engine.reserve(order_id, items, ttl, customer), 201
    )


async def create_deduction(request: web.Request) -> web.Response:
    body = await limited_body(request, request.app[RATE_LIMITS], DEDUCT_FIELDS)
    order_id, items = require(body, "order_id"), require(body, "items")
    customer = body.get("customer_id")
    engine = request.app[ENGINE]
    if request.app[SOLDOUT] is not None:
        items, refusal = await _sold_out(request, "deduct", order_id, items, customer)
        if refusal is not None:
            return refusal
    return await order_op(request, "deduct", lambda: engine.deduct(order_id, items, customer), 201)


@admin
async def put_limits(request: web.Request) -> web.Response:
    sku = validate.sku(request.match_info["sku"])
    body = await json_body(request, {"per_customer"})
    if "per_customer" not in body:
        raise InvalidRequest(
            "per_customer is required (null removes the limit)", field="per_customer"
        )
    limit = await request.app[ENGINE].set_limit(sku, body["per_customer"])
    return json_response({"sku": sku, "per_customer": limit})


@admin
async def get_limits(request: web.Request) -> web.Response:
    sku = validate.sku(request.match_info["sku"])
    limit = await request.app[ENGINE].get_limit(sku)
    return json_response({"sku": sku, "per_customer": limit})


async def _sold_out(
    request: web.Request, op: str, order_id: Any, raw_items: Any, customer: Any
) -> tuple[list[Item], web.Response | None]:
    """The sold-out fast path: the items validated as the engine does, and a 409
    insufficient_stock answered from this process's memory when one of them was seen
    at 0 within STOCK_SOLDOUT_CACHE_MS (None: ask Redis). A retry of an order that
    exists (it sold before the SKU ran out) is asked of Redis, so that it gets its
    replay (DESIGN §3): one GET of the order's record per answer from memory."""
    validate.order_id(order_id)
    items = validate.items(raw_items)
    if customer is not None:
        validate.customer_id(customer)
    short = request.app[SOLDOUT].short(items)  # type: ignore[union-attr]
    if not short or await request.app[ENGINE].known_order(order_id):
        return items, None
    request.app[METRICS].outcome(op, InsufficientStock.code)
    request.app[METRICS].soldout_fast.inc()
    refusal = InsufficientStock(
        f"not enough stock for {', '.join(short)}",
        items=[{"sku": sku, "available": 0} for sku in short],
    )
    return items, json_response(refusal.to_dict(), refusal.status)


def _path_order(request: web.Request) -> str:
    return validate.order_id(request.match_info["order_id"])


async def confirm(request: web.Request) -> web.Response:
    order_id, engine = _path_order(request), request.app[ENGINE]
    return await order_op(request, "confirm", lambda: engine.confirm(order_id))


async def release(request: web.Request) -> web.Response:
    order_id, engine = _path_order(request), request.app[ENGINE]
    return await order_op(request, "release", lambda: engine.release(order_id))


async def extend(request: web.Request) -> web.Response:
    order_id = _path_order(request)
    body = await json_body(request, {"ttl_s"})
    ttl = validate.ttl_s(require(body, "ttl_s"))
    engine = request.app[ENGINE]
    return await order_op(request, "extend", lambda: engine.extend(order_id, ttl))


@admin
async def cancel(request: web.Request) -> web.Response:
    order_id, engine = _path_order(request), request.app[ENGINE]
    return await order_op(request, "cancel", lambda: engine.cancel(order_id))


async def get_reservation(request: web.Request) -> web.Response:
    order = await request.app[ENGINE].get_order(_path_order(request))
    states = {line.state for line in order["lines"]}
    if order["phase"] in ("released", "cancelled") and not order["lines"]:
        status = order["phase"]  # a TCC tombstone: released or cancelled before its try
    else:
        status = states.pop() if len(states) == 1 else "mixed"
    items = [
        {
            **_item(line.sku, line.qty, line.allocations),
            "state": line.state,
            "expires_at": iso_ms(line.expires_ms),
        }
        for line in order["lines"]
    ]
    return json_response(
        {"order_id": order["order_id"], "kind": order["kind"], "status": status, "items": items}
    )
