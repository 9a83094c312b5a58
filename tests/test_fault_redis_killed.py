"""Drill: Redis (AOF, ``appendfsync everysec``) SIGKILLed during reserves and
restarted, then an emulated host crash (the AOF's unsynced tail cut).

Bounded in requests and time; ends with the invariants of tests/drills.py."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from redis.exceptions import RedisError

from stock.core.config import Settings
from stock.core.errors import InsufficientStock, NotFound, Unavailable
from stock.orders.engine import StockEngine
from stock.redis.client import connect
from tests.conftest import BUCKETS
from tests.drills import (
    check_conservation,
    check_holders,
    levels,
    stream_matches_counters,
)
from tests.servers import ServerProcess, aof_on_disk

pytestmark = pytest.mark.faults


# -- 1. Redis with AOF everysec SIGKILLed during reserves -----------------------------


KILL_AT = (700, 1500)  # acknowledged reserves before each SIGKILL of valkey-server
# Then a host crash, emulated: SIGKILL, and the AOF loses what was written in the last
# HOST_CRASH_WINDOW_S (written, acknowledged, but not fsynced when the machine died).
HOST_CRASH_AT = 2100
HOST_CRASH_WINDOW_S = 0.3


def newest_incr_aof(workdir: Path) -> Path:
    """The AOF file valkey appends to now (multi-part AOF: appendonlydir/*.incr.aof)."""
    return max((workdir / "appendonlydir").glob("*.incr.aof"), key=lambda p: p.stat().st_mtime)


@dataclass
class Outcome:
    kind: str  # ok, refused, failed
    replay: bool = False
    acked_at: float = 0.0


@dataclass
class Tally:
    outcomes: dict[str, Outcome] = field(default_factory=dict)

    def count(self, kind: str) -> int:
        return sum(o.kind == kind for o in self.outcomes.values())


async def test_redis_aof_everysec_sigkilled_during_reserves(tmp_path: Path) -> None:
    server = ServerProcess(
        tmp_path / "aof",
        None,
        "--appendonly",
        "yes",
        "--appendfsync",
        "everysec",
        "--auto-aof-rewrite-percentage",
        "0",
    ).start()
    settings = Settings(redis_url=server.url, buckets=BUCKETS)
    rng = random.Random(71)
    skus = [f"AOF-{i}" for i in range(4)]
    loaded = {sku: 1300 for sku in skus}
    orders = {
        f"aof-{i}": [(sku, rng.randint(1, 2)) for sku in rng.sample(skus, rng.choice([1, 1, 2]))]
        for i in range(3000)
    }
    client = connect(settings)
    try:
        engine = StockEngine(client, settings)
        for sku, units in loaded.items():
            await engine.set_stock(sku, units)
        await aof_on_disk(client)  # the load itself is on disk
        tally = Tally()
        queue = list(orders)

        async def reserve(order_id: str) -> Outcome:
            items = [{"sku": s, "qty": q} for s, q in orders[order_id]]
            try:
                result = await asyncio.wait_for(engine.reserve(order_id, items, ttl_s=600), 10)
                return Outcome("ok", result.replay, time.monotonic())
            except InsufficientStock:
                return Outcome("refused")
            except (RedisError, OSError, TimeoutError, Unavailable):
                return Outcome("failed")

        async def worker() -> None:
            while queue:
                order_id = queue.pop()
                outcome = tally.outcomes[order_id] = await reserve(order_id)
                if outcome.kind == "failed":
                    await asyncio.sleep(0.1)  # a buyer whose checkout failed: next one

        load = [asyncio.create_task(worker()) for _ in range(50)]
        kills: list[float] = []
        cut_bytes = 0
        for threshold in (*KILL_AT, HOST_CRASH_AT):  # mid-load (bounded: 3000 orders)
            while tally.count("ok") < threshold and queue:
                await asyncio.sleep(0.005)
            host_crash = threshold == HOST_CRASH_AT
            if host_crash:
                aof = newest_incr_aof(server.workdir)
                durable, durable_at = aof.stat().st_size, time.monotonic()
                await asyncio.sleep(HOST_CRASH_WINDOW_S)
            server.kill()
            kills.append(time.monotonic())
            if host_crash:
                cut_bytes = aof.stat().st_size - durable
                with aof.open("r+b") as f:
                    f.truncate(durable)  # possibly mid-transaction: the loader drops it
            await asyncio.sleep(0.5)
            server.start()  # same port, same dir: loads the AOF (a torn tail is dropped)
        await asyncio.gather(*load)
        await client.aclose()  # a fresh client: the pool may hold connections of the old one
        client = connect(settings)
        engine = StockEngine(client, settings)
        acked = [o for o, out in tally.outcomes.items() if out.kind == "ok"]
        failed = [o for o, out in tally.outcomes.items() if out.kind == "failed"]

        # What the restarted Redis kept.
        kept: dict[str, bool] = {}
        for order_id in acked:
            try:
                await engine.get_order(order_id)
                kept[order_id] = True
            except NotFound:
                kept[order_id] = False
        lost = [o for o in acked if not kept[o]]
        lost_in_host_crash = [
            o for o in lost if kills[-2] < tally.outcomes[o].acked_at <= kills[-1]
        ]
        lost_before_snapshot = [
            o for o in lost_in_host_crash if tally.outcomes[o].acked_at < durable_at
        ]
        counters = await levels(client, settings, skus)
        checks = check_conservation(counters, loaded)
        checks += await stream_matches_counters(client, settings, skus)

        # The client retries every order whose answer failed, and every acknowledged
        # one that Redis lost (a lost reservation is simply made again).
        replays = completed = refused = 0
        deadline = time.monotonic() + 30
        for order_id in failed + lost:
            items = [{"sku": s, "qty": q} for s, q in orders[order_id]]
            while True:
                try:
                    result = await engine.reserve(order_id, items, ttl_s=600)
                    replays += result.replay
                    completed += not result.replay
                    break
                except InsufficientStock:
                    refused += 1
                    break
                except (RedisError, OSError, Unavailable):
                    assert time.monotonic() < deadline, order_id
                    await asyncio.sleep(0.1)
        assert replays + completed + refused == len(failed) + len(lost)
        # An acknowledged order Redis kept replays (the same answer, nothing changes).
        for order_id in acked[:100]:
            if kept[order_id]:
                items = [{"sku": s, "qty": q} for s, q in orders[order_id]]
                assert (await engine.reserve(order_id, items, ttl_s=600)).replay
                checks += 1

        counters = await levels(client, settings, skus)
        checks += check_conservation(counters, loaded)
        held: dict[str, int] = Counter()
        for order_id in orders:
            try:
                order = await engine.get_order(order_id)
            except NotFound:
                continue
            states = {line.state for line in order["lines"]}
            assert states == {"reserved"}, (order_id, order)
            for line in order["lines"]:
                held[line.sku] += line.qty
        checks += check_holders(counters, held)
        checks += await stream_matches_counters(client, settings, skus)
    finally:
        await client.aclose()
        server.stop()
    print(
        f"\n  aof everysec: {len(orders)} orders, {len(KILL_AT)} SIGKILLs of valkey-server"
        f" (after {KILL_AT} acks) and 1 emulated host crash (after {HOST_CRASH_AT} acks:"
        f" SIGKILL and the last {HOST_CRASH_WINDOW_S} s, {cut_bytes} bytes, cut from the"
        f" AOF); {len(acked)} acknowledged; failed answers {len(failed)};"
        f" acknowledged but lost: {len(lost) - len(lost_in_host_crash)} by the process"
        f" kills, {len(lost_in_host_crash)} by the host crash ({len(lost_before_snapshot)}"
        f" of them acknowledged before the cut point);"
        f" retries: {replays} replayed, {completed} made again/completed, {refused} refused;"
        f" {checks} invariant checks"
    )
