"""Payment-aware expiry (DESIGN §9) against a fake payment service on loopback that
answers per order: paid, pending, unpaid, 404, slow, 500; and one that refuses."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from persist.events import decode
from stock.app.embedded import free_port
from stock.core import keys
from stock.core.config import Settings
from stock.loops.payment_probe import PaymentProbe, status_url
from stock.loops.reaper import Reaper
from stock.orders.engine import StockEngine
from tests.payment_service import PaymentService


@dataclass
class Reapers:
    reapers: list[Reaper]
    tasks: list[asyncio.Task[None]]
    stop: asyncio.Event


async def start_reapers(
    engine: StockEngine, settings: Settings, count: int = 1
) -> tuple[Reapers, list[PaymentProbe]]:
    probes = [PaymentProbe(engine, settings, CollectorRegistry()) for _ in range(count)]
    stop = asyncio.Event()
    reapers = [Reaper(engine.redis, settings, probe=p) for p in probes]
    tasks = [asyncio.create_task(r.run(stop)) for r in reapers]
    return Reapers(reapers, tasks, stop), probes


async def stop_reapers(running: Reapers, probes: list[PaymentProbe]) -> None:
    running.stop.set()
    await asyncio.gather(*running.tasks)
    for probe in probes:
        await probe.aclose()


def probe_settings(settings: Settings, url: str, grace_s: int = 600) -> Settings:
    return replace(
        settings,
        reaper_period_s=0.05,
        payment_status_url=url,
        payment_grace_s=grace_s,
        payment_probe_timeout_ms=300,
    )


async def events_of(redis: Any, settings: Settings, sku: str) -> list[tuple[str, str, str]]:
    """(op, order_id, reason) of every event of ``sku``'s bucket stream."""
    stream = keys.events_key(keys.bucket_of(sku, settings.buckets))
    out = []
    for _id, fields in await redis.xrange(stream):
        values = decode(fields)
        op, order_id, reason = values[0], values[9], values[10]
        if values[8] == sku:
            out.append((op, order_id, reason))
    return out


async def decision_lags_ms(redis: Any, settings: Settings, sku: str) -> dict[str, int]:
    """Per order: how long after its line's expiry (server time, from the event
    itself) the confirm or expire happened."""
    stream = keys.events_key(keys.bucket_of(sku, settings.buckets))
    lags = {}
    for _id, fields in await redis.xrange(stream):
        values = decode(fields)
        if values[8] == sku and values[0] in ("confirm", "expire"):
            lags[values[9]] = int(values[6]) - int(values[7])
    return lags


async def wait_for(check: Any, timeout: float) -> float:
    """Poll ``check()`` until true; returns the seconds it took, fails after ``timeout``."""
    started = time.monotonic()
    while not await check():
        assert time.monotonic() - started < timeout, "condition not met in time"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def state_of(engine: StockEngine, order_id: str) -> str:
    return str((await engine.get_order(order_id))["lines"][0].state)


def test_status_url_encodes_the_order_id() -> None:
    assert status_url("http://p/s/{order_id}?x=1", "a/b c") == "http://p/s/a%2Fb%20c?x=1"


async def test_paid_confirmed_unpaid_and_404_expired_at_expiry(
    engine: StockEngine, settings: Settings, payments: PaymentService
) -> None:
    s = probe_settings(settings, payments.url)
    await engine.set_stock("A", 10)
    payments.answers.update({"paid": "paid", "gone": "404"})
    for order_id in ("paid", "unpaid", "gone"):
        await engine.reserve(order_id, [{"sku": "A", "qty": 2}], ttl_s=1)
    running, probes = await start_reapers(engine, s)
    try:
        await asyncio.sleep(1.0)
        await wait_for(lambda: _all_decided(engine, ["paid", "unpaid", "gone"]), timeout=10.0)
    finally:
        await stop_reapers(running, probes)
    lags = await decision_lags_ms(engine.redis, settings, "A")
    assert max(lags.values()) < 1000, lags  # decided within 1 s of the expiry (server time)
    assert await state_of(engine, "paid") == "confirmed"
    assert await state_of(engine, "unpaid") == "expired"
    assert await state_of(engine, "gone") == "expired"
    stock = await engine.get_stock("A")
    assert (stock.available, stock.reserved, stock.sold) == (8, 0, 2)
    events = await events_of(engine.redis, settings, "A")
    assert ("confirm", "paid", "payment-probe") in events
    assert ("expire", "unpaid", "payment-unpaid") in events
    assert ("expire", "gone", "payment-unpaid") in events
    outcomes = probes[0].outcomes
    assert outcomes.labels("paid")._value.get() == 1
    assert outcomes.labels("unpaid")._value.get() == 2


async def _all_decided(engine: StockEngine, order_ids: list[str]) -> bool:
    states = [await state_of(engine, o) for o in order_ids]
    return "reserved" not in states


