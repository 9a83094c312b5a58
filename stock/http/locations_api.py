"""The location routes (DESIGN §13): stock per location, the allocation strategy
and transfers. All admin (added by ``stock/app/wiring.py``); ``stock/http/api.py``
adds ``locations`` to ``GET /v1/stock/{sku}``, ``location`` to adjust and
``allocations`` to order answers."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from stock.core import validate
from stock.core.errors import InvalidRequest, NotFound
from stock.http.api import ENGINE, admin, json_body, json_response, require
from stock.orders.locations import Locations


def locations(request: web.Request) -> Locations:
    return Locations(request.app[ENGINE])


def _sku(request: web.Request) -> str:
    return validate.sku(request.match_info["sku"])


def _reason(body: dict[str, Any]) -> str:
    return validate.reason(body.get("reason", ""))


async def _shards(request: web.Request, sku: str) -> int:
    """The SKU's shard count (1 for a SKU not set yet)."""
    try:
        _counters, shards = await request.app[ENGINE].stock_view(sku)
    except NotFound:
        return 1
    return shards


@admin
async def put_location(request: web.Request) -> web.Response:
    sku = _sku(request)
    where = validate.location(request.match_info["location"])
    body = await json_body(request, {"available", "reason"})
    available = validate.int_in(require(body, "available"), "available", 0, 10**12)
    if await _shards(request, sku) > 1:  # shards and locations do not compose yet
        raise InvalidRequest(
            "a sharded SKU cannot have locations yet (DESIGN §13)", field="location"
        )
    counters = await locations(request).set(sku, where, available, _reason(body))
    located = await locations(request).read(sku)
    return json_response({**counters.as_dict(), **(located or {})})


@admin
async def put_allocation(request: web.Request) -> web.Response:
    sku = _sku(request)
    body = await json_body(request, {"strategy", "order", "split"})
    strategy = require(body, "strategy")
    if "order" in body and body["order"] is None:
        raise InvalidRequest("order must be a list of locations", field="order")
    answer = await locations(request).set_allocation(
        sku, strategy, body.get("order", []), body.get("split", False)
    )
    return json_response(answer)


@admin
async def post_transfer(request: web.Request) -> web.Response:
    sku = _sku(request)
    body = await json_body(request, {"transfer_id", "from", "to", "qty", "reason"})
    answer = await locations(request).send(
        sku,
        require(body, "transfer_id"),
        require(body, "from"),
        require(body, "to"),
        require(body, "qty"),
        _reason(body),
    )
    replay = answer.pop("replay")
    return json_response(answer, 200 if replay else 201)


@admin
async def receive_transfer(request: web.Request) -> web.Response:
    sku = _sku(request)
    answer = await locations(request).receive(sku, request.match_info["transfer_id"])
    answer.pop("replay")
    return json_response(answer)


@admin
async def get_transfers(request: web.Request) -> web.Response:
    sku = _sku(request)
    return json_response({"sku": sku, "transfers": await locations(request).transfers(sku)})


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_put("/v1/stock/{sku}/locations/{location}", put_location)
    r.add_put("/v1/stock/{sku}/allocation", put_allocation)
    r.add_post("/v1/stock/{sku}/transfers", post_transfer)
    r.add_get("/v1/stock/{sku}/transfers", get_transfers)
    r.add_post("/v1/stock/{sku}/transfers/{transfer_id}/receive", receive_transfer)
