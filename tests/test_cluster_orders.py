"""Orders on a Redis Cluster (issue 10): call count, crash safety of multi-group deducts
and reserves, never answering from a half-made order, multi-node transitions.

Faults are injected around the engine's script calls (``Hooked``: a delay, a lost
reply, a call that never ran) or by SIGKILLing a process that runs the engine while
one node is SIGSTOPped under its call.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError

from stock.core import formats, keys
from stock.core.config import Settings
from stock.core.errors import (
    InsufficientStock,
    InvalidTransition,
    NotFound,
    OrderConflict,
    ReservationExpired,
    Unavailable,
)
from stock.core.formats import parse_line
from stock.loops.reaper import Reaper
from stock.orders.engine import StockEngine
from stock.redis.client import connect
from tests.conftest import BUCKETS, flush
from tests.servers import Cluster
from tests.test_multibucket import skus_on_distinct_nodes

Hook = Callable[[str, list[str], list[Any]], Awaitable[None]]


class Hooked:
    """An engine's ``scripts`` with hooks around each call: ``before`` may sleep or
    raise (the call never ran), ``after`` may raise (the call ran, its reply is lost)."""

    def __init__(self, inner: Any, before: Hook | None = None, after: Hook | None = None):
        self._inner, self.before, self.after = inner, before, after
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def __call__(self, name: str, keys_: Any, args: Any, **kw: Any) -> Any:
        self.calls.append(name)
        if self.before:
            await self.before(name, list(keys_), list(args))
        reply = await self._inner(name, keys_, args, **kw)
        if self.after:
            await self.after(name, list(keys_), list(args))
        return reply


def touches(sku: str, keys_: list[str]) -> bool:
    return keys.sku_key(sku, BUCKETS) in keys_


def cluster_settings(cluster: Cluster, **changes: Any) -> Settings:
    settings = Settings(redis_url=cluster.url, redis_cluster=True, buckets=BUCKETS)
    return replace(settings, **changes)


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


async def counters(engine: StockEngine, skus: list[str]) -> list[tuple[int, int, int]]:
    out = []
    for sku in skus:
        c = await engine.get_stock(sku)
        out.append((c.available, c.reserved, c.sold))
    return out


async def line(engine: StockEngine, sku: str, order_id: str) -> str | None:
    value: str | None = await engine.redis.get(keys.line_keys(sku, order_id, BUCKETS).line)
    return value


def order_items(skus: list[str]) -> list[dict[str, Any]]:
    return [{"sku": s, "qty": 1} for s in skus]


async def all_or_nothing(engine: StockEngine, skus: list[str], order_id: str, kind: str) -> str:
    """The order holds every unit (``kind`` reserved or confirmed) or none: says which."""
    now = await counters(engine, skus)
    if now == [(5, 0, 0)] * len(skus):
        for sku in skus:
            assert await line(engine, sku, order_id) is None, sku
        return "none"
    want = (4, 1, 0) if kind == "reserve" else (4, 0, 1)
    assert now == [want] * len(skus), now
    state = "reserved" if kind == "reserve" else "confirmed"
    order = await engine.get_order(order_id)
    assert {ln.state for ln in order["lines"]} == {state}
    return "all"


# -- 1. calls per order --------------------------------------------------------------------


async def test_single_group_reserve_is_one_script_call_and_the_commit(
    engine: StockEngine, spread: list[str]
) -> None:
    hooked = engine.scripts = Hooked(engine.scripts)
    await engine.reserve("one", order_items(spread[:1]), ttl_s=60)
    assert hooked.calls == ["reserve", "order"]
    hooked.calls.clear()
    assert (await engine.reserve("one", order_items(spread[:1]), ttl_s=60)).replay
    assert hooked.calls == ["reserve", "order"]
    hooked.calls.clear()
    with pytest.raises(InsufficientStock):
        await engine.reserve("big", [{"sku": spread[0], "qty": 50}], ttl_s=60)
    assert hooked.calls == ["reserve"]  # refused: nothing written, nothing to undo
    hooked.calls.clear()
    await engine.confirm("one")
    assert hooked.calls == ["order", "confirm"]


async def test_single_group_deduct_opens_its_directory_first(
    engine: StockEngine, spread: list[str]
) -> None:
    hooked = engine.scripts = Hooked(engine.scripts)
    result = await engine.deduct("d1", order_items(spread[:1]))
    assert hooked.calls == ["order", "deduct"]  # directory, then one atomic script
    assert [ln.state for ln in result.lines] == ["confirmed"]
    assert (await engine.deduct("d1", order_items(spread[:1]))).replay
    hooked.calls.clear()
    with pytest.raises(InsufficientStock):
        await engine.deduct("d2", [{"sku": spread[0], "qty": 50}])
    assert hooked.calls == ["order", "deduct", "order"]  # refused: the directory goes
    with pytest.raises(NotFound):
        await engine.get_order("d2")
    assert await counters(engine, spread[:1]) == [(4, 0, 1)]


async def test_other_items_in_another_bucket_conflict_and_are_undone(
    engine: StockEngine, spread: list[str]
) -> None:
    await engine.reserve("o", order_items(spread[:1]), ttl_s=60)
    with pytest.raises(OrderConflict):
        await engine.reserve("o", order_items(spread[1:2]), ttl_s=60)
    with pytest.raises(OrderConflict):
        await engine.deduct("o", order_items(spread[:1]))
    assert await counters(engine, spread) == [(4, 1, 0), (5, 0, 0), (5, 0, 0)]
    assert await line(engine, spread[1], "o") is None
    assert [ln.sku for ln in (await engine.get_order("o"))["lines"]] == spread[:1]


async def test_tombstone_in_the_directory_wins_over_a_reserve(
    engine: StockEngine, spread: list[str]
) -> None:
    # a TCC cancel that overtook its try (issue 13 writes these; the commit honours them)
    await engine.redis.set(keys.order_key("t"), "reserve|released||")
    with pytest.raises(InvalidTransition) as refused:
        await engine.reserve("t", order_items(spread), ttl_s=60)
    assert refused.value.details["state"] == "released"
    assert await counters(engine, spread) == [(5, 0, 0)] * 3


# -- 3. crash safety of multi-group orders ------------------------------------------------------

CHILD = """
import asyncio, json, sys
from stock.redis.client import connect
from stock.core.config import Settings
from stock.orders.engine import StockEngine

