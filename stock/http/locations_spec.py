"""The OpenAPI description of the location routes (DESIGN §13), merged into the
document by ``stock.app.wiring``."""

from __future__ import annotations

from typing import Any

from stock.http.openapi import (
    AMOUNT,
    COUNTERS,
    LOCATION,
    ORDER_ID,
    REASON,
    SKU,
    _json,
    _obj,
    _op,
)

ALLOCATION_BODY = _obj(
    ["strategy"],
    strategy={"type": "string", "enum": ["priority", "most_available"]},
    order={"type": "array", "items": LOCATION, "maxItems": 256},
    split={"type": "boolean"},
)
TRANSFER = _obj(
    ["transfer_id", "from", "to", "qty", "state"],  # sku: on a transfer's own answer
    sku=SKU,
    transfer_id=ORDER_ID,
    **{"from": LOCATION},
    to=LOCATION,
    qty={"type": "integer"},
    state={"type": "string", "enum": ["in_transit", "received"]},
)
TRANSFER_BODY = _obj(
    ["transfer_id", "from", "to", "qty"],
    transfer_id=ORDER_ID,
    **{"from": LOCATION},
    to=LOCATION,
    qty={"type": "integer", "minimum": 1, "maximum": 1_000_000},
    reason=REASON,
)
TRANSFERS = _obj(
    ["sku", "transfers"],
    sku=SKU,
    transfers={"type": "array", "items": {**TRANSFER, "additionalProperties": True}},
)


def _with(op: dict[str, Any], *names: str) -> dict[str, Any]:
    """``op`` with path parameters ``location`` / ``transfer_id`` after ``sku``."""
    schemas = {"location": LOCATION, "transfer_id": ORDER_ID}
    extra = [{"name": n, "in": "path", "required": True, "schema": schemas[n]} for n in names]
    return {**op, "parameters": [*op.get("parameters", []), *extra]}


def paths() -> dict[str, Any]:
    counters = {"200": _json(COUNTERS, "the SKU's totals and locations")}
    sent = {"201": _json(TRANSFER, "in transit"), "200": _json(TRANSFER, "replay")}
    allocation = {"200": _json({"type": "object"}, "the SKU's allocation strategy")}
    return {
        "/v1/stock/{sku}/locations/{location}": {
            "put": _with(_op("Set the available stock at one location", counters, [413],
                             admin=True, params=["sku"],
                             body=_obj(["available"], available=AMOUNT, reason=REASON)),
                         "location"),
        },
        "/v1/stock/{sku}/allocation": {
            "put": _op("Set a SKU's allocation strategy", allocation, [413], admin=True,
                       params=["sku"], body=ALLOCATION_BODY),
        },
        "/v1/stock/{sku}/transfers": {
            "post": _op("Send units from one location to another", sent, [409, 413],
                        admin=True, params=["sku"], body=TRANSFER_BODY),
            "get": _op("A SKU's transfers", {"200": _json(TRANSFERS, "transfers")}, [],
                       admin=True, params=["sku"]),
        },
        "/v1/stock/{sku}/transfers/{transfer_id}/receive": {
            "post": _with(_op("Receive a transfer at its destination",
                              {"200": _json(TRANSFER, "received (or a replay)")}, [404],
                              admin=True, params=["sku"]), "transfer_id"),
        },
    }  # fmt: skip
