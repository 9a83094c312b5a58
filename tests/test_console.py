"""The console's page and admin JSON routes (DESIGN §11) through aiohttp's test client.
The browser drives the same page in tests/test_console_browser.py."""

from __future__ import annotations

import asyncio
import io
import re
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from html.parser import HTMLParser
from typing import Any

import asyncpg
import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from persist.reconcile import reconcile
from stock.app.wiring import create_app
from stock.core import keys
from stock.core.config import Settings
from stock.http.api import ENGINE
from tests.conftest import flush
from tests.payment_service import PaymentService

TOKEN = "console-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
DATA_TEST = {  # DESIGN §11, exactly
    "token",
    "login",
    "sku-input",
    "sku-lookup",
    "sku-available",
    "sku-reserved",
    "sku-sold",
    "adjust-delta",
    "adjust-reason",
    "adjust-submit",
    "order-input",
    "order-lookup",
    "order-status",
    "order-confirm",
    "order-release",
    "health",
    "error",
}


@pytest.fixture
async def bare(settings: Settings) -> AsyncIterator[TestClient[Any, Any]]:
    """The API without PostgreSQL."""
    app = create_app(replace(settings, admin_token=TOKEN), run_reaper=False, run_writer=False)
    async with TestClient(TestServer(app)) as client:
        await flush(app[ENGINE].redis)
        yield client


@pytest.fixture
async def full(settings: Settings, dsn: str) -> AsyncIterator[TestClient[Any, Any]]:
    """The API with its reaper and writer on a fresh PostgreSQL database."""
    config = replace(
        settings,
        admin_token=TOKEN,
        database_url=dsn,
        writer_interval_ms=20,
        reaper_period_s=0.05,
    )
    app = create_app(config)
    async with TestClient(TestServer(app)) as client:
        await flush(app[ENGINE].redis)
        yield client


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.data_test: list[str] = []
        self.loads: list[str] = []
        self.inline_scripts = 0
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if found.get("data-test"):
            self.data_test.append(str(found["data-test"]))
        for name in ("src", "href"):
            if found.get(name):
                self.loads.append(str(found[name]))
        self._in_script = tag == "script"

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.inline_scripts += 1


async def test_console_page_is_self_contained(bare: TestClient[Any, Any]) -> None:
    response = await bare.get("/console")
    assert response.status == 200
    assert response.content_type == "text/html"
    assert "default-src 'self'" in response.headers["Content-Security-Policy"]
    page = _Page()
    page.feed(await response.text())
    assert DATA_TEST <= set(page.data_test)
    assert len(page.data_test) == len(set(page.data_test)), "a data-test name used twice"
    assert page.inline_scripts == 0  # the CSP forbids them
    assert page.loads and all(url.startswith("/console/") for url in page.loads), page.loads
    for url in page.loads:  # everything the page loads is served here
        asset = await bare.get(url)
        assert asset.status == 200, url
        assert asset.headers["X-Content-Type-Options"] == "nosniff"
    script = await (await bare.get("/console/console.js")).text()
    assert "sessionStorage" in script and "Bearer" in script
    assert not re.search(r"https?://", script), "the script calls out of the service"
    assert (await bare.get("/console/secret.py")).status == 404
    assert (await bare.get("/console/..%2Fapi.py")).status == 404


async def test_root_is_an_index_of_the_service(bare: TestClient[Any, Any]) -> None:
    """A browser pointed at the service finds its way: / links the console, the API
    reference and the OpenAPI document, each served here."""
    response = await bare.get("/")
    assert response.status == 200 and response.content_type == "text/html"
    page = _Page()
    page.feed(await response.text())
    assert {"/console", "/docs", "/openapi.json"} <= set(page.loads), page.loads
    assert page.inline_scripts == 0
    for url in page.loads:
        assert (await bare.get(url)).status == 200, url


