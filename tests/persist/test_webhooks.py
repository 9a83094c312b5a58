"""Webhooks (DESIGN §11) end to end: engine -> Redis -> writer -> outbox -> dispatcher ->
a real receiver on loopback. Standalone Redis only (the outbox does not depend on the
backend)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import jsonschema_rs  # (schemathesis brings it)
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from persist import webhooks
from persist.dispatcher import Dispatcher
from persist.migrate import migration_files
from stock.app.wiring import create_app
from stock.core.config import Settings
from stock.loops.reaper import Reaper
from stock.orders.engine import StockEngine
from tests.conftest import BUCKETS
from tests.persist.receivers import Receiver, pipeline, receiving, until
from tests.servers import ServerProcess

TOKEN = "hook-admin"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
SECRET = "shh-its-a-secret"


@pytest.fixture
def settings(standalone_server: ServerProcess) -> Settings:
    return Settings(redis_url=standalone_server.url, buckets=BUCKETS)


@pytest.fixture
def hsettings(psettings: Settings) -> Settings:
    """Quick retries for the tests (the product's base is 1 s)."""
    return replace(psettings, webhook_retry_base_s=0.1, webhook_timeout_s=5.0, admin_token=TOKEN)


async def subscribe(pg: asyncpg.Connection, receiver: Receiver, *events: str) -> str:
    sub = await webhooks.subscribe(pg, receiver.url, list(events or webhooks.EVENT_TYPES), SECRET)
    return str(sub["id"])


# -- the admin API ---------------------------------------------------------------


@pytest.fixture
async def api(hsettings: Settings) -> AsyncIterator[TestClient[Any, Any]]:
    app = create_app(hsettings, run_reaper=False, run_writer=False)
    async with TestClient(TestServer(app)) as client:
        yield client


async def test_subscriptions_api(api: TestClient[Any, Any]) -> None:
    body = {"url": "http://127.0.0.1:9/hook", "events": ["stock.sold_out"], "secret": "x"}
    assert (await api.post("/v1/webhooks", json=body)).status == 401
    assert (await api.get("/v1/webhooks")).status == 401
    created = await api.post("/v1/webhooks", json=body, headers=ADMIN)
    assert created.status == 201, await created.text()
    sub = await created.json()
    assert set(sub) == {"id", "url", "events"} and sub["events"] == ["stock.sold_out"]
    listed = await (await api.get("/v1/webhooks", headers=ADMIN)).json()
    assert [w["id"] for w in listed["webhooks"]] == [sub["id"]]
    assert "secret" not in listed["webhooks"][0] and "x" not in str(listed)
    deliveries = await api.get(f"/v1/webhooks/{sub['id']}/deliveries?status=failed", headers=ADMIN)
    assert (await deliveries.json()) == {"deliveries": []}
    paths = (await (await api.get("/openapi.json")).json())["paths"]
    for path, method, code, answer in [
        ("/v1/webhooks", "post", "201", sub),
        ("/v1/webhooks", "get", "200", listed),
    ]:
        schema = paths[path][method]["responses"][code]["content"]["application/json"]["schema"]
        jsonschema_rs.validate(schema, answer)
    for value in ("nope", "%C2%B2", "%FF", "%00", "", "failed%00"):
        url = f"/v1/webhooks/{sub['id']}/deliveries?status={value}"
        bad = await api.get(url, headers=ADMIN)
        body = await bad.json()
        assert (bad.status, body["error"], body["field"]) == (400, "invalid_request", "status")
    assert (await api.delete(f"/v1/webhooks/{sub['id']}", headers=ADMIN)).status == 204
    assert (await api.delete(f"/v1/webhooks/{sub['id']}", headers=ADMIN)).status == 404
    assert (await api.delete("/v1/webhooks/not-a-uuid", headers=ADMIN)).status == 404
    assert (await (await api.get("/v1/webhooks", headers=ADMIN)).json()) == {"webhooks": []}


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"url": "ftp://127.0.0.1/x"}, "url"),
        ({"url": "not a url"}, "url"),
        ({"url": 5}, "url"),
        ({"events": []}, "events"),
        ({"events": ["stock.exploded"]}, "events"),
        ({"events": ["stock.changed", "stock.changed"]}, "events"),
        ({"secret": ""}, "secret"),
        ({"secret": None}, "secret"),
        ({"extra": 1}, "extra"),
    ],
)
async def test_subscription_validation(
    api: TestClient[Any, Any], change: dict[str, Any], field: str
) -> None:
    body = {"url": "http://127.0.0.1:9/hook", "events": ["stock.changed"], "secret": "x", **change}
    response = await api.post("/v1/webhooks", json=body, headers=ADMIN)
    assert response.status == 400
    assert (await response.json())["field"] == field
    missing = await api.post("/v1/webhooks", json={"url": body["url"]}, headers=ADMIN)
    assert (await missing.json())["field"] == "events"


