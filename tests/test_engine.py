"""Every row of the state machine (DESIGN §3) and every refusal, on both backends."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from stock.core import keys
from stock.core.config import Settings
from stock.core.errors import (
    InsufficientStock,
    InvalidRequest,
    InvalidTransition,
    NotFound,
    OrderConflict,
    ReservationExpired,
    StaleStock,
    StoreUnavailable,
    Unavailable,
)
from stock.loops.reaper import Reaper
from stock.orders.engine import StockEngine
from stock.redis.client import connect
from tests.conftest import BUCKETS


async def counters(engine: StockEngine, sku: str) -> tuple[int, int, int]:
    c = await engine.get_stock(sku)
    return c.available, c.reserved, c.sold


async def expire_now(engine: StockEngine, order_id: str) -> None:
    """Let a 1 s reservation run out, then run one reaper pass."""
    await asyncio.sleep(1.05)
    reaper = Reaper(engine.redis, engine.settings, engine.scripts)
    for _ in range(20):
        await reaper.reap_once()
        order = await engine.get_order(order_id)
        if all(line.state == "expired" for line in order["lines"]):
            return
        await asyncio.sleep(0.05)
    raise AssertionError("reaper did not expire the reservation")


def one(sku: str = "A", qty: int = 1) -> list[dict[str, Any]]:
    return [{"sku": sku, "qty": qty}]


async def test_reserve_holds_stock(engine: StockEngine) -> None:
    await engine.set_stock("A", 10)
    result = await engine.reserve("o1", one("A", 3), ttl_s=60)
    assert (result.status, result.replay) == ("reserved", False)
    assert result.lines[0].state == "reserved"
    assert await counters(engine, "A") == (7, 3, 0)


async def test_confirm_sells_reserved(engine: StockEngine) -> None:
    await engine.set_stock("A", 10)
    await engine.reserve("o1", one("A", 3))
    result = await engine.confirm("o1")
    assert (result.status, result.replay) == ("confirmed", False)
    assert await counters(engine, "A") == (7, 0, 3)


async def test_release_returns_reserved(engine: StockEngine) -> None:
    await engine.set_stock("A", 10)
    await engine.reserve("o1", one("A", 3))
    result = await engine.release("o1")
    assert (result.status, result.replay) == ("released", False)
    assert await counters(engine, "A") == (10, 0, 0)


async def test_extend_moves_expiry_only(engine: StockEngine) -> None:
    await engine.set_stock("A", 10)
    first = await engine.reserve("o1", one("A", 3), ttl_s=10)
    extended = await engine.extend("o1", 600)
    assert extended.status == "reserved"
    assert extended.expires_ms >= first.expires_ms + 589_000
    assert await counters(engine, "A") == (7, 3, 0)
    score = await engine.redis.zscore(
        keys.due_key(keys.bucket_of("A", BUCKETS)), keys.line_member("A", "o1")
    )
    assert int(score) == extended.expires_ms


async def test_reaper_expires_and_late_confirm_reacquires(engine: StockEngine) -> None:
    await engine.set_stock("A", 10)
    await engine.reserve("o1", one("A", 3), ttl_s=1)
    await expire_now(engine, "o1")
    assert await counters(engine, "A") == (10, 0, 0)
    result = await engine.confirm("o1")
    assert result.status == "confirmed"
    assert await counters(engine, "A") == (7, 0, 3)


async def test_late_confirm_without_stock_stays_expired(engine: StockEngine) -> None:
    await engine.set_stock("A", 3)
    await engine.reserve("o1", one("A", 3), ttl_s=1)
    await expire_now(engine, "o1")
    await engine.deduct("buyer2", one("A", 2))
    with pytest.raises(ReservationExpired) as refused:
        await engine.confirm("o1")
    assert refused.value.details["available"] == 1
    order = await engine.get_order("o1")
    assert order["lines"][0].state == "expired"
    assert await counters(engine, "A") == (1, 0, 2)


async def test_deduct_sells_at_once(engine: StockEngine) -> None:
    await engine.set_stock("A", 10)
    result = await engine.deduct("d1", one("A", 4))
    assert (result.status, result.replay) == ("confirmed", False)
    assert await counters(engine, "A") == (6, 0, 4)


async def test_cancel_returns_sold(engine: StockEngine) -> None:
    await engine.set_stock("A", 10)
    await engine.deduct("d1", one("A", 4))
    result = await engine.cancel("d1")
    assert (result.status, result.replay) == ("cancelled", False)
    assert await counters(engine, "A") == (10, 0, 0)


@pytest.mark.parametrize("op", ["confirm", "release", "cancel"])
async def test_replays_change_nothing(engine: StockEngine, op: str) -> None:
    await engine.set_stock("A", 10)
    await engine.reserve("o1", one("A", 2))
    if op == "cancel":
        await engine.confirm("o1")
    first = await getattr(engine, op)("o1")
    before = await counters(engine, "A")
    again = await getattr(engine, op)("o1")
    assert again.replay and not first.replay
    assert (again.status, again.lines) == (first.status, first.lines)
    assert await counters(engine, "A") == before


async def test_reserve_and_deduct_replay_same_answer(engine: StockEngine) -> None:
    await engine.set_stock("A", 10)
    first = await engine.reserve("o1", one("A", 2))
    again = await engine.reserve("o1", one("A", 2))
    assert again.replay and again.expires_ms == first.expires_ms
    sold = await engine.deduct("d1", one("A", 1))
    resold = await engine.deduct("d1", one("A", 1))
    assert resold.replay and resold.lines == sold.lines
    assert await counters(engine, "A") == (7, 2, 1)


async def test_insufficient_names_short_items(engine: StockEngine) -> None:
    await engine.set_stock("A", 5)
    await engine.set_stock("B", 1)
    with pytest.raises(InsufficientStock) as refused:
        await engine.reserve("o1", [{"sku": "A", "qty": 5}, {"sku": "B", "qty": 2}])
    assert refused.value.details["items"] == [{"sku": "B", "available": 1}]
    assert await counters(engine, "A") == (5, 0, 0)
    with pytest.raises(NotFound):
        await engine.get_order("o1")
    # a failed reserve leaves no order: the same id may try again
    await engine.set_stock("B", 2)
    assert (await engine.reserve("o1", [{"sku": "A", "qty": 5}, {"sku": "B", "qty": 2}])).lines


async def test_unknown_sku_is_insufficient(engine: StockEngine) -> None:
    with pytest.raises(InsufficientStock) as refused:
        await engine.reserve("o1", one("NOPE"))
    assert refused.value.details["items"] == [{"sku": "NOPE", "available": 0}]
    with pytest.raises(NotFound):
        await engine.get_stock("NOPE")


@pytest.mark.parametrize(
    "other", [one("A", 3), one("B", 2), [{"sku": "A", "qty": 2}, {"sku": "B", "qty": 1}]]
)
async def test_same_order_other_items_conflicts(engine: StockEngine, other: Any) -> None:
    await engine.set_stock("A", 10)
    await engine.set_stock("B", 10)
    await engine.reserve("o1", one("A", 2))
    with pytest.raises(OrderConflict):
        await engine.reserve("o1", other)
    with pytest.raises(OrderConflict):
        await engine.deduct("o1", one("A", 2))
    assert await counters(engine, "A") == (8, 2, 0)
    assert await counters(engine, "B") == (10, 0, 0)


@pytest.mark.parametrize(
    ("setup", "op", "state"),
    [
        ("confirm", "release", "confirmed"),
        ("release", "confirm", "released"),
        ("release", "extend", "released"),
        ("confirm", "extend", "confirmed"),
        ("release", "cancel", "released"),
        ("none", "cancel", "reserved"),
        ("cancel", "confirm", "cancelled"),
        ("cancel", "release", "cancelled"),
        ("confirm", "reserve", "confirmed"),
    ],
)
async def test_invalid_transitions_name_state(
    engine: StockEngine, setup: str, op: str, state: str
) -> None:
    await engine.set_stock("A", 10)
    await engine.reserve("o1", one("A", 2))
    if setup == "cancel":
        await engine.confirm("o1")
    if setup != "none":
        await getattr(engine, setup)("o1")
    before = await counters(engine, "A")
    with pytest.raises(InvalidTransition) as refused:
        if op == "extend":
            await engine.extend("o1", 60)
        elif op == "reserve":
            await engine.reserve("o1", one("A", 2))
        else:
            await getattr(engine, op)("o1")
    assert refused.value.details["state"] == state
    assert await counters(engine, "A") == before


async def test_release_after_expiry_closes_the_line(engine: StockEngine) -> None:
    """DESIGN §3: EXPIRED -> RELEASED, no counter change; a later confirm is refused."""
    await engine.set_stock("A", 10)
    await engine.reserve("o1", one("A", 2), ttl_s=1)
    await expire_now(engine, "o1")
    assert (await engine.release("o1")).lines[0].state == "released"
    with pytest.raises(InvalidTransition) as refused:
        await engine.confirm("o1")
    assert refused.value.details["state"] == "released"
    assert (await engine.get_stock("A")).available == 10


async def test_unknown_order_is_not_found(engine: StockEngine) -> None:
    """Confirm and extend of an unknown order; release and cancel of one are a TCC
    empty rollback (tests/test_tcc.py)."""
    with pytest.raises(NotFound):
        await engine.confirm("ghost")
    with pytest.raises(NotFound):
        await engine.extend("ghost", 10)


async def test_fenced_sku_is_unavailable(engine: StockEngine) -> None:
    fence = "test@99999999999999"  # a resync's fence: token@until_ms
    await engine.set_stock("A", 10)
    await engine.reserve("o1", one("A", 2))
    await engine.redis.hset(keys.sku_key("A", BUCKETS), "fenced", fence)
    for call in (
        engine.reserve("o2", one("A")),
        engine.deduct("o3", one("A")),
        engine.confirm("o1"),
        engine.release("o1"),
        engine.extend("o1", 60),
        engine.set_stock("A", 5),
        engine.adjust("A", 1),
    ):
        with pytest.raises(Unavailable):
            await call
    await engine.redis.hdel(keys.sku_key("A", BUCKETS), "fenced")
    assert (await engine.confirm("o1")).status == "confirmed"


async def test_adjust_delta_cas_and_floor(engine: StockEngine) -> None:
    await engine.set_stock("A", 10)
    assert (await engine.adjust("A", 5, reason="restock")).available == 15
    assert (await engine.adjust("A", -3, expected_available=15)).available == 12
    with pytest.raises(StaleStock) as stale:
        await engine.adjust("A", 1, expected_available=99)
    assert stale.value.details["available"] == 12
    with pytest.raises(InsufficientStock):
        await engine.adjust("A", -13)
    assert await counters(engine, "A") == (12, 0, 0)


async def test_a_lost_adjust_reply_is_not_applied_twice(
    engine: StockEngine, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An adjust whose reply is lost (here: it ran, then the client timed out) must
    not run again by itself: redis-py's cluster client resends such a call, and a
    delta applied twice makes or loses units. The caller gets the error (503 over
    HTTP) and the counter moved once. (On standalone the auto-pipeline never
    resends: tests/test_pipeline.py.)"""
    if not settings.redis_cluster:
        pytest.skip("the reply is lost inside the cluster's per-node pipeline")
    from stock.redis.cluster_pipeline import NodePipeline

    send = NodePipeline.execute
    lost: list[Any] = []

    async def lose(reply: Any) -> Any:
        lost.append(await reply)
        raise RedisConnectionError("reply lost (injected by the test)")

    def lose_first_adjust_reply(pipe: Any, *args: Any) -> Any:
        reply = send(pipe, *args)
        if args[0] == "EVALSHA" and "LOST" in args and not lost:
            return asyncio.ensure_future(lose(reply))
        return reply

    await engine.set_stock("LOST", 10)
    monkeypatch.setattr(NodePipeline, "execute", lose_first_adjust_reply)
    with pytest.raises(StoreUnavailable) as caught:
        await engine.adjust("LOST", 5, reason="restock")
    assert isinstance(caught.value.__cause__, RedisConnectionError)
    monkeypatch.undo()
    assert lost  # the script ran on the server
    assert (await engine.get_stock("LOST")).available == 15


