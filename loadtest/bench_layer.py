"""The request layer's own CPU per request, measured in one process (issue 23).

``request_layer_us`` of the summary is the serve process's CPU per request minus the
bare handler's minus the library's per operation: three processes on a shared
machine, so it moves by several µs from run to run. This figure is its steady
companion: the API's ``POST /v1/reservations`` handler, wrapped by the front as in
``stock serve``, called on prepared requests with the engine replaced by a stub that
answers at once, against the bare app's handler called the same way: what our layer
(admission, deadline, metrics, decoding and validation, answer) costs beyond it.

    python -m loadtest.bench_layer [--requests 20000]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import uvloop
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from loadtest import bare_app
from stock.core import validate
from stock.core.config import Settings
from stock.http.api import ENGINE, FRONT, RATE_LIMITS
from stock.http.ratelimit import RateLimits
from stock.http.routes import create_api
from stock.orders.results import OrderResult
from stock.redis.scripts import LineResult

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class StubEngine:
    """Validates as the engine does (that is the library's cost, subtracted by the
    caller when it wants the layer alone) only if ``validating``; answers at once."""

    def __init__(self, validating: bool) -> None:
        self.validating = validating
        self.expires = int(time.time() * 1000) + 900_000

    async def reserve(self, order_id: str, items: Any, ttl: Any, customer: Any) -> OrderResult:
        if self.validating:
            validate.order_id(order_id)
            items = validate.items(items)
        lines = [LineResult(item.sku if self.validating else item["sku"], "reserved", 1, 0)
                 for item in items]  # fmt: skip
        return OrderResult(order_id, "reserved", False, self.expires, lines)


class _Transport:
    """What ``request.remote`` reads."""

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default


def _requests(app: web.Application, n: int) -> list[web.Request]:
    """``n`` prepared POSTs with a body each, as aiohttp hands them to a handler."""
    made = []
    for i in range(n):
        body = orjson.dumps({"order_id": f"o-{i}", "items": [{"sku": "HOT-1", "qty": 1}]})
        request = make_mocked_request(
            "POST",
            "/v1/reservations",
            headers={"Content-Type": "application/json", "Content-Length": str(len(body))},
            app=app,
            transport=_Transport(),
        )
        request._read_bytes = body  # what request.read() returns once read
        made.append(request)
    return made


async def _time(handler: Handler, requests: list[web.Request], expect: int) -> float:
    """CPU µs per call of ``handler`` over ``requests`` (after a warm-up)."""
    for request in requests[:200]:
        await handler(request)
    started = time.process_time()
    for request in requests[200:]:
        response = await handler(request)
    if response.status != expect:
        raise SystemExit(f"bench_layer: status {response.status}, expected {expect}")
    return (time.process_time() - started) / (len(requests) - 200) * 1e6


def _api_handler(settings: Settings, validating: bool) -> tuple[web.Application, Handler]:
    app = create_api(settings)
    app[ENGINE] = StubEngine(validating)  # type: ignore[misc]
    app[FRONT].wrap_routes(app)
    for route in app.router.routes():
        resource = route.resource
        if resource is not None and resource.canonical == "/v1/reservations":
            if route.method == "POST":
                return app, route.handler
    raise SystemExit("bench_layer: no POST /v1/reservations")


async def measure(n: int, rate_limit: str = "") -> dict[str, float]:
    """µs per request: ``api`` (engine stub answering at once), ``bare``, the
    difference ``layer`` and ``shed`` (a reserve answered 503 overloaded); with
    ``rate_limit``, ``limited`` (a limit per customer and per address) and
    ``ratelimit`` (its cost per request)."""
    settings = Settings()
    app, handler = _api_handler(settings, validating=False)
    bare = await _time(bare_app.reserve, _requests(bare_app.make_app(), n), 201)
    api = await _time(handler, _requests(app, n), 201)
    front = app[FRONT]
    front.limit = 0  # every reserve shed: what a 503 costs our layer (aiohttp's own aside)
    shed = await _time(handler, _requests(app, n), 503)
    front.limit = Settings().max_inflight
    result = {"api": api, "bare": bare, "layer": api - bare, "shed": shed}
    if rate_limit:
        app[RATE_LIMITS] = RateLimits(rate_limit, rate_limit)
        limited = await _time(handler, _requests(app, n), 201)
        result.update(limited=limited, ratelimit=limited - api)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000)
    args = parser.parse_args()
    result = uvloop.run(measure(args.requests, rate_limit="1000000000/second"))
    print(" ".join(f"{k}={v:.1f}us" for k, v in result.items()))


if __name__ == "__main__":
    main()