@pytest.mark.parametrize("answer", ["pending", "slow", "500"])
async def test_undecided_held_asked_again_then_grace_exhausted(
    engine: StockEngine, settings: Settings, payments: PaymentService, answer: str
) -> None:
    s = probe_settings(settings, payments.url, grace_s=4)
    await engine.set_stock("A", 5)
    payments.answers["o1"] = answer
    await engine.reserve("o1", [{"sku": "A", "qty": 3}], ttl_s=1)
    running, probes = await start_reapers(engine, s)

    async def asked_again() -> bool:
        return payments.asked["o1"] >= 2

    try:
        # asked at expiry, then again (within 2 s); still held then, well within the grace
        await wait_for(asked_again, timeout=10.0)
        assert await state_of(engine, "o1") == "reserved"
        assert (await engine.get_stock("A")).reserved == 3  # the stock is still held
        first, again = payments.asked_at["o1"][:2]
        assert again - first < 2.0 + 0.5, again - first  # the first retry within 2 s (+ a pass)
        await wait_for(lambda: _all_decided(engine, ["o1"]), timeout=10.0)
    finally:
        await stop_reapers(running, probes)
    assert await state_of(engine, "o1") == "expired"
    assert ("expire", "o1", "payment-grace-exhausted") in await events_of(
        engine.redis, settings, "A"
    )
    past_grace = (await decision_lags_ms(engine.redis, settings, "A"))["o1"] - 4000
    assert 0 <= past_grace < 1000, past_grace  # held no longer than the grace (+ a pass)
    assert (await engine.get_stock("A")).available == 5


async def test_refused_connection_holds_then_expires(
    engine: StockEngine, settings: Settings
) -> None:
    s = probe_settings(settings, f"http://127.0.0.1:{free_port()}/{{order_id}}", grace_s=2)
    await engine.set_stock("A", 1)
    await engine.reserve("o1", [{"sku": "A", "qty": 1}], ttl_s=1)
    running, probes = await start_reapers(engine, s)
    errors = probes[0].outcomes.labels("error")

    async def refused() -> bool:
        return bool(errors._value.get() >= 1)

    try:
        await wait_for(refused, timeout=10.0)  # asked at expiry: refused, so held
        assert await state_of(engine, "o1") == "reserved"
        await wait_for(lambda: _all_decided(engine, ["o1"]), timeout=10.0)
    finally:
        await stop_reapers(running, probes)
    assert await state_of(engine, "o1") == "expired"


async def test_hanging_service_never_delays_other_orders(
    engine: StockEngine, settings: Settings, payments: PaymentService
) -> None:
    s = replace(probe_settings(settings, payments.url), payment_probe_timeout_ms=5000)
    await engine.set_stock("A", 200)
    hanging = [f"hang-{i}" for i in range(100)]
    others = [f"other-{i}" for i in range(40)]
    payments.answers.update({o: "slow" for o in hanging})
    running, probes = await start_reapers(engine, s)
    try:
        for order_id in hanging:  # due first: their probes hang for 5 s each
            await engine.reserve(order_id, [{"sku": "A", "qty": 1}], ttl_s=1)
        await asyncio.sleep(0.3)
        for order_id in others:
            await engine.reserve(order_id, [{"sku": "A", "qty": 1}], ttl_s=1)
        await wait_for(lambda: _all_decided(engine, others), timeout=10.0)
    finally:
        await stop_reapers(running, probes)
    lags = await decision_lags_ms(engine.redis, settings, "A")
    worst = max(lags[o] for o in others)
    assert worst < 1000, f"other orders expired up to {worst} ms after their expiry"
    assert all([await state_of(engine, o) == "reserved" for o in hanging])


async def test_one_decision_per_line_with_several_reapers(
    engine: StockEngine, settings: Settings, payments: PaymentService
) -> None:
    s = probe_settings(settings, payments.url)
    skus = ["A", "B", "C"]
    for sku in skus:
        await engine.set_stock(sku, 100)
    orders = [f"o-{i}" for i in range(60)]
    for i, order_id in enumerate(orders):
        payments.answers[order_id] = "paid" if i % 2 else "unpaid"
        await engine.reserve(order_id, [{"sku": skus[i % 3], "qty": 1}], ttl_s=1)
    running, probes = await start_reapers(engine, s, count=3)
    try:
        await asyncio.sleep(1.0)
        await wait_for(lambda: _all_decided(engine, orders), timeout=10.0)
        await asyncio.sleep(0.5)  # room for a second, wrong decision to show
    finally:
        await stop_reapers(running, probes)
    decisions: Counter[str] = Counter()
    for sku in skus:
        for op, order_id, _reason in await events_of(engine.redis, settings, sku):
            if op in ("confirm", "expire"):
                decisions[order_id] += 1
    assert set(decisions) == set(orders)
    assert set(decisions.values()) == {1}
    for i, order_id in enumerate(orders):
        assert await state_of(engine, order_id) == ("confirmed" if i % 2 else "expired")
