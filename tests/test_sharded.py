"""Sharded SKUs (DESIGN §12) on both backends: no false sold-out, one line from
several shards, limits across shards, shard counts changed under load, a mover
killed mid-move, and the ordinary transitions on a sharded SKU."""

from __future__ import annotations

import asyncio
import functools
import random
from typing import Any

import pytest

from stock.core import keys
from stock.core.errors import InsufficientStock, InvalidRequest, LimitExceeded, StockError
from stock.core.validate import Item
from stock.orders.engine import OrderResult, StockEngine

SKU = "HOT"


async def shard_levels(engine: StockEngine, sku: str = SKU) -> list[tuple[int, int, int, int]]:
    """(available, reserved, sold, moving) of every shard in the SKU's span."""
    meta = await engine.sharded.known(sku)
    span = 1 if meta is None else meta.span
    out = []
    for i in range(span):
        name = keys.shard_sku(sku, i)
        got = await engine.core.hmget(
            keys.sku_key(name, engine.settings.buckets), "available", "reserved", "sold", "moving"
        )
        out.append(tuple(int(v or 0) for v in got))
    return out  # type: ignore[return-value]


async def spread(engine: StockEngine, units: list[int], sku: str = SKU) -> None:
    """Shard i holds units[i] available, set shard by shard."""
    await engine.set_stock(sku, sum(units))
    await engine.set_shards(sku, len(units))
    for i, n in enumerate(units):
        name = keys.shard_sku(sku, i)
        bucket = keys.bucket_of(name, engine.settings.buckets)
        await engine.scripts(
            "set", [keys.sku_key_in(bucket, name), keys.events_key(bucket)], [name, n, ""]
        )


async def test_shards_on_put_and_get(engine: StockEngine) -> None:
    await engine.set_stock(SKU, 80)
    assert await engine.set_shards(SKU, 8) == 8
    stock = await engine.get_stock(SKU)
    assert (stock.available, stock.reserved, stock.sold) == (80, 0, 0)
    assert await engine.shards_of(SKU) == 8
    assert [lv[0] for lv in await shard_levels(engine)] == [10] * 8
    with pytest.raises(InvalidRequest) as bad:
        await engine.set_shards(SKU, 0)
    assert bad.value.details["field"] == "shards"
    with pytest.raises(InvalidRequest):
        await engine.set_shards(SKU, engine.settings.max_shards + 1)


async def test_every_buyer_of_the_last_units_gets_one(engine: StockEngine) -> None:
    """S units over 8 shards, exactly S concurrent one-unit buyers: all get one,
    also after releases scattered over the shards."""
    await spread(engine, [5, 0, 1, 0, 9, 2, 0, 3])  # 20 units, uneven
    buyers = [f"o-{i}" for i in range(20)]
    got = await asyncio.gather(
        *(engine.reserve(o, [{"sku": SKU, "qty": 1}]) for o in buyers), return_exceptions=True
    )
    assert [type(g).__name__ for g in got] == ["OrderResult"] * 20
    assert all(g.lines[0].sku == SKU for g in got if isinstance(g, OrderResult))
    assert (await engine.get_stock(SKU)).available == 0
    # release 7 of them (their units go back to their own shards), then 7 new buyers
    await asyncio.gather(*(engine.release(o) for o in buyers[::3]))
    again = await asyncio.gather(
        *(engine.reserve(f"n-{i}", [{"sku": SKU, "qty": 1}]) for i in range(7)),
        return_exceptions=True,
    )
    assert [type(g).__name__ for g in again] == ["OrderResult"] * 7
    with pytest.raises(InsufficientStock) as short:
        await engine.reserve("late", [{"sku": SKU, "qty": 1}])
    assert short.value.details["items"] == [{"sku": SKU, "available": 0}]
    stock = await engine.get_stock(SKU)
    assert (stock.available, stock.reserved, stock.sold) == (0, 20, 0)


