"""What wraps every route handler of the API (DESIGN §6, §10).

- the error format: every error becomes ``{"error", "message", ...}`` with the
  status of its code, never a stack trace;
- the overload bound: past ``STOCK_MAX_INFLIGHT`` requests in flight in this
  process, a ``/v1/`` request is answered at once with 503 ``overloaded`` and
  ``Retry-After`` instead of queueing until every answer is late (health,
  readiness, metrics and the spec still answer);
- the request count and latency metric.

Each route's handler is wrapped once when the app is built rather than run
through an aiohttp middleware: with any middleware aiohttp adds two coroutine
layers per request (its ``_fix_request_current_app`` and ours) and a cache
lookup to build the chain, and the wrapper knows its route's name already.
A catch-all route answers the 404 and 405 that aiohttp's router would give.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web
from multidict import CIMultiDict
from redis.exceptions import RedisError

from stock.core.errors import StockError, StoreUnavailable
from stock.http.admission import Deadlines, QueueDelay
from stock.http.metrics import Metrics

log = logging.getLogger("stock.http.api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
RETRY_AFTER_S = 1
UNMATCHED = "unmatched"


JSON_HEADERS = CIMultiDict({"Content-Type": "application/json"})


def json_response(body: Any, status: int = 200) -> web.Response:
    """A JSON answer (prepared headers: ``content_type=`` would parse them each time)."""
    return web.Response(body=orjson.dumps(body), status=status, headers=JSON_HEADERS)


def error_response(code: str, status: int, message: str, **details: Any) -> web.Response:
    return json_response({"error": code, "message": message, **details}, status)


_OVERLOADED_BODY = orjson.dumps(
    {
        "error": "overloaded",
        "message": f"too many requests in flight; retry after {RETRY_AFTER_S} s",
        "retry_after_s": RETRY_AFTER_S,
    }
)


_OVERLOADED_HEADERS = CIMultiDict(
    {"Content-Type": "application/json", "Retry-After": str(RETRY_AFTER_S)}
)


def overloaded() -> web.Response:
    """The 503 of a shed request, from prepared body and headers."""
    return web.Response(body=_OVERLOADED_BODY, status=503, headers=_OVERLOADED_HEADERS)


def error_for(
    request: web.Request, exc: Exception, metrics: Metrics, max_body: int
) -> web.Response:
    """The answer to a handler's exception, by its type alone: a failure inside
    redis-py leaves the client layer typed (``stock.redis.client.store_boundary``, ``typed``),
    anything untyped is a bug (500)."""
    if isinstance(exc, StoreUnavailable | RedisError | OSError):  # the engine's, or raw
        metrics.redis_errors.inc()
        log.warning("Redis error on %s %s: %s", request.method, request.path, exc.__cause__ or exc)
        return error_response("unavailable", 503, StoreUnavailable.MESSAGE)
    if isinstance(exc, StockError):
        response = json_response(exc.to_dict(), exc.status)
        if "retry_after_s" in exc.details:  # rate_limited
            response.headers["Retry-After"] = str(exc.details["retry_after_s"])
        return response
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return error_response("payload_too_large", 413, f"body must be at most {max_body} bytes")
    if isinstance(exc, web.HTTPNotFound):
        return error_response("not_found", 404, f"no route for {request.path}")
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = sorted(exc.allowed_methods)
        response = error_response(
            "method_not_allowed", 405, f"{request.method} is not allowed here", allowed=allowed
        )
        response.headers["Allow"] = ", ".join(allowed)
        return response
    if isinstance(exc, web.HTTPException):
        return error_response("invalid_request", exc.status, exc.reason)
    log.exception("unhandled error on %s %s", request.method, request.path, exc_info=exc)
    return error_response("internal", 500, "internal error")


NEW, COMPLETES = "new", "completes"  # the two classes of /v1/ requests when shedding
# What completes a purchase (an order already holding stock): kept ahead of new work
COMPLETING = ("/confirm", "/release", "/extend", "/cancel")


def shed_class(route: str, method: str) -> str | None:
    """None: never shed (health, readiness, metrics, spec, pages); COMPLETES: a
    transition of an existing order or a read of one; NEW: anything else under /v1/."""
    if not route.startswith("/v1/"):
        return None
    if route.endswith(COMPLETING) or (method == "GET" and route.startswith("/v1/reservations")):
        return COMPLETES
    return NEW


class Front:
    """The in-flight count of one process, its admission and the wrapper of its routes.

    Admission (DESIGN §10): new work (reserves, deducts, stock reads and admin) is shed
    past ``STOCK_MAX_INFLIGHT`` in flight, or while the queue delay stands above
    ``STOCK_QUEUE_TARGET_MS`` (``QueueDelay``); what completes a purchase only past
    twice ``STOCK_MAX_INFLIGHT``. A shed request is answered before its body is read,
    from prepared bytes, and only counted: a client that resends a 503 at once must
    not take the CPU the admitted requests need."""

    def __init__(
        self,
        metrics: Metrics,
        max_inflight: int,
        max_body: int,
        request_timeout_s: float,
        queue_target_ms: int = 0,
    ) -> None:
        self.metrics = metrics
        self.limit = max_inflight or sys.maxsize  # 0: no limit
        self.hard_limit = 2 * max_inflight or sys.maxsize
        self.max_body = max_body
        self.timeout = request_timeout_s
        self.deadlines = Deadlines(request_timeout_s)
        self.delay = QueueDelay(queue_target_ms / 1000)
        self.inflight = 0

    def admits(self, kind: str) -> bool:
        if kind is NEW:
            return self.inflight < self.limit and not self.delay.shedding()
        return self.inflight < self.hard_limit

    def wrap(self, handler: Handler, route: str, method: str, kind: str | None) -> Handler:
        """``handler`` with the error format, the metric, the deadline and (``kind``) the
        admission. ``method`` ``*`` (the catch-all) counts each request under its own."""
        front, deadlines, delay, clock = self, self.deadlines, self.delay, time.monotonic
        record = self.metrics.route(route, method)
        shed_counter = record.counter(503) if kind is not None else None

        async def endpoint(request: web.Request) -> web.StreamResponse:
            if kind is not None and not front.admits(kind):
                shed_counter.inc()  # type: ignore[union-attr]
                return overloaded()
            front.inflight += 1
            started = clock()
            token = deadlines.start(started)
            try:
                response = await handler(request)
            except asyncio.CancelledError:
                if not deadlines.end(token):
                    raise  # not ours: the server's shutdown
                asyncio.current_task().uncancel()  # type: ignore[union-attr]
                response = error_for(request, TimeoutError(), front.metrics, front.max_body)
            except Exception as exc:
                response = error_for(request, exc, front.metrics, front.max_body)
            finally:
                front.inflight -= 1
                if deadlines.end(token):  # cancelled, but the handler swallowed it
                    asyncio.current_task().uncancel()  # type: ignore[union-attr]
            now = clock()
            if kind is not None and response.status < 500:
                # the queue's delay, not Redis's failures: a request that waited on a
                # lost node answers 503 and says nothing about this process's queue
                delay.completed(now - started, now)
            record(request.method if method == "*" else method, response.status, now - started)
            return response

        endpoint.stock_front = True  # type: ignore[attr-defined]
        return endpoint

    def wrap_routes(self, app: web.Application) -> None:
        """Wrap every route's handler, then add the catch-all. aiohttp keeps a route's
        handler in ``_handler``; routes added by any part of ``create_app`` get wrapped."""
        for route in app.router.routes():
            if getattr(route.handler, "stock_front", False):
                continue
            resource = route.resource
            name = resource.canonical if resource is not None else UNMATCHED
            kind = shed_class(name, route.method)
            route._handler = self.wrap(route.handler, name, route.method, kind)  # type: ignore[assignment]
        app.router.add_route("*", "/{tail:.*}", self.wrap(unmatched, UNMATCHED, "*", None))


async def unmatched(request: web.Request) -> web.StreamResponse:
    """No route's path and method match: 405 if some route has the path, else 404."""
    allowed: set[str] = set()
    for resource in request.app.router.resources():
        if resource.canonical == "/{tail}":
            continue
        _match, methods = await resource.resolve(request)
        allowed |= methods
    if allowed:
        raise web.HTTPMethodNotAllowed(request.method, allowed)
    raise web.HTTPNotFound()