async def test_without_postgres_the_routes_say_so(settings: Settings) -> None:
    app = create_app(replace(settings, admin_token=TOKEN), run_reaper=False, run_writer=False)
    async with TestClient(TestServer(app)) as client:
        response = await client.get("/v1/webhooks", headers=ADMIN)
        assert response.status == 503
        assert "STOCK_DATABASE_URL" in (await response.json())["message"]
    down = replace(settings, admin_token=TOKEN, database_url="postgresql://u@127.0.0.1:1/x")
    app = create_app(down, run_reaper=False, run_writer=False)
    async with TestClient(TestServer(app)) as client:
        response = await client.get("/v1/webhooks", headers=ADMIN)
        assert (response.status, (await response.json())["error"]) == (503, "unavailable")


async def test_migrations_apply_out_of_order(dsn: str, pg: asyncpg.Connection) -> None:
    """A 0002 that arrives after 0003 was applied is still applied (no gap stops it)."""
    from persist import migrate as m

    done = [r["version"] for r in await pg.fetch("SELECT version FROM schema_migrations")]
    assert sorted(done) == [v for v, _ in migration_files()]
    late = [*migration_files(), ("0002_late", "CREATE TABLE late_one (x int)")]
    original = m.migration_files
    m.migration_files = lambda: sorted(late)  # type: ignore[assignment]
    try:
        assert await m.migrate(dsn) == ["0002_late"]
        assert await m.migrate(dsn) == []
    finally:
        m.migration_files = original  # type: ignore[assignment]


# -- deliveries ------------------------------------------------------------------


async def test_each_event_type_arrives_signed(
    redis: Any, engine: StockEngine, hsettings: Settings, pg: asyncpg.Connection
) -> None:
    receiver = Receiver(SECRET)
    await subscribe(pg, receiver)
    stop = asyncio.Event()
    reaper = asyncio.create_task(Reaper(redis, replace(hsettings, reaper_period_s=0.05)).run(stop))
    async with receiving(receiver), pipeline(redis, hsettings):
        await engine.set_stock("A", 3)  # back in stock (a new SKU counts as 0)
        await engine.reserve("o1", [{"sku": "A", "qty": 1}])
        await engine.confirm("o1")  # order.confirmed
        await engine.deduct("o2", [{"sku": "A", "qty": 1}])  # order.confirmed
        await engine.cancel("o2")  # order.cancelled
        await engine.reserve("o3", [{"sku": "A", "qty": 2}], ttl_s=1)  # sold out
        await until(lambda: bool(receiver.of_type("stock.sold_out")), 10, "sold out")
        await until(lambda: bool(receiver.of_type("reservation.expired")), 10, "expiry")
        await until(lambda: len(receiver.of_type("stock.back_in_stock")) == 2, 10, "back")
        await until(
            lambda: any(g.body["data"]["seq"] == 7 for g in receiver.of_type("stock.changed")),
            10,
            "the latest stock.changed",
        )
    stop.set()
    await reaper
    assert {g.body["type"] for g in receiver.got} == set(webhooks.EVENT_TYPES)
    assert all(receiver.verified(g) for g in receiver.got)
    assert all(g.event_id == g.body["id"] for g in receiver.got)
    assert len({g.event_id for g in receiver.got}) == len(receiver.got)
    for g in receiver.got:
        assert set(g.body) == {"id", "type", "created_at", "data"}
        assert g.body["created_at"].endswith("Z")
        datetime.fromisoformat(g.body["created_at"])
        assert {"sku", "available", "reserved", "sold", "seq"} <= set(g.body["data"])
    confirmed = sorted(g.body["data"]["order_id"] for g in receiver.of_type("order.confirmed"))
    assert confirmed == ["o1", "o2"]
    assert [g.body["data"]["order_id"] for g in receiver.of_type("order.cancelled")] == ["o2"]
    expired = receiver.of_type("reservation.expired")[0].body["data"]
    assert (expired["order_id"], expired["available"], expired["reserved"]) == ("o3", 2, 0)
    sold_out = receiver.of_type("stock.sold_out")[0].body["data"]
    assert (sold_out["available"], sold_out["reserved"], sold_out["order_id"]) == (0, 2, "o3")
    assert "order_id" not in receiver.of_type("stock.changed")[-1].body["data"]
    tampered = replace(receiver.got[0], raw=receiver.got[0].raw + b" ")
    assert not receiver.verified(tampered)