async def main():
    settings = Settings(redis_url=sys.argv[1], redis_cluster=True, buckets=int(sys.argv[2]))
    client = connect(settings)
    engine = StockEngine(client, settings)
    engine.core.deduct_hold_ms = 1000
    try:  # every command once, so the client knows them before a node stops
        await engine.deduct("warm-up", [{"sku": "NO-STOCK", "qty": 1}])
    except Exception:
        pass
    print("ready", flush=True)
    sys.stdin.readline()
    await engine.deduct(sys.argv[3], json.loads(sys.argv[4]))

asyncio.run(main())
"""


def node_of(cluster: Cluster, engine: StockEngine, key: str) -> Any:
    port = engine.redis.get_node_from_key(key).port
    return cluster.node(int(port))


async def available_on_nodes(cluster: Cluster, engine: StockEngine, skus: list[str]) -> list[int]:
    """Each SKU's available, read from its node directly (the cluster client may ask the
    SIGSTOPped node for its slot map)."""
    out = []
    for sku in skus:
        key = keys.sku_key(sku, BUCKETS)
        client = Redis(port=node_of(cluster, engine, key).port, decode_responses=True)
        try:
            out.append(int(await client.hget(key, "available") or 0))
        finally:
            await client.aclose()
    return out


async def kill_between_groups(cluster: Cluster, engine: StockEngine, skus: list[str]) -> str:
    """Run a 3-group deduct in a child process, SIGSTOP the node of the last group, SIGKILL
    the child once the other two groups have applied, SIGCONT the node."""
    stopped = node_of(cluster, engine, keys.sku_key(skus[2], BUCKETS))
    entry = node_of(cluster, engine, keys.sku_key(skus[0], BUCKETS))
    order_id = next(
        f"kill-{n}"
        for n in range(1000)
        if node_of(cluster, engine, keys.order_key(f"kill-{n}")) is not stopped
    )
    import json

    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            CHILD,
            entry.url,
            str(BUCKETS),
            order_id,
            json.dumps(order_items(skus)),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline().strip() == b"ready"
        assert stopped.proc is not None
        os.kill(stopped.proc.pid, signal.SIGSTOP)
        try:
            child.stdin.write(b"go\n")
            child.stdin.flush()
            deadline = time.monotonic() + 10
            while await available_on_nodes(cluster, engine, skus[:2]) != [4, 4]:
                assert time.monotonic() < deadline, "the first groups never applied"
                await asyncio.sleep(0.01)
            child.kill()
            child.wait(10)
        finally:
            os.kill(stopped.proc.pid, signal.SIGCONT)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
    return order_id


@pytest.mark.faults
async def test_deduct_sigkilled_between_groups_reaper_returns_the_units(
    cluster: Cluster, engine: StockEngine, spread: list[str]
) -> None:
    await kill_between_groups(cluster, engine, spread)
    reaper = Reaper(engine.redis, engine.settings, engine.scripts)
    deadline = time.monotonic() + 5  # the child's holds last 1 s
    while await counters(engine, spread) != [(5, 0, 0)] * 3:
        assert time.monotonic() < deadline, await counters(engine, spread)
        await reaper.reap_once()
        await asyncio.sleep(0.05)


@pytest.mark.faults
async def test_deduct_sigkilled_between_groups_retry_completes(
    cluster: Cluster, engine: StockEngine, spread: list[str]
) -> None:
    order_id = await kill_between_groups(cluster, engine, spread)
    started = time.monotonic()
    result = await asyncio.wait_for(engine.deduct(order_id, order_items(spread)), 5)
    assert time.monotonic() - started < 2, "the retry waited for the dead attempt"
    assert {ln.state for ln in result.lines} == {"confirmed"}
    assert await all_or_nothing(engine, spread, order_id, "deduct") == "all"
    again = await engine.deduct(order_id, order_items(spread))
    assert again.replay


@pytest.mark.faults
@pytest.mark.parametrize("kind", ["reserve", "deduct"])
@pytest.mark.parametrize("lost", [0, 1])
async def test_lost_reply_on_one_group_undoes_or_completes(
    engine: StockEngine, spread: list[str], kind: str, lost: int
) -> None:
    victim, fired = spread[lost], []

    async def lose(name: str, keys_: list[str], args: list[Any]) -> None:
        if name in ("reserve", "deduct") and touches(victim, keys_) and not fired:
            fired.append(name)
            raise ConnectionError("injected: the script ran, its reply was lost")

    engine.scripts = Hooked(engine.scripts, after=lose)
    try:
        await getattr(engine, kind)("lost", order_items(spread))
        outcome = "answered"
    except (ConnectionError, Unavailable):
        outcome = "failed"
    assert fired
    held = await all_or_nothing(engine, spread, "lost", kind)
    assert (outcome, held) in (("answered", "all"), ("failed", "none")), (outcome, held)


@pytest.mark.faults
async def test_deduct_stalled_past_its_hold_is_undone_not_half_sold(
    engine: StockEngine, spread: list[str]
) -> None:
    """Attempt A stalls in its last group longer than its hold; a copy B of
    the request is refused meanwhile and undoes; A resumes: all or nothing is sold."""
    engine.core.deduct_hold_ms = 600

    async def stall(name: str, keys_: list[str], args: list[Any]) -> None:
        if name in ("reserve", "deduct") and touches(spread[2], keys_):
            await asyncio.sleep(1.5)

    engine.scripts = Hooked(engine.scripts, before=stall)
    attempt_a = asyncio.create_task(engine.deduct("st", order_items(spread)))
    await asyncio.sleep(0.8)
    copy = StockEngine(engine.redis, engine.settings)
    copy.core.deduct_hold_ms = 600
    await copy.set_stock(spread[2], 0)
    with pytest.raises(InsufficientStock):
        await copy.deduct("st", order_items(spread))
    await copy.set_stock(spread[2], 5)
    try:
        await attempt_a
        outcome = "answered"
    except (Unavailable, InsufficientStock):
        outcome = "failed"
    held = await all_or_nothing(engine, spread, "st", "deduct")
    assert (outcome, held) in (("answered", "all"), ("failed", "none")), (outcome, held)


# -- 4. never answer from a half-made order ---------------------------------------------------


async def test_conflict_only_with_an_order_that_took_effect(
    engine: StockEngine, spread: list[str]
) -> None:
    async def slow(name: str, keys_: list[str], args: list[Any]) -> None:
        if name in ("reserve", "deduct"):
            await asyncio.sleep(0.5)

    buyer = StockEngine(engine.redis, engine.settings)
    buyer.scripts = Hooked(buyer.scripts, before=slow)  # type: ignore[assignment]
    deduct = asyncio.create_task(buyer.deduct("pc", order_items(spread)))
    await asyncio.sleep(0.1)
    try:
        await engine.reserve("pc", order_items(spread), ttl_s=60)
    except OrderConflict:
        seen = await counters(engine, spread)
        assert seen != [(5, 0, 0)] * 3, "order_conflict with an order that had no effect yet"
    await asyncio.gather(deduct, return_exceptions=True)


async def test_a_copy_does_not_wait_for_a_stalled_attempt(
    engine: StockEngine, spread: list[str]
) -> None:
    async def stall(name: str, keys_: list[str], args: list[Any]) -> None:
        if name == "reserve" and touches(spread[1], keys_):
            await asyncio.sleep(3)

    first = StockEngine(engine.redis, engine.settings)
    first.scripts = Hooked(first.scripts, before=stall)  # type: ignore[assignment]
    stalled = asyncio.create_task(first.reserve("cp", order_items(spread), ttl_s=60))
    await asyncio.sleep(0.2)
    started = time.monotonic()
    result = await asyncio.wait_for(engine.reserve("cp", order_items(spread), ttl_s=60), 5)
    assert time.monotonic() - started < 1.0
    assert len(result.lines) == 3
    assert len((await stalled).lines) == 3  # the stalled attempt finds the same order
    assert await all_or_nothing(engine, spread, "cp", "reserve") == "all"


async def test_waiting_for_the_order_lock_frees_the_inflight_slot(cluster: Cluster) -> None:
    settings = cluster_settings(cluster, redis_max_connections=1)
    client = connect(settings)
    await flush(client)
    try:
        engine = StockEngine(client, settings)
        skus = skus_on_distinct_nodes(client)
        for sku in skus:
            await engine.set_stock(sku, 5)
        await engine.reserve("locked", order_items(skus[:2]), ttl_s=60)
        await client.set(keys.order_lock_key("locked"), "someone", px=1500)
        confirm = asyncio.create_task(engine.confirm("locked"))
        await asyncio.sleep(0.1)
        started = time.monotonic()
        await asyncio.wait_for(engine.reserve("other", order_items(skus[2:]), ttl_s=60), 5)
        assert time.monotonic() - started < 0.5, "a lock wait held the in-flight slot"
        assert {ln.state for ln in (await confirm).lines} == {"confirmed"}
    finally:
        await client.aclose()


# -- 5. multi-node transitions ---------------------------------------------------------------


async def expire_line(engine: StockEngine, sku: str, order_id: str) -> None:
    """What the reaper does to one due line (expire.lua on that member only)."""
    lk = keys.line_keys(sku, order_id, BUCKETS)
    await engine.scripts(
        "expire",
        [lk.due, lk.events, lk.sku, lk.line],
        [engine.core.retention_ms, "", keys.line_member(sku, order_id)],
    )


@pytest.mark.faults
async def test_refused_hold_undoes_its_extensions(engine: StockEngine, spread: list[str]) -> None:
    first = await engine.reserve("ext", order_items(spread[:2]), ttl_s=1)
    exp = {ln.sku: ln.expires_ms for ln in first.lines}
    await asyncio.sleep(1.05)
    await expire_line(engine, spread[1], "ext")
    await engine.set_stock(spread[1], 0)  # a late confirm cannot re-acquire it
    with pytest.raises(ReservationExpired):
        await engine.confirm("ext")
    kept = await line(engine, spread[0], "ext")
    assert kept is not None
    held = parse_line(kept)
    assert (held.state, held.qty) == (formats.RESERVED, 1)
    assert held.expires_ms == exp[spread[0]], "the refused hold kept its extension"
    due = keys.line_keys(spread[0], "ext", BUCKETS).due
    assert await engine.redis.zscore(due, keys.line_member(spread[0], "ext")) == exp[spread[0]]


@pytest.mark.faults
async def test_lost_order_lock_is_a_failure(engine: StockEngine, spread: list[str]) -> None:
    await engine.reserve("lk", order_items(spread[:2]), ttl_s=60)
    holds: list[str] = []

    async def lose_lock(name: str, keys_: list[str], args: list[Any]) -> None:
        if name == "hold":
            holds.append(name)
            if len(holds) == 2:  # both held: the lock times out under the caller
                await engine.redis.delete(keys.order_lock_key("lk"))

    engine.scripts = Hooked(engine.scripts, after=lose_lock)
    with pytest.raises(Unavailable):
        await engine.confirm("lk")
    assert await counters(engine, spread[:2]) == [(4, 1, 0)] * 2
    assert {ln.state for ln in (await engine.get_order("lk"))["lines"]} == {"reserved"}


@pytest.mark.faults
@pytest.mark.parametrize("op", ["confirm", "release"])
async def test_second_phase_failure_leaves_no_half_order(
    engine: StockEngine, spread: list[str], op: str
) -> None:
    await engine.reserve("p2", order_items(spread[:2]), ttl_s=60)
    fired: list[str] = []

    async def drop(name: str, keys_: list[str], args: list[Any]) -> None:
        if name == op and touches(spread[1], keys_) and not fired:
            fired.append(name)
            raise ConnectionError("injected: the call never reached Redis")

    engine.scripts = Hooked(engine.scripts, before=drop)
    result = await getattr(engine, op)("p2")
    assert fired
    want = {"confirm": "confirmed", "release": "released"}[op]
    assert {ln.state for ln in result.lines} == {want}
    assert {ln.state for ln in (await engine.get_order("p2"))["lines"]} == {want}


async def test_release_and_extend_of_a_deduct_are_refused(
    engine: StockEngine, spread: list[str]
) -> None:
    await engine.deduct("d", order_items(spread))
    for op, args in (("release", ()), ("extend", (60,))):
        with pytest.raises(InvalidTransition):
            await getattr(engine, op)("d", *args)
    assert await counters(engine, spread) == [(4, 0, 1)] * 3
    with pytest.raises(NotFound):
        await engine.confirm("nope")
