"""Concurrency: many operations at once on a few SKUs, on both backends.

A random mix of every operation (with the same request sent 2-3 times at once,
as a client retrying after a timeout) runs in two waves around a real expiry;
afterwards a model rebuilt from the final line states must explain every
counter, and every SKU's event stream must replay, event by event, to the
final counters and line states. Then the classic flash sale: 1000 buyers, 100
units, exactly 100 sales.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from persist.events import named
from stock.core import keys
from stock.core.config import Settings
from stock.core.errors import (
    InsufficientStock,
    InvalidTransition,
    NotFound,
    OrderConflict,
    ReservationExpired,
    StockError,
)
from stock.loops.reaper import Reaper
from stock.orders.engine import OrderResult, StockEngine
from stock.redis.client import connect

SKUS = ["A", "X", "B", "C"]  # A and X share a bucket; B and C are elsewhere
INITIAL = 150

# the refusals each operation may meet when it races others
ALLOWED: dict[str, tuple[type[StockError], ...]] = {
    "reserve": (InsufficientStock, OrderConflict, InvalidTransition),
    "deduct": (InsufficientStock, OrderConflict, InvalidTransition),
    "confirm": (NotFound, InvalidTransition, ReservationExpired),
    "release": (NotFound, InvalidTransition),
    "cancel": (NotFound, InvalidTransition),
    "extend": (NotFound, InvalidTransition),
    "adjust": (InsufficientStock,),
}

# per unit of qty: the (available, reserved, sold) change of an event's op;
# confirm (reserved or late) and abort (of a reserve or of a deduct) have two
DELTAS: dict[str, list[tuple[int, int, int]]] = {
    "reserve": [(-1, 1, 0)],
    "deduct": [(-1, 0, 1)],
    "confirm": [(0, -1, 1), (-1, 0, 1)],
    "release": [(1, -1, 0), (0, 0, 0)],  # (0, 0, 0): an EXPIRED line closed (TCC)
    "expire": [(1, -1, 0)],
    "cancel": [(1, 0, -1)],
    "extend": [(0, 0, 0)],
    "abort": [(1, -1, 0), (1, 0, -1)],
}

# a line's state machine, as the event stream tells it: (state, op) -> state
# (None is "no line"; an abort removes the line of a compensated acquire)
LINE_STEPS: dict[tuple[str | None, str], str | None] = {
    (None, "reserve"): "reserved",
    (None, "deduct"): "confirmed",
    ("reserved", "confirm"): "confirmed",
    ("expired", "confirm"): "confirmed",
    ("reserved", "release"): "released",
    ("expired", "release"): "released",
    ("reserved", "expire"): "expired",
    ("reserved", "extend"): "reserved",
    ("confirmed", "cancel"): "cancelled",
    ("reserved", "abort"): None,
    ("confirmed", "abort"): None,
    # a multi-node confirm on a cluster first re-acquires expired lines
    # (hold.lua), and gives them back when another node refuses
    ("expired", "reserve"): "reserved",
}


@dataclass
class Log:
    """What every call answered."""

    calls: list[tuple[str, str, Any]] = field(default_factory=list)  # (op, order_id, outcome)
    adjusted: Counter[str] = field(default_factory=Counter)

    async def record(self, op: str, order_id: str, call: Awaitable[Any]) -> None:
        try:
            outcome = await call
        except StockError as exc:
            assert isinstance(exc, ALLOWED[op]), f"{op} {order_id}: unexpected {exc!r}"
            outcome = exc
        self.calls.append((op, order_id, outcome))

    async def adjust(self, engine: StockEngine, sku: str, delta: int) -> None:
        try:
            await engine.adjust(sku, delta, reason="test")
        except InsufficientStock:
            return
        self.adjusted[sku] += delta


async def read_events(engine: StockEngine) -> dict[str, list[dict[str, str]]]:
    out: dict[str, list[dict[str, str]]] = defaultdict(list)
    for bucket in sorted({keys.bucket_of(s, engine.settings.buckets) for s in SKUS}):
        for _id, fields in await engine.redis.xrange(keys.events_key(bucket)):
            event = named(fields)
            out[event["sku"]].append(event)
    return out


def check_events(
    events: dict[str, list[dict[str, str]]],
    counters: dict[str, tuple[int, int, int]],
    lines: dict[tuple[str, str], tuple[str, int]],
) -> None:
    """Each SKU's events: numbered 1..n, every change a legal delta of its op, never
    negative, ending at the SKU's counters; and per line, the ops replay through
    the state machine to the line's final state."""
    history: dict[tuple[str, str], list[str]] = defaultdict(list)
    for sku, evs in events.items():
        assert [int(e["seq"]) for e in evs] == list(range(1, len(evs) + 1)), sku
        prev = (0, 0, 0)
        for e in evs:
            now = (int(e["available"]), int(e["reserved"]), int(e["sold"]))
            assert min(now) >= 0, e
            diff = tuple(n - p for n, p in zip(now, prev, strict=True))
            qty = int(e["qty"])
            if e["op"] in ("set", "adjust"):
                assert diff == (qty, 0, 0), e
            else:
                legal = [tuple(d * qty for d in unit) for unit in DELTAS[e["op"]]]
                assert diff in legal, (e, diff)
                history[(e["order"], sku)].append(e["op"])
            prev = now
        assert prev == counters.get(sku, (0, 0, 0)), (sku, prev, counters.get(sku))
    for line in set(history) | set(lines):
        state: str | None = None
        for op in history[line]:
            assert (state, op) in LINE_STEPS, (line, history[line])
            state = LINE_STEPS[(state, op)]
        final = lines[line][0] if line in lines else None
        assert state == final, (line, history[line], final)