async def test_docs_page_is_self_contained(bare: TestClient[Any, Any]) -> None:
    """/docs renders /openapi.json with files served by the service (no CDN)."""
    response = await bare.get("/docs")
    assert response.status == 200 and response.content_type == "text/html"
    assert "default-src 'self'" in response.headers["Content-Security-Policy"]
    page = _Page()
    page.feed(await response.text())
    assert page.inline_scripts == 0
    links = {"/", "/console", "/openapi.json"}  # its navigation
    assets = [url for url in page.loads if url not in links]
    assert assets and all(url.startswith("/docs/") for url in assets), page.loads
    for url in links:
        assert (await bare.get(url)).status == 200, url
    for url in assets:
        asset = await bare.get(url)
        assert asset.status == 200, url
        assert asset.headers["X-Content-Type-Options"] == "nosniff"
    script = await (await bare.get("/docs/docs.js")).text()
    assert "/openapi.json" in script
    assert not re.search(r"https?://", script), "the script calls out of the service"
    assert (await bare.get("/docs/secret.py")).status == 404


async def test_admin_routes_need_the_token(bare: TestClient[Any, Any]) -> None:
    for path in ("/v1/admin/health", "/v1/stock/A/ledger"):
        assert (await bare.get(path)).status == 401
        wrong = await bare.get(path, headers={"Authorization": "Bearer nope"})
        assert (wrong.status, (await wrong.json())["error"]) == (401, "unauthorized")


async def test_health_and_ledger_without_postgres(bare: TestClient[Any, Any]) -> None:
    health = await (await bare.get("/v1/admin/health", headers=ADMIN)).json()
    assert health["redis"] == "ok" and health["postgres"] == "not configured"
    assert health["expiry_lag_s"] == 0 and health["flush_lag_s"] is None
    assert health["writer"] is None and health["reconcile"] is None
    assert health["payment_probe"] is None  # no probe in this build yet
    ledger = await bare.get("/v1/stock/A/ledger", headers=ADMIN)
    assert (ledger.status, (await ledger.json())["error"]) == (404, "not_found")
    # "²" and a full-width 1 are str.isdigit(); a 5000-digit int() raises: each one a 400 too
    for bad in ("0", "501", "x", "-1", "%C2%B2", "%EF%BC%91", "9" * 5000, "%FF", "", " 5"):
        answer = await bare.get(f"/v1/stock/A/ledger?limit={bad}", headers=ADMIN)
        body = await answer.json()
        assert (answer.status, body["error"], body["field"]) == (400, "invalid_request", "limit")
    for good in ("050", "0" * 5000 + "1"):  # leading zeros: a valid limit (404: no PostgreSQL)
        answer = await bare.get(f"/v1/stock/A/ledger?limit={good}", headers=ADMIN)
        assert answer.status == 404, good[-5:]
    assert (await bare.get("/v1/stock/bad sku/ledger", headers=ADMIN)).status == 400


async def test_expiry_lag_is_read_from_redis(bare: TestClient[Any, Any]) -> None:
    """No reaper runs here: a reservation 1 s past its TTL shows as ~1 s expiry lag."""
    await bare.put("/v1/stock/A", json={"available": 5}, headers=ADMIN)
    body = {"order_id": "o1", "items": [{"sku": "A", "qty": 1}], "ttl_s": 1}
    assert (await bare.post("/v1/reservations", json=body)).status == 201
    await asyncio.sleep(2.0)
    health = await (await bare.get("/v1/admin/health", headers=ADMIN)).json()
    assert 0.9 <= health["expiry_lag_s"] <= 5.0


