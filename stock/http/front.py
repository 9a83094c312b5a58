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
from redis.exceptions import RedisError

from stock.core.errors import StockError, StoreUnavailable
from stock.http.metrics import Metrics

log = logging.getLogger("stock.http.api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
RETRY_AFTER_S = 1
UNMATCHED = "unmatched"


def json_response(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


def error_response(code: str, status: int, message: str, **details: Any) -> web.Response:
    return json_response({"error": code, "message": message, **details}, status)


_OVERLOADED = orjson.dumps(
    {
        "error": "overloaded",
        "message": f"too many requests in flight; retry after {RETRY_AFTER_S} s",
        "retry_after_s": RETRY_AFTER_S,
    }
)


def overloaded() -> web.Response:
    response = web.Response(body=_OVERLOADED, status=503, content_type="application/json")
    response.headers["Retry-After"] = str(RETRY_AFTER_S)
    return response


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
        return json_response(exc.to_dict(), exc.status)
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


class Front:
    """The in-flight count of one process and the wrapper of its route handlers."""

    def __init__(
        self, metrics: Metrics, max_inflight: int, max_body: int, request_timeout_s: float
    ) -> None:
        self.metrics = metrics
        self.limit = max_inflight or sys.maxsize  # 0: no limit
        self.max_body = max_body
        self.timeout = request_timeout_s
        self.inflight = 0

    def wrap(self, handler: Handler, route: str, method: str, shed: bool) -> Handler:
        """``handler`` with the error format, the metric and (``shed``) the overload bound.
        ``method`` ``*`` (the catch-all) counts each request under its own method."""
        front, done, perf = self, self.metrics.request_done, time.perf_counter

        async def endpoint(request: web.Request) -> web.StreamResponse:
            if shed and front.inflight >= front.limit:
                done(route, method, 503, 0.0)
                return overloaded()
            front.inflight += 1
            started = perf()
            try:
                # The request's deadline: what the Redis clients' own deadlines do not
                # bound (a cluster client's retries and re-discovery, a queue for a
                # connection) ends here as 503 `unavailable` (TimeoutError is an OSError).
                async with asyncio.timeout(front.timeout):
                    response = await handler(request)
            except Exception as exc:
                response = error_for(request, exc, front.metrics, front.max_body)
            finally:
                front.inflight -= 1
            done(
                route,
                request.method if method == "*" else method,
                response.status,
                perf() - started,
            )
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
            shed = name.startswith("/v1/")
            route._handler = self.wrap(route.handler, name, route.method, shed)  # type: ignore[assignment]
        app.router.add_route("*", "/{tail:.*}", self.wrap(unmatched, UNMATCHED, "*", False))


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
