"""Interleavings of one order's attempts and transitions on a Redis Cluster (issue 20):
a late copy of a committed order's reserve, a committed deduct whose settle was cut,
racing attempts of one ``order_id``, a try whose commit meets its cancel.

Faults are injected around the engine's script calls (``Hooked`` of
tests/test_cluster_orders.py) on the real 3-master cluster.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from stock.core.errors import (
    InsufficientStock,
    InvalidTransition,
    OrderConflict,
    ReservationExpired,
    Unavailable,
)
from stock.orders import cluster_transitions
from stock.orders.engine import StockEngine
from stock.redis.client import connect
from tests.conftest import flush
from tests.servers import Cluster
from tests.test_cluster_orders import (
    Hooked,
    cluster_settings,
    counters,
    expire_line,
    order_items,
    touches,
)
from tests.test_multibucket import skus_on_distinct_nodes

pytestmark = pytest.mark.faults


@pytest.fixture
async def engine(cluster: Cluster) -> AsyncIterator[StockEngine]:
    settings = cluster_settings(cluster)
    client = connect(settings)
    await flush(client)
    yield StockEngine(client, settings)
    await client.aclose()


@pytest.fixture
async def spread(engine: StockEngine) -> list[str]:
    skus = skus_on_distinct_nodes(engine.redis)
    for sku in skus:
        await engine.set_stock(sku, 5)
    return skus


@pytest.mark.parametrize("between", ["extend", "hold-undone", "none"])
async def test_a_late_copy_of_a_committed_reserve_never_undoes_its_lines(
    engine: StockEngine, spread: list[str], between: str
) -> None:
    """Reserve O (201) on two nodes, then extend it (or a refused multi-node hold); a late
    copy of the same reserve replays on group A, group B answers UNAVAILABLE (a fence):
    the copy's undo must leave O's lines, and O confirms."""
    skus = spread[:2]
    # (a line expiring within the hold is held: its tag changes, then is undone)
    await engine.reserve("late", order_items(skus), ttl_s=5 if between == "hold-undone" else 60)
    if between == "extend":
        await engine.extend("late", 120)
    elif between == "hold-undone":
        await engine.set_stock(skus[1], 0)  # not needed by a held line: it stays held
        fail: list[str] = []

        async def refuse(name: str, keys_: list[str], args: list[Any]) -> None:
            if name == "hold" and touches(skus[1], keys_) and not fail:
                fail.append(name)
                raise Unavailable("injected: fenced", sku=skus[1])

        engine.scripts = Hooked(engine.scripts, before=refuse)
        with pytest.raises(Unavailable):
            await engine.confirm("late")
        engine.scripts = engine.scripts._inner
        await engine.set_stock(skus[1], 4)
    fired: list[str] = []

    async def fence_b(name: str, keys_: list[str], args: list[Any]) -> None:
        if name == "reserve" and touches(skus[1], keys_) and not fired:
            fired.append(name)
            raise Unavailable("injected: a resync fences the SKU", sku=skus[1])

    late = StockEngine(engine.redis, engine.settings)
    late.scripts = Hooked(late.scripts, before=fence_b)  # type: ignore[assignment]
    with pytest.raises(Unavailable):
        await late.reserve("late", order_items(skus), ttl_s=60)
    assert fired
    assert await counters(engine, skus) == [(4, 1, 0)] * 2
    confirmed = await engine.confirm("late")
    assert {ln.state for ln in confirmed.lines} == {"confirmed"}
    assert await counters(engine, skus) == [(4, 0, 1)] * 2


async def test_racing_reserve_and_deduct_of_one_order_id_one_wins(
    engine: StockEngine, spread: list[str]
) -> None:
    """Pairs of a reserve and a deduct with the same ``order_id`` and item, sent at once:
    exactly one wins; a loser's 409 describes the order that exists."""
    sku = spread[0]
    await engine.set_stock(sku, 10_000)
    other = StockEngine(engine.redis, engine.settings)
    for n in range(60):
        oid = f"race-{n}"
        answers = await asyncio.gather(
            engine.reserve(oid, order_items([sku]), ttl_s=60),
            other.deduct(oid, order_items([sku])),
            return_exceptions=True,
        )
        won = [a for a in answers if not isinstance(a, BaseException)]
        lost = [a for a in answers if isinstance(a, BaseException)]
        assert len(won) == 1, (oid, answers)
        assert all(isinstance(a, OrderConflict) for a in lost), (oid, answers)
        order = await engine.get_order(oid)
        assert order["kind"] == won[0].status.replace("confirmed", "deduct").replace(
            "reserved", "reserve"
        )


