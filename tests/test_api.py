"""Every route, success and error code of DESIGN §6 through aiohttp's test client."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from stock.app.wiring import create_app
from stock.core import keys
from stock.core.config import Settings
from stock.http.api import ENGINE
from stock.loops.reaper import Reaper
from tests.conftest import flush

TOKEN = "s3cret-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
async def api(settings: Settings) -> AsyncIterator[TestClient[Any, Any]]:
    app = create_app(replace(settings, admin_token=TOKEN), run_reaper=False, run_writer=False)
    async with TestClient(TestServer(app)) as client:
        await flush(app[ENGINE].redis)
        yield client


async def put_stock(api: TestClient[Any, Any], sku: str, available: int) -> None:
    response = await api.put(f"/v1/stock/{sku}", json={"available": available}, headers=ADMIN)
    assert response.status == 200, await response.text()


async def reserve(api: TestClient[Any, Any], order_id: str, items: Any, **extra: Any) -> Any:
    return await api.post("/v1/reservations", json={"order_id": order_id, "items": items, **extra})


async def test_stock_admin_and_read(api: TestClient[Any, Any]) -> None:
    assert (await api.put("/v1/stock/A", json={"available": 5})).status == 401
    wrong = {"Authorization": "Bearer nope"}
    assert (await api.put("/v1/stock/A", json={"available": 5}, headers=wrong)).status == 401
    response = await api.put("/v1/stock/A", json={"available": 5}, headers=ADMIN)
    assert await response.json() == {"sku": "A", "available": 5, "reserved": 0, "sold": 0}
    response = await api.get("/v1/stock/A")
    assert await response.json() == {"sku": "A", "available": 5, "reserved": 0, "sold": 0}
    missing = await api.get("/v1/stock/NOPE")
    assert missing.status == 404
    assert (await missing.json())["error"] == "not_found"


async def test_adjust(api: TestClient[Any, Any]) -> None:
    await put_stock(api, "A", 5)
    url = "/v1/stock/A/adjust"
    ok = await api.post(url, json={"delta": 3, "reason": "restock"}, headers=ADMIN)
    assert (await ok.json())["available"] == 8
    stale = await api.post(url, json={"delta": 1, "expected_available": 7}, headers=ADMIN)
    assert stale.status == 409
    assert await stale.json() == {
        "error": "stale_stock",
        "message": "available differs from expected_available",
        "available": 8,
    }
    short = await api.post(url, json={"delta": -9}, headers=ADMIN)
    assert (short.status, (await short.json())["error"]) == (409, "insufficient_stock")
    assert (await api.post(url, json={"delta": 1})).status == 401


async def test_reservation_lifecycle(api: TestClient[Any, Any]) -> None:
    await put_stock(api, "A", 5)
    items = [{"sku": "A", "qty": 2}]
    created = await reserve(api, "o1", items, ttl_s=60)
    assert created.status == 201
    body = await created.json()
    assert set(body) == {"order_id", "status", "expires_at", "items"}
    assert (body["status"], body["items"]) == ("reserved", items)
    assert body["expires_at"].endswith("Z")
    replay = await reserve(api, "o1", items, ttl_s=60)
    assert (replay.status, await replay.json()) == (200, body)
    view = await (await api.get("/v1/reservations/o1")).json()
    assert view["status"] == "reserved" and view["items"][0]["state"] == "reserved"
    extended = await api.post("/v1/reservations/o1/extend", json={"ttl_s": 600})
    assert extended.status == 200
    assert (await extended.json())["expires_at"] > body["expires_at"]
    confirmed = await api.post("/v1/reservations/o1/confirm")
    assert await confirmed.json() == {"order_id": "o1", "status": "confirmed", "items": items}
    assert (await api.post("/v1/reservations/o1/confirm")).status == 200
    late = await api.post("/v1/reservations/o1/release")
    assert late.status == 409
    assert (await late.json())["error"] == "invalid_transition"
    assert (await late.json())["state"] == "confirmed"
    assert (await api.post("/v1/orders/o1/cancel")).status == 401
    cancelled = await api.post("/v1/orders/o1/cancel", headers=ADMIN)
    assert (await cancelled.json())["status"] == "cancelled"
    stock = await (await api.get("/v1/stock/A")).json()
    assert stock == {"sku": "A", "available": 5, "reserved": 0, "sold": 0}


async def test_release_and_deduction(api: TestClient[Any, Any]) -> None:
    await put_stock(api, "A", 5)
    await reserve(api, "o1", [{"sku": "A", "qty": 2}])
    released = await api.post("/v1/reservations/o1/release")
    assert (await released.json())["status"] == "released"
    sold = await api.post(
        "/v1/deductions", json={"order_id": "d1", "items": [{"sku": "A", "qty": 5}]}
    )
    assert sold.status == 201
    assert (await sold.json())["status"] == "confirmed"
    again = await api.post(
        "/v1/deductions", json={"order_id": "d1", "items": [{"sku": "A", "qty": 5}]}
    )
    assert again.status == 200


async def test_order_refusals(api: TestClient[Any, Any]) -> None:
    await put_stock(api, "A", 3)
    short = await reserve(api, "o1", [{"sku": "A", "qty": 4}])
    assert short.status == 409
    body = await short.json()
    assert (body["error"], body["items"]) == ("insufficient_stock", [{"sku": "A", "available": 3}])
    await reserve(api, "o2", [{"sku": "A", "qty": 1}])
    conflict = await reserve(api, "o2", [{"sku": "A", "qty": 2}])
    assert (conflict.status, (await conflict.json())["error"]) == (409, "order_conflict")
    missing = await api.post("/v1/reservations/ghost/confirm")
    assert (missing.status, (await missing.json())["error"]) == (404, "not_found")
    assert (await api.get("/v1/reservations/ghost")).status == 404
    wrong_state = await api.post("/v1/orders/o2/cancel", headers=ADMIN)
    assert (await wrong_state.json())["state"] == "reserved"


BAD_RESERVATIONS = [
    (b"{not json", "body"),
    (b"[1, 2]", "body"),
    (b'"text"', "body"),
    (b"{}", "order_id"),
    (b'{"order_id": "o"}', "items"),
    (b'{"order_id": 7, "items": [{"sku": "A", "qty": 1}]}', "order_id"),
    (b'{"order_id": "", "items": [{"sku": "A", "qty": 1}]}', "order_id"),
    (b'{"order_id": "o", "items": []}', "items"),
    (b'{"order_id": "o", "items": {"sku": "A"}}', "items"),
    (b'{"order_id": "o", "items": [{"sku": "A", "qty": 1.0}]}', "items[0].qty"),
    (b'{"order_id": "o", "items": [{"sku": "A", "qty": "1"}]}', "items[0].qty"),
    (b'{"order_id": "o", "items": [{"sku": "A", "qty": true}]}', "items[0].qty"),
    (b'{"order_id": "o", "items": [{"sku": "A", "qty": 0}]}', "items[0].qty"),
    (b'{"order_id": "o", "items": [{"sku": "A", "qty": 1000001}]}', "items[0].qty"),
    (b'{"order_id": "o", "items": [{"sku": "A"}]}', "items[0].qty"),
    (b'{"order_id": "o", "items": [{"sku": "a b", "qty": 1}]}', "items[0].sku"),
    (b'{"order_id": "o", "items": [{"sku": 5, "qty": 1}]}', "items[0].sku"),
    (
        b'{"order_id": "o", "items": [{"sku": "A", "qty": 1}, {"sku": "A", "qty": 1}]}',
        "items[1].sku",
    ),
    (b'{"order_id": "o", "items": [{"sku": "A", "qty": 1}], "ttl_s": 0}', "ttl_s"),
    (b'{"order_id": "o", "items": [{"sku": "A", "qty": 1}], "ttl_s": 86401}', "ttl_s"),
    (b'{"order_id": "o", "items": [{"sku": "A", "qty": 1}], "ttl_s": "9"}', "ttl_s"),
    (b'{"order_id": "o", "items": [{"sku": "A", "qty": 1}], "extra": 1}', "extra"),
]


@pytest.mark.parametrize(("raw", "field"), BAD_RESERVATIONS)
async def test_bad_input_is_400_naming_field(
    api: TestClient[Any, Any], raw: bytes, field: str
) -> None:
    response = await api.post(
        "/v1/reservations", data=raw, headers={"Content-Type": "application/json"}
    )
    assert response.status == 400
    body = await response.json()
    assert body["error"] == "invalid_request"
    assert body["field"] == field
    assert field in body["message"]
    assert await api.app[ENGINE].redis.dbsize() == 0  # nothing reached Redis


async def test_other_bad_inputs(api: TestClient[Any, Any]) -> None:
    assert (await api.get("/v1/stock/bad%20sku")).status == 400
    too_long = "x" * 129
    assert (await api.post(f"/v1/reservations/{too_long}/confirm")).status == 400
    bad_ttl = await api.post("/v1/reservations/o/extend", json={"ttl_s": -1})
    assert (await bad_ttl.json())["field"] == "ttl_s"
    zero = await api.post("/v1/stock/A/adjust", json={"delta": 0}, headers=ADMIN)
    assert (await zero.json())["field"] == "delta"
    negative = await api.put("/v1/stock/A", json={"available": -1}, headers=ADMIN)
    assert (await negative.json())["field"] == "available"


async def test_payload_too_large(api: TestClient[Any, Any]) -> None:
    body = orjson.dumps({"order_id": "o", "items": [{"sku": "A", "qty": 1}], "pad": "x" * 70_000})
    response = await api.post("/v1/reservations", data=body)
    assert response.status == 413
    assert (await response.json())["error"] == "payload_too_large"


async def test_unknown_route_and_method(api: TestClient[Any, Any]) -> None:
    missing = await api.get("/v2/nothing")
    assert (missing.status, (await missing.json())["error"]) == (404, "not_found")
    wrong = await api.delete("/v1/stock/A")
    assert wrong.status == 405
    assert (await wrong.json())["error"] == "method_not_allowed"


async def test_health_metrics_openapi(api: TestClient[Any, Any]) -> None:
    assert (await api.get("/healthz")).status == 200
    ready = await api.get("/readyz")
    assert (ready.status, (await ready.json())["redis"]) == (200, "ok")
    await put_stock(api, "A", 1)
    await reserve(api, "o1", [{"sku": "A", "qty": 2}])
    text = await (await api.get("/metrics")).text()
    assert 'stock_order_outcomes_total{op="reserve",outcome="insufficient_stock"} 1.0' in text
    assert "stock_oversell_skus 0.0" in text
    assert "stock_http_request_seconds_bucket" in text
    spec = await (await api.get("/openapi.json")).json()
    assert spec["openapi"].startswith("3.")
    assert set(spec["paths"]) >= {"/v1/reservations", "/v1/deductions", "/v1/stock/{sku}"}


async def test_redis_down_is_503() -> None:
    settings = Settings(redis_url="redis://127.0.0.1:1/0", admin_token=TOKEN)
    app = create_app(settings, run_reaper=False, run_writer=False)
    async with TestClient(TestServer(app)) as client:
        response = await client.get("/v1/stock/A")
        assert response.status == 503
        body = {"error": "unavailable", "message": "stock store unavailable, retry shortly"}
        assert await response.json() == body
        response = await reserve(client, "o1", [{"sku": "A", "qty": 1}])
        assert (response.status, await response.json()) == (503, body)
        assert (await client.get("/readyz")).status == 503
        text = await (await client.get("/metrics")).text()
        assert "stock_redis_errors_total 2.0" in text


async def test_limits_routes_and_limit_exceeded(api: TestClient[Any, Any]) -> None:
    await put_stock(api, "A", 10)
    url = "/v1/stock/A/limits"
    assert (await api.get(url)).status == 401
    assert await (await api.get(url, headers=ADMIN)).json() == {"sku": "A", "per_customer": None}
    bad = await api.put(url, json={"per_customer": 0}, headers=ADMIN)
    assert bad.status == 400 and (await bad.json())["field"] == "per_customer"
    ok = await api.put(url, json={"per_customer": 2}, headers=ADMIN)
    assert await ok.json() == {"sku": "A", "per_customer": 2}
    items = [{"sku": "A", "qty": 2}]
    nobody = await reserve(api, "o1", items)
    assert nobody.status == 400 and (await nobody.json())["field"] == "customer_id"
    assert (await reserve(api, "o1", items, customer_id="c1")).status == 201
    over = await api.post(
        "/v1/deductions", json={"order_id": "o2", "items": items[:1], "customer_id": "c1"}
    )
    assert over.status == 409
    body = await over.json()
    assert body["error"] == "limit_exceeded"
    assert body["items"] == [{"sku": "A", "limit": 2, "held": 2}]
    bad_customer = await reserve(api, "o3", items, customer_id="")
    assert bad_customer.status == 400 and (await bad_customer.json())["field"] == "customer_id"
    removed = await api.put(url, json={"per_customer": None}, headers=ADMIN)
    assert await removed.json() == {"sku": "A", "per_customer": None}


# -- poison inputs (issue 12 item 4) ---------------------------------------------


@pytest.mark.parametrize("reason", ["nul\x00byte", "line\nbreak", "tab\there", "del\x7f", "c1\x85"])
async def test_control_characters_in_reason_are_400(api: TestClient[Any, Any], reason: str) -> None:
    await put_stock(api, "A", 5)
    calls = [
        ("/v1/stock/A/adjust", {"delta": 1, "reason": reason}, api.post),
        ("/v1/stock/A", {"available": 3, "reason": reason}, api.put),
    ]
    for url, body, send in calls:
        response = await send(url, json=body, headers=ADMIN)
        assert response.status == 400, (url, await response.text())
        answer = await response.json()
        assert (answer["error"], answer["field"]) == ("invalid_request", "reason")
    assert (await (await api.get("/v1/stock/A")).json())["available"] == 5


async def test_reason_of_200_printable_characters_is_fine(api: TestClient[Any, Any]) -> None:
    await put_stock(api, "A", 5)
    ok = await api.post("/v1/stock/A/adjust", json={"delta": 1, "reason": "é" * 200}, headers=ADMIN)
    assert ok.status == 200
    long = await api.post(
        "/v1/stock/A/adjust", json={"delta": 1, "reason": "x" * 201}, headers=ADMIN
    )
    assert (await long.json())["field"] == "reason"


async def test_non_utf8_authorization_is_401(api: TestClient[Any, Any]) -> None:
    """Raw bytes on the wire: aiohttp's client would send the header as UTF-8."""
    reader, writer = await asyncio.open_connection(api.host, api.port)
    body = b'{"available": 5}'
    writer.write(
        b"PUT /v1/stock/A HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\x80\r\n"
        b"Content-Type: application/json\r\nConnection: close\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    status_line = answer.split(b"\r\n", 1)[0]
    assert status_line.startswith(b"HTTP/1.1 401"), answer[:300]
    assert b'"unauthorized"' in answer


async def test_extend_never_shortens(api: TestClient[Any, Any]) -> None:
    await put_stock(api, "A", 5)
    created = await (await reserve(api, "o1", [{"sku": "A", "qty": 1}], ttl_s=600)).json()
    shorter = await api.post("/v1/reservations/o1/extend", json={"ttl_s": 5})
    assert shorter.status == 200
    assert (await shorter.json())["expires_at"] == created["expires_at"]
    view = await (await api.get("/v1/reservations/o1")).json()
    assert view["items"][0]["expires_at"] == created["expires_at"]
    longer = await api.post("/v1/reservations/o1/extend", json={"ttl_s": 900})
    assert (await longer.json())["expires_at"] > created["expires_at"]


async def test_reservation_expired_names_every_short_sku(api: TestClient[Any, Any]) -> None:
    for sku in ("A", "B", "C"):
        await put_stock(api, sku, 2)
    items = [{"sku": "A", "qty": 2}, {"sku": "B", "qty": 2}, {"sku": "C", "qty": 1}]
    assert (await reserve(api, "late", items, ttl_s=1)).status == 201
    await asyncio.sleep(1.05)
    engine = api.app[ENGINE]
    redis = engine.redis  # expire the lines now, as the reaper would
    for sku in ("A", "B", "C"):
        due = keys.due_key(keys.bucket_of(sku, engine.settings.buckets))
        await redis.zadd(due, {keys.line_member(sku, "late"): 1})
    await Reaper(redis, engine.settings).reap_once()
    for sku in ("A", "B"):  # others buy A and B meanwhile; C is still there
        assert (await reserve(api, f"other-{sku}", [{"sku": sku, "qty": 1}])).status == 201
    response = await api.post("/v1/reservations/late/confirm")
    assert response.status == 409
    body = await response.json()
    assert body["error"] == "reservation_expired"
    short = sorted(body["items"], key=lambda item: item["sku"])
    assert short == [{"sku": "A", "available": 1}, {"sku": "B", "available": 1}]
    assert "'A'" in body["message"] and "'B'" in body["message"]


async def test_readyz_reuses_one_postgres_connection(
    settings: Settings, dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncpg
    import asyncpg.connection

    opened = 0
    for module in (asyncpg, asyncpg.connection):
        real = module.connect

        async def counting(*args: Any, _real: Any = real, **kwargs: Any) -> Any:
            nonlocal opened
            opened += 1
            return await _real(*args, **kwargs)

        monkeypatch.setattr(module, "connect", counting)
    app = create_app(replace(settings, database_url=dsn), run_reaper=False, run_writer=True)
    async with TestClient(TestServer(app)) as client:
        first = await client.get("/readyz")
        assert (first.status, (await first.json())["postgres"]) == (200, "ok")
        before = opened
        for _ in range(20):
            assert (await client.get("/readyz")).status == 200
        assert opened == before, f"{opened - before} PostgreSQL connections for 20 /readyz"


async def test_release_of_an_unknown_order_is_an_empty_rollback(
    api: TestClient[Any, Any],
) -> None:
    await put_stock(api, "A", 3)
    released = await api.post("/v1/reservations/never-tried/release")
    assert released.status == 200
    assert await released.json() == {"order_id": "never-tried", "status": "released", "items": []}
    late = await reserve(api, "never-tried", [{"sku": "A", "qty": 1}])
    assert late.status == 409
    body = await late.json()
    assert (body["error"], body["state"]) == ("invalid_transition", "released")
    view = await (await api.get("/v1/reservations/never-tried")).json()
    assert (view["status"], view["items"]) == ("released", [])
