"""Webhook delivery under trouble: a receiver down for 10 s, a slow receiver next to a
fast one, a flash sale on one SKU (stock.changed coalesced), two dispatchers at once.
Receivers are real aiohttp servers on loopback."""

from __future__ import annotations

import asyncio
import itertools
import subprocess
import time
from dataclasses import replace
from typing import Any

import asyncpg
import pytest

from persist import webhooks
from persist.dispatcher import Dispatcher
from stock.app.embedded import stock_env
from stock.core.config import Settings
from stock.core.errors import StockError
from stock.orders.engine import StockEngine
from tests.conftest import BUCKETS
from tests.persist.conftest import WRITER_COMMAND
from tests.persist.receivers import Receiver, pipeline, receiving, until
from tests.servers import ServerProcess

SECRET = "another-secret"


@pytest.fixture
def settings(standalone_server: ServerProcess) -> Settings:
    return Settings(redis_url=standalone_server.url, buckets=BUCKETS)


@pytest.fixture
def hsettings(psettings: Settings) -> Settings:
    return replace(psettings, webhook_retry_base_s=0.1, webhook_timeout_s=5.0)


async def subscribe(pg: asyncpg.Connection, receiver: Receiver, *events: str) -> None:
    await webhooks.subscribe(pg, receiver.url, list(events), SECRET)


async def sell(engine: StockEngine, orders: list[str], sku: str = "A") -> None:
    for order in orders:
        await engine.deduct(order, [{"sku": sku, "qty": 1}])


def order_ids(receiver: Receiver) -> list[str]:
    return sorted(g.body["data"]["order_id"] for g in receiver.of_type("order.confirmed"))


@pytest.mark.faults
async def test_receiver_down_for_10_s_then_back_gets_everything(
    redis: Any, engine: StockEngine, hsettings: Settings, pg: asyncpg.Connection
) -> None:
    receiver = Receiver(SECRET)
    await subscribe(pg, receiver, "order.confirmed", "stock.changed")
    orders = [f"o{i}" for i in range(40)]
    await engine.set_stock("A", 100)
    async with pipeline(redis, hsettings):
        await sell(engine, orders[:20])  # nobody listens yet: connection refused
        down_until = time.monotonic() + 10
        await asyncio.sleep(1)
        await sell(engine, orders[20:])
        retried = await pg.fetchval(
            "SELECT count(*) FROM webhook_deliveries WHERE attempts > 0 AND state = 'pending'"
        )
        assert retried > 0  # tried, failed, waiting for the next try
        await asyncio.sleep(max(0.0, down_until - time.monotonic()))
        async with receiving(receiver):
            took = await until(lambda: order_ids(receiver) == sorted(orders), 30, "all 40")
            await until(
                lambda: any(g.body["data"]["seq"] == 41 for g in receiver.of_type("stock.changed")),
                10,
                "the latest counters",
            )
    # backoff from 0.1 s doubling: after 10 s down the next try is at most ~13 s in
    assert took < 15, took
    assert all(receiver.verified(g) for g in receiver.got)
    latest = [g for g in receiver.of_type("stock.changed") if g.body["data"]["seq"] == 41]
    assert latest[0].body["data"]["available"] == 60
    assert await pg.fetchval("SELECT count(*) FROM webhook_deliveries WHERE state = 'failed'") == 0


async def test_slow_receiver_does_not_hold_up_the_others(
    redis: Any, engine: StockEngine, hsettings: Settings, pg: asyncpg.Connection
) -> None:
    slow, fast = Receiver(SECRET, delay_s=4.0), Receiver(SECRET)
    await subscribe(pg, slow, "order.confirmed")
    await subscribe(pg, fast, "order.confirmed")
    orders = [f"o{i}" for i in range(30)]
    await engine.set_stock("A", 100)
    async with receiving(slow, fast), pipeline(redis, hsettings):
        started = time.monotonic()
        await sell(engine, orders)
        await until(lambda: order_ids(fast) == sorted(orders), 3, "the fast receiver's 30")
        elapsed = time.monotonic() - started
        in_flight = len(slow.got)
    # the slow one has at most 4 requests in flight (each 4 s): it is far behind
    assert in_flight <= 8, in_flight
    assert elapsed < 3, elapsed