async def test_subscription_gets_only_its_types(
    redis: Any, engine: StockEngine, hsettings: Settings, pg: asyncpg.Connection
) -> None:
    confirmed, sold_out = Receiver(SECRET), Receiver(SECRET)
    confirmed_id = await subscribe(pg, confirmed, "order.confirmed")
    await subscribe(pg, sold_out, "stock.sold_out")
    async with receiving(confirmed, sold_out), pipeline(redis, hsettings):
        await engine.set_stock("A", 2)
        await engine.deduct("o1", [{"sku": "A", "qty": 1}])
        await engine.deduct("o2", [{"sku": "A", "qty": 1}])
        await until(lambda: len(confirmed.got) == 2 and len(sold_out.got) == 1, 10, "both")
        await asyncio.sleep(0.3)  # nothing else follows
    assert {g.body["type"] for g in confirmed.got} == {"order.confirmed"}
    assert [g.body["type"] for g in sold_out.got] == ["stock.sold_out"]
    assert await webhooks.unsubscribe(pg, confirmed_id)  # its outbox rows go with it
    assert await pg.fetchval("SELECT count(*) FROM webhook_deliveries") == 1


async def test_nothing_offered_for_an_event_that_never_reached_postgres(
    redis: Any, engine: StockEngine, hsettings: Settings, pg: asyncpg.Connection
) -> None:
    """The writer's batch fails after the outbox insert (a trigger refuses the ledger
    rows): the transaction rolls back, so no delivery exists and none is sent; once
    the batch goes through, each event is delivered once."""
    receiver = Receiver(SECRET)
    await subscribe(pg, receiver, "order.confirmed")
    await pg.execute(
        "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS"
        " $$ BEGIN RAISE EXCEPTION 'refused by the test'; END $$;"
        "CREATE TRIGGER refuse BEFORE INSERT ON stock_levels FOR EACH STATEMENT"
        " EXECUTE FUNCTION refuse()"
    )
    async with receiving(receiver), pipeline(redis, hsettings):
        await engine.set_stock("A", 5)
        for i in range(3):
            await engine.deduct(f"o{i}", [{"sku": "A", "qty": 1}])
        await asyncio.sleep(1.5)  # the writer tries (and fails) several times
        assert await pg.fetchval("SELECT count(*) FROM stock_ledger") == 0
        assert await pg.fetchval("SELECT count(*) FROM webhook_deliveries") == 0
        assert receiver.got == []
        await pg.execute("DROP TRIGGER refuse ON stock_levels")
        await until(lambda: len(receiver.got) == 3, 10, "the three confirmations")
        await asyncio.sleep(0.3)
    assert sorted(g.body["data"]["order_id"] for g in receiver.got) == ["o0", "o1", "o2"]