async def wait_for(check: Any, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value or time.monotonic() > deadline:
            return value
        await asyncio.sleep(0.05)


async def test_ledger_rows_carry_the_reason(full: TestClient[Any, Any]) -> None:
    await full.put("/v1/stock/A", json={"available": 5, "reason": "opening"}, headers=ADMIN)
    await full.put("/v1/stock/B", json={"available": 9}, headers=ADMIN)
    adjusted = await full.post(
        "/v1/stock/A/adjust", json={"delta": -2, "reason": "damaged in aisle 4"}, headers=ADMIN
    )
    assert (await adjusted.json())["available"] == 3

    async def rows() -> list[Any]:
        answer = await full.get("/v1/stock/A/ledger?limit=10", headers=ADMIN)
        assert answer.status == 200
        found: list[Any] = (await answer.json())["rows"]
        return found if len(found) == 2 else []

    newest, oldest = await wait_for(rows)
    assert (newest["reason"], newest["available"], newest["qty"]) == ("damaged in aisle 4", 3, -2)
    assert (oldest["reason"], oldest["available"]) == ("opening", 5)
    assert newest["seq"] > oldest["seq"] and newest["at"].endswith("Z")
    one = await (await full.get("/v1/stock/A/ledger?limit=1", headers=ADMIN)).json()
    assert [r["reason"] for r in one["rows"]] == ["damaged in aisle 4"]
    none = await (await full.get("/v1/stock/NOPE/ledger", headers=ADMIN)).json()
    assert none["rows"] == []


async def test_health_with_postgres(full: TestClient[Any, Any], settings: Settings) -> None:
    async def all_held() -> Any:
        body = await (await full.get("/v1/admin/health", headers=ADMIN)).json()
        return body if body["writer"]["held"] == settings.buckets else None

    health = await wait_for(all_held)
    assert health, "the writer never held every bucket"
    assert health["postgres"] == "ok" and health["writer"]["writers"] == 1
    assert 0 <= health["flush_lag_s"] < 5
    metrics = await (await full.get("/metrics")).text()
    assert f"stock_writer_buckets_held {settings.buckets}.0" in metrics
    assert f"stock_buckets {settings.buckets}.0" in metrics


async def test_flush_lag_counts_events_postgres_lacks(
    redis: Any, settings: Settings, dsn: str
) -> None:
    """With no writer running, an event left in a stream ages into flush lag."""
    app = create_app(replace(settings, admin_token=TOKEN, database_url=dsn), run_writer=False)
    async with TestClient(TestServer(app)) as api:
        await api.put("/v1/stock/A", json={"available": 5}, headers=ADMIN)
        await asyncio.sleep(1.2)
        health = await (await api.get("/v1/admin/health", headers=ADMIN)).json()
    assert health["writer"] == {"buckets": settings.buckets, "held": 0, "writers": 0}
    assert 1.0 <= health["flush_lag_s"] <= 10.0


async def test_reconcile_outcome_reaches_health_and_metrics(
    full: TestClient[Any, Any], settings: Settings, dsn: str
) -> None:
    await full.put("/v1/stock/A", json={"available": 5}, headers=ADMIN)
    engine = full.app[ENGINE]  # type: ignore[union-attr]
    conn = await asyncpg.connect(dsn)
    try:
        await wait_for(lambda: conn.fetchval("SELECT count(*) FROM stock_levels"))
    finally:
        await conn.close()
    # drift: Redis says 7, PostgreSQL 5
    await engine.redis.hset(keys.sku_key("A", settings.buckets), "available", 7)
    assert await reconcile(engine.redis, settings, dsn, None, out=io.StringIO()) == 1
    record = orjson.loads(await engine.redis.get(keys.reconcile_key()))
    assert (record["checked"], record["drifting"], record["whole"]) == (1, 1, True)
    health = await (await full.get("/v1/admin/health", headers=ADMIN)).json()
    assert health["reconcile"]["drifting"] == 1
    assert health["reconcile"]["drifts"][0].startswith("drift A: redis 7/0/0")

    async def gauge() -> bool:
        text = await (await full.get("/metrics")).text()
        return "stock_reconcile_drifting_skus 1.0" in text

    assert await wait_for(gauge, timeout=15), "the drift gauge never showed the reconcile"


async def test_health_shows_payment_probe_outcomes(
    settings: Settings,
    redis: Any,
    payments: PaymentService,
) -> None:
    """A real payment service answers one order paid and fails the other (500)."""
    payments.answers.update({"o-paid": "paid", "o-down": "500"})
    config = replace(
        settings,
        admin_token=TOKEN,
        reaper_period_s=0.05,
        payment_status_url=payments.url,
        payment_probe_timeout_ms=300,
    )
    app = create_app(config, run_writer=False)
    async with TestClient(TestServer(app)) as api:
        await api.put("/v1/stock/A", json={"available": 5}, headers=ADMIN)
        for order_id in ("o-paid", "o-down"):
            body = {"order_id": order_id, "items": [{"sku": "A", "qty": 1}], "ttl_s": 1}
            assert (await api.post("/v1/reservations", json=body)).status == 201

        async def probed() -> Any:
            health = await (await api.get("/v1/admin/health", headers=ADMIN)).json()
            outcomes = health["payment_probe"]
            return outcomes if {"paid", "error"} <= set(outcomes) else None

        outcomes = await wait_for(probed)
    assert outcomes and outcomes["paid"] == 1 and outcomes["error"] >= 1, outcomes


async def test_admin_order_actions_need_a_reason(bare: TestClient[Any, Any]) -> None:
    await bare.put("/v1/stock/A", json={"available": 5}, headers=ADMIN)
    body = {"order_id": "o1", "items": [{"sku": "A", "qty": 2}], "ttl_s": 60}
    assert (await bare.post("/v1/reservations", json=body)).status == 201
    url = "/v1/admin/orders/o1/release"
    assert (await bare.post(url, json={"reason": "x"})).status == 401
    for bad in (
        {},
        {"reason": ""},
        {"reason": "   "},
        {"reason": "a\nb"},
        {"reason": 5},
        {"reason": "r" * 201},
        {"reason": "ok", "extra": 1},
    ):
        answer = await bare.post(url, json=bad, headers=ADMIN)
        assert answer.status == 400, bad
    released = await bare.post(url, json={"reason": "customer asked"}, headers=ADMIN)
    assert (released.status, (await released.json())["status"]) == (200, "released")
    again = await bare.post(url, json={"reason": "customer asked"}, headers=ADMIN)
    assert again.status == 200  # a replay, as on the public route
    confirm = await bare.post("/v1/admin/orders/o1/confirm", json={"reason": "r"}, headers=ADMIN)
    assert (confirm.status, (await confirm.json())["error"]) == (409, "invalid_transition")
    missing = await bare.post("/v1/admin/orders/nope/confirm", json={"reason": "r"}, headers=ADMIN)
    assert missing.status == 404  # (a cancel of an unknown order is a TCC tombstone: 200)
    stock = await (await bare.get("/v1/stock/A")).json()
    assert (stock["available"], stock["reserved"]) == (5, 0)


async def test_admin_order_reasons_reach_the_ledger(full: TestClient[Any, Any]) -> None:
    await full.put("/v1/stock/A", json={"available": 5}, headers=ADMIN)
    for order_id in ("o1", "o2"):
        body = {"order_id": order_id, "items": [{"sku": "A", "qty": 1}], "ttl_s": 60}
        assert (await full.post("/v1/reservations", json=body)).status == 201
    steps = [
        ("o1", "confirm", "paid by bank transfer"),
        ("o1", "cancel", "fraud check failed"),
        ("o2", "release", "customer called"),
    ]
    for order_id, op, reason in steps:
        answer = await full.post(
            f"/v1/admin/orders/{order_id}/{op}", json={"reason": reason}, headers=ADMIN
        )
        assert answer.status == 200, await answer.text()

    async def reasons() -> dict[str, str]:
        answer = await full.get("/v1/stock/A/ledger", headers=ADMIN)
        rows = (await answer.json())["rows"]
        found = {r["op"]: r["reason"] for r in rows if r["op"] in ("confirm", "cancel", "release")}
        return found if len(found) == 3 else {}

    assert await wait_for(reasons) == {op: reason for _, op, reason in steps}
