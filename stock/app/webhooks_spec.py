"""The OpenAPI description of the /v1/webhooks routes (merged into ``stock.http.openapi``)."""

from __future__ import annotations

from typing import Any

from persist.webhooks import EVENT_TYPES, STATES
from stock.http.openapi import SKU, _json, _obj

EVENTS = {
    "type": "array",
    "minItems": 1,
    "uniqueItems": True,
    "items": {"type": "string", "enum": list(EVENT_TYPES)},
}
URL = {
    "type": "string",
    "minLength": 1,
    "maxLength": 2048,
    "pattern": "^https?://",
    "description": "http or https",
}
ID = {"type": "string", "format": "uuid"}
WEBHOOK = _obj(
    ["id", "url", "events"],
    id=ID,
    url=URL,
    events=EVENTS,
    created_at={"type": "string", "format": "date-time"},
)
STAMP = {"type": "string", "format": "date-time", "nullable": True}
DELIVERY = {
    "type": "object",
    "required": ["id", "type", "sku", "state", "attempts", "data"],
    "properties": {
        "id": ID,
        "type": {"type": "string", "enum": list(EVENT_TYPES)},
        "sku": SKU,
        "state": {"type": "string", "enum": list(STATES)},
        "attempts": {"type": "integer"},
        "data": {"type": "object"},
        "created_at": STAMP,
        "next_at": STAMP,
        "delivered_at": STAMP,
        "last_status": {"type": "integer", "nullable": True},
        "last_error": {"type": "string", "nullable": True},
    },
}
_ERROR = {"$ref": "#/components/schemas/Error"}


def _op(summary: str, ok: dict[str, Any], codes: list[int], **extra: Any) -> dict[str, Any]:
    responses = dict(ok)
    names = {400: "invalid_request", 401: "unauthorized", 404: "not_found",
             413: "payload_too_large", 503: "unavailable (no PostgreSQL)"}  # fmt: skip
    for code in sorted({*codes, 401, 503}):
        responses[str(code)] = _json(_ERROR, names[code])
    return {"summary": summary, "responses": responses, "security": [{"admin": []}], **extra}


def paths() -> dict[str, Any]:
    path_id = [{"name": "id", "in": "path", "required": True, "schema": ID}]
    body = _obj(
        ["url", "events", "secret"],
        url=URL,
        events=EVENTS,
        secret={"type": "string", "minLength": 1, "maxLength": 256},
    )
    status = {
        "name": "status",
        "in": "query",
        "required": False,
        "schema": {"type": "string", "enum": list(STATES)},
    }
    listed = _obj(["webhooks"], webhooks={"type": "array", "items": WEBHOOK})
    delivered = _obj(["deliveries"], deliveries={"type": "array", "items": DELIVERY})
    return {
        "/v1/webhooks": {
            "post": _op("Subscribe a URL to event types (needs PostgreSQL)",
                        {"201": _json(WEBHOOK, "the subscription (never its secret)")},
                        [400, 413],
                        requestBody={"required": True,
                                     "content": {"application/json": {"schema": body}}}),
            "get": _op("The subscriptions (never their secrets)",
                       {"200": _json(listed, "the subscriptions")}, []),
        },
        "/v1/webhooks/{id}": {
            "delete": _op("Unsubscribe (its pending deliveries go too)",
                          {"204": {"description": "deleted"}}, [404], parameters=path_id),
        },
        "/v1/webhooks/{id}/deliveries": {
            "get": _op("A subscription's latest 100 deliveries, newest first",
                       {"200": _json(delivered, "the deliveries")}, [400, 404],
                       parameters=[*path_id, status]),
        },
    }  # fmt: skip