async def test_set_keeps_reserved_and_sold(engine: StockEngine) -> None:
    await engine.set_stock("A", 10)
    await engine.reserve("o1", one("A", 2))
    await engine.deduct("d1", one("A", 3))
    assert (await engine.set_stock("A", 100)).as_dict() == {
        "sku": "A",
        "available": 100,
        "reserved": 2,
        "sold": 3,
    }


@pytest.mark.parametrize(
    ("order_id", "items", "field"),
    [
        ("", one(), "order_id"),
        ("x" * 129, one(), "order_id"),
        ("caf\u00e9", one(), "order_id"),
        ("o", [], "items"),
        ("o", [{"sku": "A", "qty": 0}], "items[0].qty"),
        ("o", [{"sku": "A", "qty": 1_000_001}], "items[0].qty"),
        ("o", [{"sku": "A", "qty": 1.0}], "items[0].qty"),
        ("o", [{"sku": "A", "qty": True}], "items[0].qty"),
        ("o", [{"sku": "A", "qty": "1"}], "items[0].qty"),
        ("o", [{"sku": "bad sku", "qty": 1}], "items[0].sku"),
        ("o", [{"sku": "A|B", "qty": 1}], "items[0].sku"),
        ("o", [{"sku": "A" * 65, "qty": 1}], "items[0].sku"),
        ("o", [{"sku": "A", "qty": 1}, {"sku": "A", "qty": 2}], "items[1].sku"),
        ("o", [{"sku": f"S{i}", "qty": 1} for i in range(101)], "items"),
        ("o", ["A"], "items[0]"),
    ],
)
async def test_bad_arguments_never_reach_redis(
    engine: StockEngine, order_id: str, items: Any, field: str
) -> None:
    with pytest.raises(InvalidRequest) as refused:
        await engine.reserve(order_id, items)
    assert refused.value.details["field"] == field
    assert field in refused.value.message
    assert await engine.redis.dbsize() == 0


