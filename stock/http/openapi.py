"""The OpenAPI 3 description of the HTTP API, served at ``/openapi.json``."""

from __future__ import annotations

from typing import Any

from stock.core.validate import MAX_ITEMS, MAX_ORDER_ID, MAX_QTY, MAX_TTL_S

SKU = {"type": "string", "pattern": r"^[A-Za-z0-9._:-]{1,64}$"}
ORDER_ID = {"type": "string", "minLength": 1, "maxLength": MAX_ORDER_ID, "pattern": "^[ -~]+$"}
COUNT = {"type": "integer", "minimum": 0}
AMOUNT = {"type": "integer", "minimum": 0, "maximum": 10**12}
DELTA = {"type": "integer", "minimum": -(10**12), "maximum": 10**12, "not": {"enum": [0]}}
ITEM = {
    "type": "object",
    "required": ["sku", "qty"],
    "additionalProperties": False,
    "properties": {
        "sku": SKU,
        "qty": {"type": "integer", "minimum": 1, "maximum": MAX_QTY},
        "location": {
            "type": "string",
            "pattern": r"^[A-Za-z0-9._-]{1,64}$",
            "description": "served from this location or refused (a SKU with locations)",
        },
    },
}
ITEMS = {
    "type": "array",
    "minItems": 1,
    "maxItems": MAX_ITEMS,
    "uniqueItems": True,
    "items": ITEM,
    "description": "no SKU twice",
}
TTL = {"type": "integer", "minimum": 1, "maximum": MAX_TTL_S}
CUSTOMER = {**ORDER_ID, "description": "the buyer; required for a SKU with a per-customer limit"}
LIMIT = {"type": "integer", "minimum": 1, "maximum": 1_000_000, "nullable": True}
EXPIRES = {"type": "string", "format": "date-time"}
LOCATION = {"type": "string", "pattern": r"^[A-Za-z0-9._-]{1,64}$"}
REASON = {"type": "string", "maxLength": 200, "pattern": "^[^\\x00-\\x1f\\x7f-\\x9f]*$"}

ERRORS = {
    "invalid_request": 400, "unauthorized": 401, "not_found": 404, "method_not_allowed": 405,
    "insufficient_stock": 409, "order_conflict": 409, "invalid_transition": 409,
    "reservation_expired": 409, "stale_stock": 409, "limit_exceeded": 409,
    "payload_too_large": 413,
    "unavailable": 503, "overloaded": 503,
}  # fmt: skip


def _obj(required: list[str], **props: Any) -> dict[str, Any]:
    return {
        "type": "object",
        "required": required,
        "properties": props,
        "additionalProperties": False,
    }


LIMITS = _obj(["sku", "per_customer"], sku=SKU, per_customer=LIMIT)
SHARDS = {"type": "integer", "minimum": 1, "maximum": 1024}  # DESIGN §12
PLACE = _obj(
    ["available", "reserved", "sold", "in_transit"],
    available=COUNT,
    reserved=COUNT,
    sold=COUNT,
    in_transit=COUNT,
)
ALLOCATION = {
    "type": "object",
    "properties": {
        "strategy": {"type": "string", "enum": ["priority", "most_available"]},
        "order": {"type": "array", "items": {"type": "string"}},
        "split": {"type": "boolean"},
    },
}
COUNTERS = _obj(
    ["sku", "available", "reserved", "sold"],
    sku=SKU,
    available=COUNT,
    reserved=COUNT,
    sold=COUNT,
    shards=SHARDS,
    in_transit={**COUNT, "description": "a SKU with locations: units between two of them"},
    locations={"type": "object", "additionalProperties": PLACE},
    allocation=ALLOCATION,
)
ALLOCATIONS = {
    "type": "array",
    "items": _obj(["location", "qty"], location={"type": "string"}, qty={"type": "integer"}),
    "description": "a SKU with locations: where the line's units are",
}
LINE = _obj(["sku", "qty"], sku=SKU, qty={"type": "integer"}, allocations=ALLOCATIONS)
ORDER = _obj(
    ["order_id", "status", "items"],
    order_id=ORDER_ID,
    status={"type": "string"},
    expires_at={**EXPIRES, "nullable": True},
    items={"type": "array", "items": LINE},
)
ORDER_VIEW = _obj(
    ["order_id", "kind", "status", "items"],
    order_id=ORDER_ID,
    kind={"type": "string", "enum": ["reserve", "deduct"]},
    status={"type": "string"},
    items={
        "type": "array",
        "items": _obj(
            ["sku", "qty", "state"],
            sku=SKU,
            qty={"type": "integer"},
            state={"type": "string"},
            expires_at={**EXPIRES, "nullable": True},
            allocations=ALLOCATIONS,
        ),
    },
)
ERROR = {
    "type": "object",
    "required": ["error", "message"],
    "properties": {
        "error": {"type": "string", "enum": sorted(ERRORS)},
        "message": {"type": "string"},
    },
}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _op(
    summary: str,
    ok: dict[str, Any],
    codes: list[int],
    body: dict[str, Any] | None = None,
    admin: bool = False,
    params: list[str] = (),  # type: ignore[assignment]
) -> dict[str, Any]:
    responses: dict[str, Any] = {str(k): v for k, v in ok.items()}
    for code in sorted({*codes, 400, 503}):
        responses[str(code)] = _json(
            {"$ref": "#/components/schemas/Error"},
            ", ".join(sorted(c for c, s in ERRORS.items() if s == code)),
        )
    op: dict[str, Any] = {"summary": summary, "responses": responses}
    if body is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    if admin:
        op["security"] = [{"admin": []}]
        responses["401"] = _json({"$ref": "#/components/schemas/Error"}, "unauthorized")
    if params:
        schemas = {"sku": SKU, "order_id": ORDER_ID}
        op["parameters"] = [
            {"name": p, "in": "path", "required": True, "schema": schemas[p]} for p in params
        ]
    return op