async def test_one_line_from_units_spread_over_every_shard(engine: StockEngine) -> None:
    await spread(engine, [1, 2, 1, 1, 0, 3, 1, 1])  # 10 units
    result = await engine.reserve("big", [{"sku": SKU, "qty": 10}])
    assert [(ln.sku, ln.state, ln.qty) for ln in result.lines] == [(SKU, "reserved", 10)]
    stock = await engine.get_stock(SKU)
    assert (stock.available, stock.reserved) == (0, 10)
    with pytest.raises(InsufficientStock):
        await engine.reserve("more", [{"sku": SKU, "qty": 1}])
    confirmed = await engine.confirm("big")
    assert confirmed.lines[0].sku == SKU and confirmed.lines[0].state == "confirmed"
    assert (await engine.get_order("big"))["lines"][0].sku == SKU


async def test_a_customer_limit_holds_across_shards(engine: StockEngine) -> None:
    """200 concurrent orders of one customer against a limit of 2: exactly 2 held."""
    await engine.set_stock(SKU, 400)
    await engine.set_shards(SKU, 8)
    await engine.set_limit(SKU, 2)
    got = await asyncio.gather(
        *(
            engine.reserve(f"c-{i}", [{"sku": SKU, "qty": 1}], customer_id="alice")
            for i in range(200)
        ),
        return_exceptions=True,
    )
    won = [g for g in got if isinstance(g, OrderResult)]
    assert len(won) == 2
    assert all(isinstance(g, LimitExceeded) for g in got if not isinstance(g, OrderResult))
    stock = await engine.get_stock(SKU)
    assert (stock.available, stock.reserved) == (398, 2)
    # another customer is not held back, wherever its home is
    assert (await engine.reserve("bob-1", [{"sku": SKU, "qty": 2}], customer_id="bob")).lines


async def test_sharded_lines_behave_as_ordinary_ones(engine: StockEngine) -> None:
    """Deduct, cancel, extend, a TCC tombstone and a late confirm on a sharded SKU."""
    await spread(engine, [2, 0, 0, 1])
    d = await engine.deduct("d1", [{"sku": SKU, "qty": 3}])
    assert (d.status, d.lines[0].sku) == ("confirmed", SKU)
    assert (await engine.deduct("d1", [{"sku": SKU, "qty": 3}])).replay
    await engine.cancel("d1")
    r = await engine.reserve("r1", [{"sku": SKU, "qty": 2}], ttl_s=60)
    e = await engine.extend("r1", 120)
    assert e.expires_ms > r.expires_ms and e.lines[0].sku == SKU
    tomb = await engine.release("never")
    assert tomb.lines == [] and tomb.status == "released"
    stock = await engine.get_stock(SKU)
    assert (stock.available, stock.reserved, stock.sold) == (1, 2, 0)


async def test_shard_count_changes_under_load(engine: StockEngine) -> None:
    """1 -> 8 -> 3 -> 1 -> 5 while 20 clients reserve, confirm and release: no unit
    made or lost, every order in the state its answers said."""
    total = 300
    await engine.set_stock(SKU, total)
    rng = random.Random(5)
    said: dict[str, str] = {}
    stop = asyncio.Event()

    async def client(c: int) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            oid = f"k{c}-{n}"
            try:
                await engine.reserve(oid, [{"sku": SKU, "qty": rng.randint(1, 3)}])
            except InsufficientStock:
                said[oid] = "refused"
                continue
            said[oid] = "reserved"
            step = rng.random()
            if step < 0.4:
                await engine.confirm(oid)
                said[oid] = "confirmed"
            elif step < 0.8:
                await engine.release(oid)
                said[oid] = "released"

    async def reshard() -> None:
        for k in (8, 3, 1, 5):
            await asyncio.sleep(0.3)
            await engine.set_shards(SKU, k)
        await asyncio.sleep(0.3)
        stop.set()

    await asyncio.gather(reshard(), *(client(c) for c in range(20)))
    assert await engine.shards_of(SKU) == 5
    levels = await shard_levels(engine)
    assert sum(a + r + s + m for a, r, s, m in levels) == total, levels
    held = {"reserved": 0, "confirmed": 0}
    for oid, state in said.items():
        if state == "refused":
            continue
        order = await engine.get_order(oid)
        assert order["lines"][0].sku == SKU
        assert order["lines"][0].state == state, (oid, order)
        if state in held:
            held[state] += order["lines"][0].qty
    stock = await engine.get_stock(SKU)
    assert (stock.reserved, stock.sold) == (held["reserved"], held["confirmed"])
    assert sum(n > 0 for n, *_ in levels[5:]) == 0  # shards past 5 were emptied