async def test_failed_after_the_retry_window(
    redis: Any, engine: StockEngine, hsettings: Settings, pg: asyncpg.Connection
) -> None:
    receiver = Receiver(SECRET, status=500)
    sub = await subscribe(pg, receiver, "order.confirmed")
    quick = replace(hsettings, webhook_retry_s=1)
    app = create_app(quick, run_reaper=False, run_writer=False)
    async with receiving(receiver), pipeline(redis, quick) as (dispatcher,):
        await engine.set_stock("A", 5)
        await engine.deduct("o1", [{"sku": "A", "qty": 1}])
        await until(lambda: dispatcher.stats.failed == 1, 10, "given up")
    assert 3 <= len(receiver.got) <= 8  # 0.1, 0.2, 0.4 s ... until the 1 s window ends
    assert len({g.event_id for g in receiver.got}) == 1  # the same event each time
    async with TestClient(TestServer(app)) as client:
        url = f"/v1/webhooks/{sub}/deliveries?status=failed"
        failed = (await (await client.get(url, headers=ADMIN)).json())["deliveries"]
    assert [(d["type"], d["state"], d["last_status"]) for d in failed] == [
        ("order.confirmed", "failed", 500)
    ]
    assert failed[0]["id"] == receiver.got[0].event_id


async def test_the_retry_window_starts_at_the_outbox_insert(
    redis: Any, hsettings: Settings, pg: asyncpg.Connection
) -> None:
    """An event the writer copies late (PostgreSQL was down for longer than the
    window) is still retried for the whole window, counted from its insert into the
    outbox, not from the event's time (README, Webhooks; issue 20 item 10b)."""
    receiver = Receiver(SECRET, status=500)
    sub = await subscribe(pg, receiver, "order.confirmed")
    await pg.execute(
        "INSERT INTO webhook_deliveries (subscription_id, type, sku, order_id, available,"
        " reserved, sold, seq, created_at) VALUES ($1, 'order.confirmed', 'A', 'old', 1, 0,"
        " 1, 1, now() - interval '2 days')",
        uuid.UUID(sub),
    )
    quick = replace(hsettings, webhook_retry_s=1)
    async with receiving(receiver), pipeline(redis, quick) as (dispatcher,):
        await until(lambda: dispatcher.stats.failed == 1, 10, "given up")
    assert len(receiver.got) >= 3  # not a single try: the day-old event had its window


async def test_served_app_dispatches_and_counts(redis: Any, hsettings: Settings) -> None:
    """The app of ``stock serve`` (writer and dispatcher inside), driven over HTTP only:
    a subscription made through the API gets the sale; one whose receiver always
    answers 500 ends failed, in the metric and the deliveries route."""
    good, bad = Receiver(SECRET), Receiver(SECRET, status=500)
    app = create_app(replace(hsettings, webhook_retry_s=1), run_reaper=False, run_writer=True)
    async with receiving(good, bad), TestClient(TestServer(app)) as client:
        ids = []
        for r in (good, bad):
            body = {"url": r.url, "events": ["order.confirmed"], "secret": SECRET}
            created = await client.post("/v1/webhooks", json=body, headers=ADMIN)
            ids.append((await created.json())["id"])
        assert (await client.put("/v1/stock/A", json={"available": 3}, headers=ADMIN)).status == 200
        sale = {"order_id": "o1", "items": [{"sku": "A", "qty": 1}]}
        assert (await client.post("/v1/deductions", json=sale)).status == 201

        async def failed() -> list[Any]:
            url = f"/v1/webhooks/{ids[1]}/deliveries?status=failed"
            return list((await (await client.get(url, headers=ADMIN)).json())["deliveries"])

        deadline = asyncio.get_running_loop().time() + 10
        while not await failed():
            assert asyncio.get_running_loop().time() < deadline, "no failed delivery"
            await asyncio.sleep(0.1)
        text = await (await client.get("/metrics")).text()
    assert [g.body["data"]["order_id"] for g in good.got] == ["o1"] and good.verified(good.got[0])
    assert len(bad.got) >= 2
    assert "stock_webhook_deliveries_total 1.0" in text
    assert "stock_webhook_deliveries_failed_total 1.0" in text