async def final_state(
    engine: StockEngine, order_ids: list[str]
) -> tuple[dict[str, tuple[int, int, int]], dict[tuple[str, str], tuple[str, int]], dict[str, Any]]:
    counters = {}
    for sku in SKUS:
        try:
            c = await engine.get_stock(sku)
        except NotFound:
            continue
        counters[sku] = (c.available, c.reserved, c.sold)
    records: dict[str, Any] = {}
    lines: dict[tuple[str, str], tuple[str, int]] = {}
    for order_id in order_ids:
        try:
            records[order_id] = record = await engine.get_order(order_id)
        except NotFound:
            continue
        for line in record["lines"]:
            lines[(order_id, line.sku)] = (line.state, line.qty)
    return counters, lines, records


async def reap_all(engine: StockEngine, reaper: Reaper) -> None:
    """Wait until every reservation made with a 1 s TTL is due, then reap them all."""
    await asyncio.sleep(1.05)
    while await reaper.reap_once():
        pass


def mixed_wave(
    rng: random.Random,
    engine: StockEngine,
    reapers: list[Reaper],
    log: Log,
    orders: dict[str, tuple[str, list[dict[str, Any]], int]],
    new_orders: int,
    prefix: str,
) -> list[Callable[[], Awaitable[None]]]:
    """A shuffled list of calls: new orders (each sent 1-3 times, sometimes with a
    conflicting variant), transitions on known and new orders, adjusts, reaper passes."""
    calls: list[Callable[[], Awaitable[None]]] = []

    def acquire(order_id: str, kind: str, items: list[dict[str, Any]], ttl: int) -> None:
        payload = rng.sample(items, len(items))  # same request, items in another order
        if kind == "reserve":
            calls.append(lambda: log.record(kind, order_id, engine.reserve(order_id, payload, ttl)))
        else:
            calls.append(lambda: log.record(kind, order_id, engine.deduct(order_id, payload)))

    for n in range(new_orders):
        order_id = f"{prefix}{n}"
        kind = "reserve" if rng.random() < 0.7 else "deduct"
        skus = rng.sample(SKUS, rng.randint(1, 3))
        items = [{"sku": s, "qty": rng.randint(1, 3)} for s in skus]
        ttl = 1 if rng.random() < 0.3 else 900
        orders[order_id] = (kind, items, ttl)
        for _ in range(rng.choice([1, 1, 2, 3])):
            acquire(order_id, kind, items, ttl)
        if rng.random() < 0.05:  # the same order id with other items: order_conflict
            acquire(order_id, kind, [{"sku": SKUS[0], "qty": 9}], ttl)
    known = sorted(orders)
    for _ in range(new_orders * 2):
        order_id = rng.choice(known)
        op = rng.choice(["confirm", "confirm", "release", "extend", "cancel"])
        for _ in range(rng.choice([1, 1, 2])):
            if op == "confirm":
                calls.append(lambda o=order_id: log.record("confirm", o, engine.confirm(o)))
            elif op == "release":
                calls.append(lambda o=order_id: log.record("release", o, engine.release(o)))
            elif op == "cancel":
                calls.append(lambda o=order_id: log.record("cancel", o, engine.cancel(o)))
            else:
                calls.append(lambda o=order_id: log.record("extend", o, engine.extend(o, 600)))
    for _ in range(new_orders // 10):
        sku, delta = rng.choice(SKUS), rng.choice([-3, -1, 2, 5])
        calls.append(lambda s=sku, d=delta: log.adjust(engine, s, d))
    for reaper in reapers:
        calls.append(reaper.reap_once)
    rng.shuffle(calls)
    return calls


@pytest.mark.parametrize("seed", [1, 2])
async def test_concurrent_mix_matches_final_lines(
    engine: StockEngine, settings: Settings, seed: int
) -> None:
    rng = random.Random(seed)
    reapers = [Reaper(engine.redis, settings, engine.scripts) for _ in range(4)]
    log = Log()
    orders: dict[str, tuple[str, list[dict[str, Any]], int]] = {}
    for sku in SKUS:
        await engine.set_stock(sku, INITIAL)

    wave = mixed_wave(rng, engine, reapers, log, orders, 250, "w1-")
    await asyncio.gather(*(call() for call in wave))
    # wave 2 starts once the 1 s reservations are due: late confirms race the reapers
    await asyncio.sleep(1.05)
    wave = mixed_wave(rng, engine, reapers, log, orders, 250, "w2-")
    await asyncio.gather(*(call() for call in wave))
    await reap_all(engine, reapers[0])

    counters, lines, records = await final_state(engine, sorted(orders))
    problems = []
    for sku in SKUS:
        available, reserved, sold = counters[sku]
        held = sum(q for (_o, s), (st, q) in lines.items() if s == sku and st == "reserved")
        bought = sum(q for (_o, s), (st, q) in lines.items() if s == sku and st == "confirmed")
        if (reserved, sold) != (held, bought):
            problems.append(f"{sku}: reserved/sold {reserved}/{sold}, lines say {held}/{bought}")
        if available != INITIAL + log.adjusted[sku] - reserved - sold:
            problems.append(f"{sku}: available {available} breaks conservation")
        assert min(available, reserved, sold) >= 0
    for order_id, record in records.items():
        states = {ln.state for ln in record["lines"]}
        if record["phase"] in ("released", "cancelled") and not record["lines"]:
            continue  # a TCC tombstone: released or cancelled before any reserve took effect
        if len(states) != 1 or record["phase"] != "done":
            problems.append(f"{order_id}: half done: {record}")
    for op, order_id, outcome in log.calls:
        if op in ("reserve", "deduct") and isinstance(outcome, OrderResult):
            record = records.get(order_id)
            if record is None or record["kind"] != op:
                problems.append(f"{order_id}: {op} answered {outcome.status}, record {record}")
    ops = Counter(
        f"{op}: {type(o).__name__ if isinstance(o, Exception) else o.replay}"
        for op, _, o in log.calls
    )
    print(f"\n{settings.redis_url} seed {seed}: {sorted(ops.items())}")
    assert not problems, "\n".join(problems)
    check_events(await read_events(engine), counters, lines)


@pytest.mark.parametrize("op", ["deduct", "reserve"])
async def test_flash_sale_sells_exactly_the_stock(engine: StockEngine, op: str) -> None:
    """1000 buyers of one unit each, 100 units; a third of them send their request
    2 or 3 times at once. Exactly 100 orders succeed, no unit is oversold."""
    await engine.set_stock("A", 100)
    rng = random.Random(7)
    buy = engine.deduct if op == "deduct" else engine.reserve
    copies = {f"buyer-{i}": rng.choice([1, 1, 2, 3]) for i in range(1000)}
    requests = [order_id for order_id, n in copies.items() for _ in range(n)]
    rng.shuffle(requests)
    answers = await asyncio.gather(
        *(buy(order_id, [{"sku": "A", "qty": 1}]) for order_id in requests),
        return_exceptions=True,
    )
    by_order: dict[str, list[Any]] = defaultdict(list)
    for order_id, answer in zip(requests, answers, strict=True):
        assert isinstance(answer, OrderResult | InsufficientStock), answer
        by_order[order_id].append(answer)
    won = {o for o, got in by_order.items() if isinstance(got[0], OrderResult)}
    assert len(won) == 100
    for got in by_order.values():  # the copies of one request all agree
        assert len({type(a) for a in got}) == 1
    stock = await engine.get_stock("A")
    want = (0, 0, 100) if op == "deduct" else (0, 100, 0)
    assert (stock.available, stock.reserved, stock.sold) == want
    events = (await read_events(engine))["A"]
    sales = [e for e in events if e["op"] == op]
    assert len(sales) == 100
    assert [int(e["available"]) for e in sales] == list(range(99, -1, -1))
    assert min(int(e["available"]) for e in events) == 0
    for e in events:
        assert int(e["available"]) + int(e["reserved"]) + int(e["sold"]) == 100, e


async def test_a_fresh_client_routes_its_first_burst(
    engine: StockEngine, settings: Settings
) -> None:
    """A process that has just started meets the stampede with its very first calls:
    60 buyers on 50 units through a client that has sent nothing yet. Each call must
    reach its key's node (redis-py 8.1 alone would send them to one node, draw MOVED
    replies and close the connections of the calls in flight)."""
    await engine.set_stock("A", 50)
    fresh = connect(settings)
    try:
        buyer = StockEngine(fresh, settings)
        answers = await asyncio.gather(
            *(buyer.reserve(f"first-{i}", [{"sku": "A", "qty": 1}]) for i in range(60)),
            return_exceptions=True,
        )
    finally:
        await fresh.aclose()
    outcomes = Counter(type(a).__name__ for a in answers)
    assert outcomes == {"OrderResult": 50, "InsufficientStock": 10}
    stock = await engine.get_stock("A")
    assert (stock.available, stock.reserved, stock.sold) == (0, 50, 0)


async def test_flash_sale_of_a_two_item_bundle(engine: StockEngine) -> None:
    """500 buyers of A + B (different buckets: on a cluster, different nodes), 50 of
    each, every request sent twice. Never more than 50 bundles, and every unit that
    was not sold is available again (compensation leaves nothing held), and every
    bundle answered "confirmed" keeps both lines: on a cluster a copy's undo never
    deletes a line another copy also holds (each line's set of attempt tokens)."""
    await engine.set_stock("A", 50)
    await engine.set_stock("B", 50)
    items = [{"sku": "A", "qty": 1}, {"sku": "B", "qty": 1}]
    requests = [f"bundle-{i}" for i in range(500) for _ in range(2)]
    random.Random(3).shuffle(requests)
    answers = await asyncio.gather(
        *(engine.deduct(order_id, items) for order_id in requests), return_exceptions=True
    )
    for answer in answers:
        assert isinstance(answer, OrderResult | InsufficientStock), answer
    won = {o for o, a in zip(requests, answers, strict=True) if isinstance(a, OrderResult)}
    assert 0 < len(won) <= 50
    for sku in ("A", "B"):
        stock = await engine.get_stock(sku)
        assert (stock.available, stock.reserved, stock.sold) == (50 - len(won), 0, len(won))
    counters, lines, _records = await final_state(engine, sorted(set(requests)))
    assert {o for o, _s in lines} == won
    check_events(await read_events(engine), counters, lines)


class Gate:
    """Wraps an engine's script runner and holds the first call of one script until
    opened: a slow network or a paused process, to replay a race step by step."""

    def __init__(self, engine: StockEngine, script: str) -> None:
        self.inner = engine.scripts
        self.script = script
        self.held = asyncio.Event()
        self.opened = asyncio.Event()
        engine.scripts = self  # type: ignore[assignment]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def __call__(self, name: str, keys_: Any, args: Any, **options: Any) -> Any:
        if name == self.script and not self.held.is_set():
            self.held.set()
            await self.opened.wait()
        return await self.inner(name, keys_, args, **options)

    async def reached(self, task: asyncio.Task[Any]) -> None:
        """Until the held call is waiting, or the task ended without one."""
        held = asyncio.create_task(self.held.wait())
        await asyncio.wait([held, task], return_when=asyncio.FIRST_COMPLETED)
        held.cancel()


async def outcome(call: Awaitable[Any]) -> Any:
    try:
        return await call
    except StockError as exc:
        return exc


async def test_copies_of_one_request_create_once_and_replay(engine: StockEngine) -> None:
    """The same request twice at once, the first one slowed down before its script
    runs: exactly one answer is the creation (replay False, HTTP 201), the other is
    a replay (200)."""
    await engine.set_stock("A", 10)
    gate = Gate(engine, "reserve")
    first = asyncio.create_task(engine.reserve("o", [{"sku": "A", "qty": 1}]))
    await gate.reached(first)
    second = await engine.reserve("o", [{"sku": "A", "qty": 1}])
    gate.opened.set()
    answers = [await first, second]
    assert sorted(a.replay for a in answers) == [False, True], answers
    stock = await engine.get_stock("A")
    assert (stock.available, stock.reserved, stock.sold) == (9, 1, 0)


async def test_confirm_racing_a_refused_bundle_changes_nothing(engine: StockEngine) -> None:
    """Reserve A + B (different buckets) while B is sold out; a confirm of the same
    order id arrives while the refused reserve is still undoing its A line. The
    confirm must not sell A: the order never existed."""
    await engine.set_stock("A", 10)
    await engine.set_stock("B", 0)
    gate = Gate(engine, "abort")  # the cluster's compensation of the A group
    items = [{"sku": "A", "qty": 1}, {"sku": "B", "qty": 1}]
    first = asyncio.create_task(outcome(engine.reserve("o", items)))
    await gate.reached(first)
    confirmed = await outcome(engine.confirm("o"))
    gate.opened.set()
    reserved = await first
    assert await observe(engine, reserved, confirmed) == {
        "reserve": "InsufficientStock",
        "confirm": "NotFound",
        "A": (10, 0, 0),
        "B": (0, 0, 0),
        "order": "NotFound",
    }


async def observe(engine: StockEngine, *answers: Any) -> dict[str, Any]:
    """What a race left: each answer's kind, the counters of A and B, the order."""
    seen: dict[str, Any] = {}
    for name, answer in zip(["reserve", "confirm"], answers, strict=False):
        seen[name] = type(answer).__name__ if isinstance(answer, Exception) else answer.status
    for sku in ("A", "B"):
        c = await engine.get_stock(sku)
        seen[sku] = (c.available, c.reserved, c.sold)
    try:
        order = await engine.get_order("o")
        seen["order"] = (order["phase"], [(ln.sku, ln.state) for ln in order["lines"]])
    except NotFound:
        seen["order"] = "NotFound"
    return seen


async def test_retry_succeeding_while_the_first_copy_compensates(engine: StockEngine) -> None:
    """Reserve A + B while B is sold out; the refused first copy is slow to undo its
    A line; B is restocked and a retry of the same request succeeds. The order that
    was answered "reserved" must exist, with both lines RESERVED."""
    await engine.set_stock("A", 10)
    await engine.set_stock("B", 0)
    gate = Gate(engine, "abort")
    items = [{"sku": "A", "qty": 1}, {"sku": "B", "qty": 1}]
    first = asyncio.create_task(outcome(engine.reserve("o", items)))
    await gate.reached(first)
    await engine.adjust("B", 1)
    second = await engine.reserve("o", items)
    gate.opened.set()
    seen = await observe(engine, await first)
    assert second.status == "reserved"
    assert seen == {
        "reserve": "InsufficientStock",  # the first copy
        "A": (9, 1, 0),
        "B": (0, 1, 0),
        "order": ("done", [("A", "reserved"), ("B", "reserved")]),
    }