async def test_a_move_cut_after_its_debit_is_finished(engine: StockEngine) -> None:
    """A mover that dies between its debit and its credit leaves the units in flight:
    they count as available, a sold-out is not answered over them, and recovery
    lands them exactly once."""
    await spread(engine, [0, 4])
    moves = engine.sharded.moves
    name, skey, events = moves._shard_keys(SKU, 1)
    reply = await engine.scripts(
        "shard_move",
        [skey, events, keys.moves_key(SKU, 1, engine.settings.buckets)],
        ["out", "m1", 4, 0, name],
    )
    assert reply == ["OK", 4]
    assert (await engine.get_stock(SKU)).available == 4
    assert await moves.recover(SKU, 2, stale_ms=0) == 1
    assert await moves.recover(SKU, 2, stale_ms=0) == 0
    await moves.finish(SKU, 1, 0, "m1", 4)  # a late copy of the dead mover's credit
    assert await shard_levels(engine) == [(4, 0, 0, 0), (0, 0, 0, 0)]


async def test_a_sold_out_answer_needs_two_equal_collects(
    engine: StockEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A unit released into a shard already read while the last one was taken from a
    shard not yet read: the first collect sees none, the second differs."""
    await spread(engine, [1, 0, 0, 0])
    await engine.reserve("holder", [{"sku": SKU, "qty": 1}])
    moves = engine.sharded.moves
    real = moves.collect
    calls = 0

    async def racing(sku: str, span: int) -> Any:
        nonlocal calls
        calls += 1
        snap = await real(sku, span)
        if calls == 1:  # after the first collect: the holder releases
            await engine.release("holder")
        return snap

    monkeypatch.setattr(moves, "collect", racing)
    assert await moves.proven_short(SKU, 4, 1) is None


def _kinds(got: list[Any]) -> list[str]:
    return [type(g).__name__ for g in got if isinstance(g, StockError | OrderResult)]


class Counted:
    """An engine core's scripts, each call's name noted."""

    def __init__(self, inner: Any) -> None:
        self._inner, self.calls = inner, []  # type: list[str]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def __call__(self, name: str, keys_: Any, args: Any, **kw: Any) -> Any:
        self.calls.append(name)
        return await self._inner(name, keys_, args, **kw)


async def test_a_single_item_order_served_at_home_is_one_script_call(
    engine: StockEngine,
) -> None:
    """DESIGN §12 Cost: one script call (on a cluster the directory is a plain SET NX
    GET); a replay too; confirm and release still find the order from its id."""
    await engine.set_stock(SKU, 800)
    await engine.set_shards(SKU, 8)
    counted = engine.core.scripts = Counted(engine.core.scripts)
    for i in range(20):
        await engine.reserve(f"one-{i}", [{"sku": SKU, "qty": 1}])
    assert counted.calls == ["reserve"] * 20
    counted.calls.clear()
    assert (await engine.reserve("one-0", [{"sku": SKU, "qty": 1}])).replay
    assert counted.calls == ["reserve"]
    counted.calls.clear()
    assert (await engine.confirm("one-1")).lines[0].sku == SKU
    assert (await engine.release("one-2")).lines[0].sku == SKU
    assert counted.calls.count("confirm") == 1 and counted.calls.count("release") == 1


async def test_the_rebalancer_spreads_units_and_lands_dead_moves(
    engine: StockEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    await spread(engine, [0, 0, 40, 0])
    name, skey, events = engine.sharded.moves._shard_keys(SKU, 2)
    moves = keys.moves_key(SKU, 2, engine.settings.buckets)
    await engine.scripts("shard_move", [skey, events, moves], ["out", "dead", 8, 1, name])
    monkeypatch.setattr("stock.orders.shard_moves.STALE_MS", 0)
    stop = asyncio.Event()
    loop = asyncio.create_task(engine.sharded.run(stop, period_s=0.05))
    await asyncio.sleep(0.3)
    stop.set()
    await loop
    assert await shard_levels(engine) == [(10, 0, 0, 0)] * 4


@pytest.mark.parametrize("op", ["reserve", "deduct"])
async def test_flash_sale_on_a_sharded_sku_sells_exactly_the_stock(
    engine: StockEngine, op: str
) -> None:
    """500 buyers of one unit, 100 units over 8 shards, a third of the requests sent
    2 or 3 times at once: exactly 100 orders win, the copies of one request agree."""
    await engine.set_stock(SKU, 100)
    await engine.set_shards(SKU, 8)
    rng = random.Random(3)
    buy = engine.deduct if op == "deduct" else engine.reserve
    copies = {f"b-{i}": rng.choice([1, 1, 2, 3]) for i in range(500)}
    requests = [o for o, n in copies.items() for _ in range(n)]
    rng.shuffle(requests)
    answers = await asyncio.gather(
        *(buy(o, [{"sku": SKU, "qty": 1}]) for o in requests), return_exceptions=True
    )
    by_order: dict[str, set[str]] = {}
    for o, answer in zip(requests, answers, strict=True):
        assert isinstance(answer, OrderResult | InsufficientStock), answer
        by_order.setdefault(o, set()).add(type(answer).__name__)
    assert all(len(kinds) == 1 for kinds in by_order.values())
    assert sum(kinds == {"OrderResult"} for kinds in by_order.values()) == 100
    stock = await engine.get_stock(SKU)
    assert (stock.available, stock.reserved + stock.sold) == (0, 100)


@pytest.mark.parametrize("settings", ["cluster"], indirect=True)
async def test_orders_spread_evenly_over_the_masters(engine: StockEngine) -> None:
    """9 shards on 3 masters fall 4/3/2 or so; the orders still go a third to each."""
    await engine.set_stock(SKU, 900)
    await engine.set_shards(SKU, 9)
    per_master: dict[str, int] = {}
    for i in range(3000):
        (item,) = engine.sharded.route([Item(SKU, 1)], f"o-{i}", "")
        node = engine.redis.get_node_from_key(keys.sku_key(item.sku, engine.settings.buckets))
        per_master[node.name] = per_master.get(node.name, 0) + 1
    assert len(per_master) == 3
    assert max(per_master.values()) / 3000 < 0.36, per_master


async def test_errors_name_the_sku_not_its_shard(engine: StockEngine) -> None:
    await spread(engine, [0, 3])
    await engine.set_limit(SKU, 1)
    await engine.reserve("c-1", [{"sku": SKU, "qty": 1}], customer_id="carol")
    with pytest.raises(LimitExceeded) as over:
        await engine.reserve("c-2", [{"sku": SKU, "qty": 1}], customer_id="carol")
    assert "#" not in over.value.message and over.value.details["items"][0]["sku"] == SKU
    await engine.confirm("c-1")
    with pytest.raises(StockError) as wrong:
        await engine.release("c-1")
    assert "#" not in wrong.value.message and wrong.value.details["sku"] == SKU


async def test_a_concurrent_mix_with_copies_expiry_and_resharding(
    engine: StockEngine, settings: Any
) -> None:
    """Every operation at once on a sharded SKU, a third of them sent twice at once
    (a client retrying), 1 s reservations expired by a reaper, k changed 8 -> 2 -> 6:
    the copies of a request agree, each order ends in a state its answers allow,
    the counters are the sum of the lines, and no unit is made or lost."""
    from stock.loops.reaper import Reaper

    total = 200
    await engine.set_stock(SKU, total)
    await engine.set_shards(SKU, 8)
    rng = random.Random(11)
    said: dict[str, list[str]] = {}
    stop = asyncio.Event()

    async def twice(call: Any) -> Any:
        """The call, sent once or twice at once: the copies agree, except that a copy
        proven short may be refused while units released meanwhile serve the other
        (as on an ordinary SKU when the copies run a moment apart)."""
        copies = await asyncio.gather(
            *(call() for _ in range(rng.choice([1, 1, 2]))), return_exceptions=True
        )
        names = {type(c).__name__ for c in copies}
        assert len(names) == 1 or names == {"InsufficientStock", "OrderResult"}, copies
        return next((c for c in copies if isinstance(c, OrderResult)), copies[0])

    async def client(c: int) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            oid, qty = f"m{c}-{n}", rng.randint(1, 4)
            buy = engine.deduct if rng.random() < 0.3 else engine.reserve
            kw: dict[str, Any] = {} if buy == engine.deduct else {"ttl_s": rng.choice([1, 60])}
            got = await twice(functools.partial(buy, oid, [{"sku": SKU, "qty": qty}], **kw))
            said[oid] = [type(got).__name__ if isinstance(got, Exception) else got.status]
            if isinstance(got, Exception):
                assert isinstance(got, InsufficientStock), got
                continue
            op = rng.choice(["confirm", "release", "extend", "cancel", "none"])
            if op == "none":
                continue
            call = getattr(engine, op)
            args = (oid, 60) if op == "extend" else (oid,)
            after = await twice(functools.partial(call, *args))
            said[oid].append(type(after).__name__ if isinstance(after, Exception) else after.status)

    async def reshard() -> None:
        for k in (2, 6):
            await asyncio.sleep(0.7)
            await engine.set_shards(SKU, k)
        await asyncio.sleep(0.7)
        stop.set()

    await asyncio.gather(reshard(), reap_until(engine, settings, stop), *map(client, range(12)))
    await asyncio.sleep(1.1)
    await Reaper(engine.redis, settings).reap_once()
    await check_orders(engine, said, total)


async def reap_until(engine: StockEngine, settings: Any, stop: asyncio.Event) -> None:
    from stock.loops.reaper import Reaper

    reaper = Reaper(engine.redis, settings)
    while not stop.is_set():
        await reaper.reap_once()
        await asyncio.sleep(0.05)


async def check_orders(engine: StockEngine, said: dict[str, list[str]], total: int) -> None:
    """Each order in a state its answers allow, counters = the lines, no unit lost."""
    reserved = sold = 0
    for oid, answers in said.items():
        if answers[0] == "InsufficientStock":
            continue
        (line,) = (await engine.get_order(oid))["lines"]
        assert line.sku == SKU
        if line.state == "reserved":
            reserved += line.qty
        elif line.state == "confirmed":
            sold += line.qty
        last = answers[-1]
        allowed = {
            "reserved": {"reserved", "expired"},  # a 60 s hold, or a 1 s one expired
            "confirmed": {"confirmed"},
            "released": {"released"},
            "cancelled": {"cancelled"},
        }.get(last, {"expired", "confirmed", "reserved"})  # a refused step: as before it
        assert line.state in allowed, (oid, answers, line)
    stock = await engine.get_stock(SKU)
    assert (stock.reserved, stock.sold) == (reserved, sold)
    levels = await shard_levels(engine)
    assert sum(a + r + s + m for a, r, s, m in levels) == total, levels


async def test_a_late_confirm_pulls_units_from_other_shards(
    engine: StockEngine, settings: Any
) -> None:
    """EXPIRED -> CONFIRMED takes its units from wherever they are now; with none
    left anywhere it is reservation_expired, naming the SKU."""
    from stock.core.errors import ReservationExpired
    from stock.loops.reaper import Reaper

    await spread(engine, [2, 2, 2, 2])
    held = await engine.reserve("late", [{"sku": SKU, "qty": 3}], ttl_s=1)
    other = await engine.reserve("gone", [{"sku": SKU, "qty": 1}], ttl_s=1)
    assert held.lines[0].sku == other.lines[0].sku == SKU
    await asyncio.sleep(1.1)
    assert await Reaper(engine.redis, settings).reap_once() == 2
    await engine.set_shards(SKU, 4)  # spread again: the late order's shard keeps 2
    confirmed = await engine.confirm("late")
    assert (confirmed.status, confirmed.lines[0].sku) == ("confirmed", SKU)
    await engine.deduct("rest", [{"sku": SKU, "qty": 5}])
    with pytest.raises(ReservationExpired) as late:
        await engine.confirm("gone")
    assert late.value.details["sku"] == SKU and "#" not in late.value.message
    stock = await engine.get_stock(SKU)
    assert (stock.available, stock.reserved, stock.sold) == (0, 0, 8)