async def test_racing_deducts_with_other_items_one_wins(
    engine: StockEngine, spread: list[str]
) -> None:
    """Two multi-group deducts of one ``order_id`` with other quantities, sent at once,
    each first on another node (so each holds a bucket the other needs): one wins."""
    for sku in spread:
        await engine.set_stock(sku, 10_000)

    def slow_on(sku: str) -> Any:
        slowed: set[str] = set()  # the first call of each order: they race once

        async def slow(name: str, keys_: list[str], args: list[Any]) -> None:
            if name == "reserve" and touches(sku, keys_) and args[1] not in slowed:
                slowed.add(args[1])
                await asyncio.sleep(0.05)

        return slow

    one = StockEngine(engine.redis, engine.settings)
    one.scripts = Hooked(one.scripts, before=slow_on(spread[2]))  # type: ignore[assignment]
    two = StockEngine(engine.redis, engine.settings)
    two.scripts = Hooked(two.scripts, before=slow_on(spread[0]))  # type: ignore[assignment]
    for n in range(5):
        oid = f"dd-{n}"
        answers = await asyncio.gather(
            one.deduct(oid, order_items(spread)),
            two.deduct(oid, [{"sku": s, "qty": 2} for s in spread]),
            return_exceptions=True,
        )
        won = [a for a in answers if not isinstance(a, BaseException)]
        assert len(won) == 1, (oid, answers)
        assert all(isinstance(a, OrderConflict) for a in answers if isinstance(a, BaseException))
        qty = {ln.qty for ln in won[0].lines}
        assert {ln.qty for ln in (await engine.get_order(oid))["lines"]} == qty


async def test_a_try_whose_commit_meets_its_cancel_holds_nothing_when_an_undo_call_fails(
    engine: StockEngine, spread: list[str]
) -> None:
    """TCC hanging try on a cluster: the cancel (a release of no order) lands between the
    try's group calls and its commit, and the try's first undo call on a group fails (a
    timeout): no unit stays held."""
    skus = spread[:2]
    failed: list[str] = []

    async def cancel_then_fail_undo(name: str, keys_: list[str], args: list[Any]) -> None:
        if name == "order" and args[0] == "commit":
            await engine.release("hang")
        if name == "abort" and touches(skus[1], keys_) and not failed:
            failed.append(name)
            raise ConnectionError("injected: the undo never reached Redis")

    tryer = StockEngine(engine.redis, engine.settings)
    tryer.scripts = Hooked(tryer.scripts, before=cancel_then_fail_undo)  # type: ignore[assignment]
    with pytest.raises(InvalidTransition):
        await tryer.reserve("hang", order_items(skus), ttl_s=3600)
    assert failed
    assert await counters(engine, skus) == [(5, 0, 0)] * 2


def never_on(sku: str, op: str) -> Any:
    """A hook under which every ``op`` call on ``sku``'s group is cut (never ran)."""

    async def cut(name: str, keys_: list[str], args: list[Any]) -> None:
        if name == op and touches(sku, keys_):
            raise ConnectionError(f"injected: {op} cut by the deadline")

    return cut