def spec(extra_paths: dict[str, Any] | None = None) -> dict[str, Any]:
    """The document; ``extra_paths`` are routes the app layer adds (webhooks)."""
    return {
        "openapi": "3.0.3",
        "info": {"title": "stock", "version": "1", "description": "Inventory deduction on Redis"},
        "components": {
            "schemas": {"Error": ERROR, "Order": ORDER},
            "securitySchemes": {"admin": {"type": "http", "scheme": "bearer"}},
        },
        "paths": {**_stock_paths(), **_order_paths(), **(extra_paths or {}), **_service_paths()},
    }


def _stock_paths() -> dict[str, Any]:
    """A SKU's counters and limits, and the console's admin routes."""
    counters = {"200": _json(COUNTERS, "the SKU's counters")}
    limits = {"200": _json(LIMITS, "the SKU's per-customer limit (null: none)")}
    return {
        "/v1/stock/{sku}": {
            "get": _op("A SKU's counters", counters, [404], params=["sku"]),
            "put": _op("Set available stock", counters, [404, 413], admin=True, params=["sku"],
                       body=_obj([], available=AMOUNT, shards=SHARDS,
                                 reason=REASON)),
        },
        "/v1/stock/{sku}/adjust": {
            "post": _op("Add or take stock", counters, [409, 413], admin=True,
                        params=["sku"], body=_obj(
                            ["delta"], delta=DELTA,
                            reason=REASON,
                            expected_available={**AMOUNT, "nullable": True},
                            location=LOCATION)),
        },
        "/v1/stock/{sku}/limits": {
            "get": _op("A SKU's per-customer limit", limits, [], admin=True, params=["sku"]),
            "put": _op("Set or remove (null) a SKU's per-customer limit", limits, [404, 413],
                       admin=True, params=["sku"],
                       body=_obj(["per_customer"], per_customer=LIMIT)),
        },
        "/v1/stock/{sku}/ledger": {"get": _ledger_op()},  # the console's (stock.app.console)
        "/v1/admin/health": {"get": _health_op()},
        **{f"/v1/admin/orders/{{order_id}}/{op}": {"post": _admin_order_op(op)}
           for op in ("confirm", "release", "cancel")},
    }  # fmt: skip


def _order_paths() -> dict[str, Any]:
    """Reserve, deduct and an order's transitions."""
    order_ref, big = {"$ref": "#/components/schemas/Order"}, [409, 413]
    new_order = {"order_id": ORDER_ID, "items": ITEMS, "customer_id": CUSTOMER}
    reserved = {"201": _json(order_ref, "reserved"), "200": _json(order_ref, "replay")}
    sold = {"201": _json(order_ref, "sold"), "200": _json(order_ref, "replay")}
    done = {"200": _json(order_ref, "done (or a replay)")}
    return {
        "/v1/reservations": {
            "post": _op("Reserve stock for an order", reserved, big,
                        body=_obj(["order_id", "items"], **new_order, ttl_s=TTL)),
        },
        "/v1/reservations/{order_id}": {
            "get": _op("An order's lines", {"200": _json(ORDER_VIEW, "the order")}, [404],
                       params=["order_id"]),
        },
        "/v1/reservations/{order_id}/confirm": {
            "post": _op("Confirm (sell) a reservation", done, [404, 409],
                        params=["order_id"]),
        },
        "/v1/reservations/{order_id}/release": {
            "post": _op("Release a reservation", done, [404, 409], params=["order_id"]),
        },
        "/v1/reservations/{order_id}/extend": {
            "post": _op("Extend a reservation", done, [404, 409, 413], params=["order_id"],
                        body=_obj(["ttl_s"], ttl_s=TTL)),
        },
        "/v1/deductions": {
            "post": _op("Buy now: reserve and confirm at once", sold, big,
                        body=_obj(["order_id", "items"], **new_order)),
        },
        "/v1/orders/{order_id}/cancel": {
            "post": _op("Cancel a confirmed order", done, [404, 409], admin=True,
                        params=["order_id"]),
        },
    }  # fmt: skip