def readme_receiver() -> dict[str, Any]:
    """The receiver example of docs/console-webhooks.md, run as written (its secret swapped)."""
    readme = (Path(__file__).resolve().parents[2] / "docs" / "console-webhooks.md").read_text()
    start = readme.index("A receiver that verifies the signature")
    code = readme[readme.index("```python\n", start) + 10 : readme.index("```\n", start + 50)]
    code = code.replace('SECRET = b"s3cret"', f"SECRET = {SECRET.encode()!r}")
    scope: dict[str, Any] = {"__name__": "readme_receiver"}
    exec(compile(code, "docs/console-webhooks.md", "exec"), scope)
    return scope


async def test_readme_receiver_verifies_real_deliveries(
    redis: Any,
    engine: StockEngine,
    hsettings: Settings,
    pg: asyncpg.Connection,
    capsys: pytest.CaptureFixture[str],
) -> None:
    scope = readme_receiver()
    app = web.Application()
    app.add_routes([web.post("/hook", scope["hook"])])
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    url = str(server.make_url("/hook"))
    good = await webhooks.subscribe(pg, url, ["order.confirmed"], SECRET)
    bad = await webhooks.subscribe(pg, url, ["order.confirmed"], "not-the-secret")
    try:
        async with pipeline(redis, hsettings) as (dispatcher,):
            await engine.set_stock("A", 5)
            await engine.deduct("o1", [{"sku": "A", "qty": 1}])
            await until(
                lambda: dispatcher.stats.delivered == 1 and dispatcher.stats.retried >= 1,
                10,
                "one accepted, one refused",
            )
    finally:
        await server.close()
    states = {
        str(r["subscription_id"]): (r["state"], r["last_status"])
        for r in await pg.fetch(
            "SELECT subscription_id, state, last_status FROM webhook_deliveries"
        )
    }
    assert states[str(good["id"])] == ("delivered", 204)
    assert states[str(bad["id"])] == ("pending", 401)
    assert "order.confirmed {" in capsys.readouterr().out


async def test_cleanup_drops_old_rows_orphans_and_marks(
    hsettings: Settings, pg: asyncpg.Connection
) -> None:
    keep = await webhooks.subscribe(pg, "http://127.0.0.1:9/x", ["order.confirmed"], "s")
    await pg.execute(
        "INSERT INTO webhook_deliveries (subscription_id, type, sku, seq, available, reserved,"
        " sold, created_at,"
        " state, delivered_at, next_at) VALUES"
        " ($1, 'order.confirmed', 'A', 1, 0, 0, 0, now(), 'delivered', now() - interval '8 days',"
        "  now() - interval '8 days'),"  # old: goes
        " ($1, 'order.confirmed', 'A', 2, 0, 0, 0, now(), 'delivered', now(), now()),"  # stays
        " ($1, 'order.confirmed', 'A', 3, 0, 0, 0, now(), 'pending', NULL, now() + interval '1 h'),"
        " (gen_random_uuid(), 'order.confirmed', 'A', 4, 0, 0, 0, now(), 'pending', NULL, now())",
        uuid.UUID(keep["id"]),
    )  # the last one's subscription is gone: an orphan
    await pg.execute(
        "INSERT INTO webhook_throttle VALUES ($1, 'A', now() - interval '2 hours'),"
        " ($1, 'B', now())",
        uuid.UUID(keep["id"]),
    )
    dispatcher = Dispatcher(hsettings, hsettings.database_url)
    try:
        await dispatcher.poll()
    finally:
        await dispatcher.aclose()
    left = await pg.fetch("SELECT seq FROM webhook_deliveries ORDER BY seq")
    assert [r["seq"] for r in left] == [2, 3]
    assert [r["sku"] for r in await pg.fetch("SELECT sku FROM webhook_throttle")] == ["B"]