@pytest.mark.parametrize("stock_left", [True, False])
async def test_a_retry_of_a_half_settled_deduct_completes_or_undoes_it(
    engine: StockEngine, spread: list[str], stock_left: bool
) -> None:
    """A 2-group deduct commits, its settle confirms A, B's confirm is cut (every retry);
    B's hold runs out and the reaper expires it. A retry of the deduct completes the
    order (stock left) or undoes all of it (B's stock gone): never half sold."""
    skus = spread[:2]
    engine.core.deduct_hold_ms = 600
    first = StockEngine(engine.redis, engine.settings)
    first.core.deduct_hold_ms = 600
    first.scripts = Hooked(first.scripts, before=never_on(skus[1], "confirm"))  # type: ignore[assignment]
    with pytest.raises(Exception, match="injected"):
        await first.deduct("half", order_items(skus))
    assert await counters(engine, skus) == [(4, 0, 1), (4, 1, 0)]
    await asyncio.sleep(0.7)
    await expire_line(engine, skus[1], "half")
    if stock_left:
        result = await engine.deduct("half", order_items(skus))
        assert {ln.state for ln in result.lines} == {"confirmed"}
        assert await counters(engine, skus) == [(4, 0, 1)] * 2
    else:
        await engine.set_stock(skus[1], 0)
        with pytest.raises(InsufficientStock):
            await engine.deduct("half", order_items(skus))
        assert await counters(engine, skus) == [(5, 0, 0), (0, 0, 0)]


@pytest.mark.parametrize("stock_left", [True, False])
async def test_a_retry_of_a_half_done_confirm_completes_or_undoes_it(
    engine: StockEngine, spread: list[str], stock_left: bool, monkeypatch: Any
) -> None:
    """A multi-node confirm near its reservation's expiry: A confirmed, B's confirm cut,
    B's hold runs out (the reaper). A retry confirms all, or (B's stock gone) undoes A."""
    monkeypatch.setattr(cluster_transitions, "HOLD_MS", 500)
    skus = spread[:2]
    await engine.reserve("late-pay", order_items(skus), ttl_s=1)
    await asyncio.sleep(1.05)
    first = StockEngine(engine.redis, engine.settings)
    first.scripts = Hooked(first.scripts, before=never_on(skus[1], "confirm"))  # type: ignore[assignment]
    with pytest.raises(Exception, match="injected"):
        await first.confirm("late-pay")
    await asyncio.sleep(0.6)
    await expire_line(engine, skus[1], "late-pay")
    assert await counters(engine, skus) == [(4, 0, 1), (5, 0, 0)]
    if stock_left:
        result = await engine.confirm("late-pay")
        assert {ln.state for ln in result.lines} == {"confirmed"}
        assert await counters(engine, skus) == [(4, 0, 1)] * 2
    else:
        await engine.set_stock(skus[1], 0)
        with pytest.raises(ReservationExpired):
            await engine.confirm("late-pay")
        assert await counters(engine, skus) == [(5, 0, 0), (0, 0, 0)]


async def test_a_cancel_racing_a_single_group_deduct_is_never_not_found(
    engine: StockEngine, spread: list[str]
) -> None:
    """A single-group deduct's directory is there before its line: a cancel in between
    waits for the line (and cancels the sale) instead of answering 404."""

    async def slow_sale(name: str, keys_: list[str], args: list[Any]) -> None:
        if name == "deduct":
            await asyncio.sleep(0.1)

    buyer = StockEngine(engine.redis, engine.settings)
    buyer.scripts = Hooked(buyer.scripts, before=slow_sale)  # type: ignore[assignment]
    sale = asyncio.create_task(buyer.deduct("tcc-d", order_items(spread[:1])))
    await asyncio.sleep(0.03)
    cancelled = await engine.cancel("tcc-d")
    assert (await sale).status == "confirmed"
    assert {ln.state for ln in cancelled.lines} == {"cancelled"}
    assert await counters(engine, spread[:1]) == [(5, 0, 0)]