@pytest.mark.faults
async def test_stock_changed_coalesced_under_a_flash_sale(
    redis: Any, engine: StockEngine, hsettings: Settings, pg: asyncpg.Connection
) -> None:
    """Hundreds of buyers on one SKU for ~3 s: stock.changed arrives at most once per
    second per SKU, and the last one carries the final counters."""
    receiver = Receiver(SECRET)
    await subscribe(pg, receiver, "stock.changed")
    await engine.set_stock("HOT", 100_000)
    await engine.set_stock("COLD", 5)
    sold = 0

    async def buyer(n: int, deadline: float) -> None:
        nonlocal sold
        i = 0
        while time.monotonic() < deadline:
            try:
                await engine.reserve(f"b{n}-{i}", [{"sku": "HOT", "qty": 1}])
                sold += 1
            except StockError:
                pass
            i += 1

    async with receiving(receiver), pipeline(redis, hsettings):
        deadline = time.monotonic() + 3
        await asyncio.gather(*(buyer(n, deadline) for n in range(50)))
        await engine.adjust("COLD", 1)
        final = (await engine.get_stock("HOT")).as_dict()
        await until(
            lambda: any(
                g.body["data"]["available"] == final["available"]
                for g in receiver.of_type("stock.changed")
                if g.body["data"]["sku"] == "HOT"
            ),
            10,
            "the final counters",
        )
    hot = [g for g in receiver.got if g.body["data"]["sku"] == "HOT"]
    gaps = [b.at - a.at for a, b in itertools.pairwise(hot)]
    assert sold > 1000, sold
    span = hot[-1].at - hot[0].at
    assert 2 <= len(hot) <= 1 + span, (len(hot), span)  # over a thousand changes
    assert min(gaps) >= 0.99, gaps
    seqs = [g.body["data"]["seq"] for g in hot]
    assert seqs == sorted(seqs) and seqs[-1] == sold + 1
    assert {k: hot[-1].body["data"][k] for k in final} == final
    assert [g.body["data"]["available"] for g in receiver.got if g.body["data"]["sku"] == "COLD"]


async def test_two_dispatchers_deliver_each_event_once(
    redis: Any, engine: StockEngine, hsettings: Settings, pg: asyncpg.Connection
) -> None:
    receivers = [Receiver(SECRET) for _ in range(3)]
    for r in receivers:
        await subscribe(pg, r, "order.confirmed")
    orders = [f"o{i}" for i in range(150)]
    await engine.set_stock("A", 1_000)
    async with receiving(*receivers), pipeline(redis, hsettings, dispatchers=2) as sent:
        await asyncio.gather(*(sell(engine, orders[i::10]) for i in range(10)))
        for r in receivers:
            await until(lambda r=r: len(order_ids(r)) >= len(orders), 15, "every order")
        await asyncio.sleep(0.5)  # any duplicate would have arrived by now
    for r in receivers:
        assert order_ids(r) == sorted(orders)  # each once, none twice
    assert all(d.stats.delivered > 0 for d in sent), [d.stats for d in sent]
    assert sum(d.stats.delivered for d in sent) == 3 * len(orders)


@pytest.mark.faults
async def test_dispatcher_killed_mid_send_the_event_goes_again(
    redis: Any, engine: StockEngine, hsettings: Settings, pg: asyncpg.Connection
) -> None:
    """``stock webhooks`` SIGKILLed while its request is at the receiver: the row stays
    ``sending`` until its lease (timeout + 5 s) ends, then another dispatcher sends
    the same event (same id) again: at least once."""
    receiver = Receiver(SECRET, delay_s=1.0)
    await subscribe(pg, receiver, "order.confirmed")
    env = stock_env(hsettings, STOCK_WEBHOOK_TIMEOUT_S="2")
    async with receiving(receiver), pipeline(redis, hsettings, dispatchers=0):
        child = subprocess.Popen([*WRITER_COMMAND[:-1], "webhooks"], env=env)
        try:
            await engine.set_stock("A", 5)
            await engine.deduct("o1", [{"sku": "A", "qty": 1}])
            await until(lambda: len(receiver.got) == 1, 15, "the first send")
            child.kill()
        finally:
            child.kill()
            child.wait(10)
        assert await pg.fetchval("SELECT state FROM webhook_deliveries") == "sending"
        receiver.delay_s = 0
        other = Dispatcher(hsettings, hsettings.database_url, poll_s=0.05)
        stop = asyncio.Event()
        task = asyncio.create_task(other.run(stop))
        await until(lambda: other.stats.delivered == 1, 15, "sent again")
        stop.set()
        await task
    first, again = receiver.got
    assert first.event_id == again.event_id
    assert 2 + 5 - 0.5 <= again.at - first.at <= 2 + 5 + 2, again.at - first.at
    assert await pg.fetchval("SELECT state FROM webhook_deliveries") == "delivered"
