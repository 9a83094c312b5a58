"""The bare baseline of the HTTP benchmark: aiohttp + uvloop + orjson and nothing else.

``POST /v1/reservations`` parses the same JSON body as the real route and answers
201 with a body of the same shape and size as the real one (a fixed ``expires_at``
of the same length), without validation, Redis or metrics. With ``--sold-out SKU``
a reserve of that SKU is answered 409 with the body the real API gives for a
sold-out SKU (the baseline of the sold-out fast path's row).

    python -m loadtest.bare_app --port 8099 [--sold-out SOLD-1]
"""

from __future__ import annotations

import argparse

import orjson
import uvloop
from aiohttp import web

EXPIRES_AT = "2026-01-01T00:15:00.000Z"  # the length of the real API's iso_ms()
SOLD_OUT: set[str] = set()


async def reserve(request: web.Request) -> web.Response:
    body = orjson.loads(await request.read())
    if SOLD_OUT:
        short = [item["sku"] for item in body["items"] if item["sku"] in SOLD_OUT]
        if short:
            refusal = {
                "error": "insufficient_stock",
                "message": f"not enough stock for {', '.join(short)}",
                "items": [{"sku": sku, "available": 0} for sku in short],
            }
            return web.Response(
                body=orjson.dumps(refusal), status=409, content_type="application/json"
            )
    answer = {
        "order_id": body["order_id"],
        "status": "reserved",
        "expires_at": EXPIRES_AT,
        "items": [{"sku": item["sku"], "qty": item["qty"]} for item in body["items"]],
    }
    return web.Response(body=orjson.dumps(answer), status=201, content_type="application/json")


async def healthz(request: web.Request) -> web.Response:
    return web.Response(body=b'{"status":"ok"}', content_type="application/json")


def make_app() -> web.Application:
    """The bare app: two routes, no middleware."""
    app = web.Application(client_max_size=64 * 1024)
    app.router.add_post("/v1/reservations", reserve)
    app.router.add_get("/healthz", healthz)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8099)
    parser.add_argument("--sold-out", action="append", default=[], help="answer 409 for it")
    args = parser.parse_args()
    SOLD_OUT.update(args.sold_out)
    uvloop.install()
    web.run_app(make_app(), host=args.host, port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
