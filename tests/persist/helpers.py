"""Load and checks shared by the persistence tests."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import asyncpg

from persist.snapshot import redis_levels
from stock.core import keys
from stock.core.config import Settings
from stock.core.errors import StockError
from stock.core.formats import STATE_NAMES, parse_line
from stock.orders.engine import StockEngine


def sku_names(count: int) -> list[str]:
    return [f"SKU-{i:03d}" for i in range(count)]


async def stock_up(engine: StockEngine, skus: list[str], units: int) -> None:
    await asyncio.gather(*(engine.set_stock(sku, units) for sku in skus))


async def mixed_load(
    engine: StockEngine, skus: list[str], ops: int, workers: int = 32, seed: int = 1
) -> int:
    """``ops`` random operations from ``workers`` concurrent buyers; returns how many
    changed stock (refusals such as insufficient stock are part of the mix)."""
    rng = random.Random(seed)
    reserved: list[str] = []
    confirmed: list[str] = []
    done = 0
    per_worker = ops // workers
    counter = iter(range(10**9))

    async def one() -> None:
        nonlocal done
        r = rng.random()
        oid = f"o{seed}-{next(counter)}"
        try:
            if r < 0.35 or not reserved:
                items = _items(rng, skus)
                ttl = 1 if rng.random() < 0.1 else 300
                await engine.reserve(oid, items, ttl_s=ttl)
                reserved.append(oid)
            elif r < 0.45:
                await engine.deduct(oid, _items(rng, skus))
                confirmed.append(oid)
            elif r < 0.62:
                order = reserved.pop(rng.randrange(len(reserved)))
                await engine.confirm(order)
                confirmed.append(order)
            elif r < 0.74:
                await engine.release(reserved.pop(rng.randrange(len(reserved))))
            elif r < 0.8:
                await engine.extend(rng.choice(reserved), 300)
            elif r < 0.88 and confirmed:
                await engine.cancel(confirmed.pop(rng.randrange(len(confirmed))))
            else:
                await engine.adjust(rng.choice(skus), rng.choice([-3, -1, 2, 5, 10]))
            done += 1
        except StockError:
            pass

    async def worker() -> None:
        for _ in range(per_worker):
            await one()

    await asyncio.gather(*(worker() for _ in range(workers)))
    return done


def _items(rng: random.Random, skus: list[str]) -> list[dict[str, Any]]:
    chosen = rng.sample(skus, 1 if rng.random() < 0.7 else rng.randint(2, 3))
    return [{"sku": sku, "qty": rng.randint(1, 4)} for sku in chosen]


async def persisted_problems(
    redis: Any, settings: Settings, pg: asyncpg.Connection, skus: list[str]
) -> list[str]:
    """Differences between Redis and PostgreSQL; empty once the writer caught up."""
    problems = []
    state = await redis_levels(redis, settings, skus)
    levels = {r["sku"]: r for r in await pg.fetch("SELECT * FROM stock_levels")}
    ledger = {
        r["sku"]: r
        for r in await pg.fetch(
            "SELECT sku, count(*) AS n, count(DISTINCT seq) AS d, min(seq) AS lo,"
            " max(seq) AS hi FROM stock_ledger GROUP BY sku"
        )
    }
    for sku in skus:
        want, row, led = state[sku].levels, levels.get(sku), ledger.get(sku)
        assert want is not None, sku
        if row is None or (row["available"], row["reserved"], row["sold"], row["seq"]) != want:
            problems.append(f"{sku}: redis {want} postgres {row and dict(row)}")
        elif led is None or (led["n"], led["d"], led["lo"], led["hi"]) != (
            want.seq,
            want.seq,
            1,
            want.seq,
        ):
            problems.append(f"{sku}: ledger {led and dict(led)} for seq {want.seq}")
    return problems


async def line_problems(redis: Any, settings: Settings, pg: asyncpg.Connection) -> list[str]:
    """reservation_lines rows whose state differs from the Redis line."""
    lines = await pg.fetch("SELECT order_id, sku, qty, state FROM reservation_lines")
    pipe = redis.pipeline(transaction=False)
    for r in lines:
        pipe.get(keys.line_keys(r["sku"], r["order_id"], settings.buckets).line)
    problems = []
    for r, raw in zip(lines, await pipe.execute(), strict=True):
        state = "aborted" if raw is None else STATE_NAMES[parse_line(raw).state]
        if state != r["state"]:
            problems.append(f"{r['order_id']}/{r['sku']}: redis {state} postgres {r['state']}")
    return problems


async def wait_persisted(
    redis: Any, settings: Settings, pg: asyncpg.Connection, skus: list[str], wait_s: float = 30
) -> None:
    """Wait for the writer to catch up, then assert nothing differs."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    while True:
        problems = await persisted_problems(redis, settings, pg, skus)
        if not problems or loop.time() > deadline:
            break
        await asyncio.sleep(0.1)
    assert problems == [], problems[:10]
    assert await line_problems(redis, settings, pg) == []


async def drain(redis: Any, settings: Settings, dsn: str) -> int:
    """Run a writer until the streams are empty; returns the events it applied."""
    from persist.writer import Writer

    writer = Writer(redis, settings, dsn)
    total = 0
    try:
        while True:
            was_pending = bool(writer.pending) or not writer.owned
            count, more = await writer.step()
            total += count
            if not count and not more and not was_pending:
                return total
    finally:
        await writer.aclose()