@pytest.mark.parametrize("ttl", [0, 86_401, 1.5, True])
async def test_bad_ttl_is_refused(engine: StockEngine, ttl: Any) -> None:
    with pytest.raises(InvalidRequest) as refused:
        await engine.reserve("o1", one(), ttl_s=ttl)
    assert refused.value.details["field"] == "ttl_s"


async def test_order_record_found_by_id_alone(engine: StockEngine) -> None:
    await engine.set_stock("A", 10)
    await engine.set_stock("B", 10)
    await engine.reserve("o1", [{"sku": "B", "qty": 1}, {"sku": "A", "qty": 2}])
    order = await engine.get_order("o1")
    assert order["kind"] == "reserve"
    assert {(line.sku, line.qty, line.state) for line in order["lines"]} == {
        ("A", 2, "reserved"),
        ("B", 1, "reserved"),
    }


async def test_a_redis_error_leaves_the_engine_as_store_unavailable() -> None:
    """The engine's boundary: Redis down is StoreUnavailable (503), its cause kept."""
    settings = Settings(redis_url="redis://127.0.0.1:1/0", buckets=BUCKETS)
    client = connect(settings)
    engine = StockEngine(client, settings)
    try:
        for call in (
            lambda: engine.get_stock("A"),
            lambda: engine.reserve("o1", one()),
            lambda: engine.confirm("o1"),
        ):
            with pytest.raises(StoreUnavailable) as caught:
                await call()
            assert isinstance(caught.value.__cause__, RedisError), repr(caught.value.__cause__)
            assert (caught.value.status, caught.value.code) == (503, "unavailable")
    finally:
        await client.aclose()