def _service_paths() -> dict[str, Any]:
    """Health, readiness, metrics, the pages and this document."""
    return {
        "/healthz": {"get": {"summary": "Liveness",
                             "responses": {"200": _json({"type": "object"}, "alive")}}},
        "/readyz": {"get": {"summary": "Readiness (Redis, PostgreSQL where the writer runs)",
                            "responses": {"200": _json({"type": "object"}, "ready"),
                                          "503": _json({"type": "object"}, "not ready")}}},
        "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {
            "200": {"description": "text", "content": {"text/plain": {"schema": {
                "type": "string"}}}}}}},
        "/console": {"get": {"summary": "The operator console (one HTML page)", "responses": {
            "200": {"description": "HTML", "content": {"text/html": {"schema": {
                "type": "string"}}}}}}},
        "/": {"get": {"summary": "An index: links to the console and the API reference",
                      "responses": {"200": {"description": "HTML", "content": {
                          "text/html": {"schema": {"type": "string"}}}}}}},
        "/docs": {"get": {"summary": "The API reference (renders this description)",
                          "responses": {"200": {"description": "HTML", "content": {
                              "text/html": {"schema": {"type": "string"}}}}}}},
        "/openapi.json": {"get": {"summary": "This description", "responses": {
            "200": _json({"type": "object"}, "OpenAPI 3")}}}
    }  # fmt: skip


LEDGER_ROW = _obj(
    ["id", "order_id", "op", "qty", "available", "reserved", "sold", "seq", "reason", "at"],
    id={"type": "integer"},
    order_id={"type": "string"},
    op={"type": "string"},
    qty={"type": "integer"},
    available={"type": "integer"},
    reserved={"type": "integer"},
    sold={"type": "integer"},
    seq={"type": "integer"},
    shard={"type": "integer", "minimum": 0},  # a sharded SKU's shard (DESIGN §12)
    reason={"type": "string"},
    at={**EXPIRES, "nullable": True},
)
LAG = {"type": "number", "minimum": 0, "nullable": True}
HEALTH = _obj(
    [
        "redis",
        "postgres",
        "expiry_lag_s",
        "flush_lag_s",
        "writer",
        "reconcile",
        "payment_probe",
        "buckets",
    ],
    redis={"type": "string"},
    postgres={"type": "string"},
    expiry_lag_s=LAG,
    flush_lag_s=LAG,
    writer={
        **_obj(["buckets", "held", "writers"], buckets=COUNT, held=COUNT, writers=COUNT),
        "nullable": True,
    },
    reconcile={
        "type": "object",
        "nullable": True,
        "description": "the last `stock reconcile`:"
        " at, at_ms, checked, drifting, drifts (the first 50 lines), whole",
    },
    payment_probe={
        "type": "object",
        "nullable": True,
        "additionalProperties": {"type": "number"},
        "description": "outcome -> count",
    },
    buckets={"type": "integer"},
)


def _ledger_op() -> dict[str, Any]:
    body = _obj(
        ["sku", "rows", "window"],
        sku=SKU,
        window={"type": "integer"},
        rows={"type": "array", "items": LEDGER_ROW},
    )
    op = _op(
        "A SKU's newest ledger rows (PostgreSQL; 404 without it)",
        {"200": _json(body, "newest first")},
        [404],
        admin=True,
        params=["sku"],
    )
    op["parameters"].append(
        {
            "name": "limit",
            "in": "query",
            "required": False,
            "schema": {"type": "integer", "minimum": 1, "maximum": 500, "default": 50},
        }
    )
    return op


def _health_op() -> dict[str, Any]:
    return _op(
        "The pipeline's health: lags, writer buckets, last reconcile, payment probe",
        {"200": _json(HEALTH, "health (a failing part is named in its field)")},
        [],
        admin=True,
    )


def _admin_order_op(op: str) -> dict[str, Any]:
    done = {"200": _json({"$ref": "#/components/schemas/Order"}, "done (or a replay)")}
    text = r"[^\x00-\x1f\x7f]*"  # no control characters, and one that is not a space
    reason = {
        "type": "string",
        "minLength": 1,
        "maxLength": 200,
        "pattern": rf"^{text}[^\x00-\x20\x7f]{text}$",
    }
    return _op(
        f"{op.capitalize()} an order with the operator's reason in the ledger (console)",
        done,
        [404, 409, 413],
        admin=True,
        params=["order_id"],
        body=_obj(["reason"], reason=reason),
    )
