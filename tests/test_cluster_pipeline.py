"""The cluster's per-node auto-pipelines (stock/redis/cluster_pipeline.py) on real 3-master
clusters: calls batched per node, NOSCRIPT on one node, a slot migrated mid-run
(ASK, TRYAGAIN, MOVED), a slot split longer than redis-py waits, a lost reply, a
paused node."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis as redis_sync
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from stock.core import keys
from stock.core.config import Settings
from stock.core.errors import InsufficientStock, StoreUnavailable
from stock.orders.engine import StockEngine
from stock.redis.client import connect
from stock.redis.cluster_pipeline import ClusterBatch, NodePipeline
from tests.conftest import BUCKETS, flush
from tests.servers import Cluster, cli, script_sha
from tests.test_multibucket import skus_on_distinct_nodes

SKUS = [f"S{i:02d}" for i in range(32)]


def one(sku: str, qty: int = 1) -> list[dict[str, Any]]:
    return [{"sku": sku, "qty": qty}]


@pytest.fixture(scope="module")
def own_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A cluster of this module's own, for the drills that move slots or pause nodes."""
    nodes = Cluster(tmp_path_factory.mktemp("batch-cluster")).start()
    yield nodes
    nodes.stop()


async def open_engine(cluster: Cluster, **options: Any) -> tuple[Any, StockEngine]:
    settings = Settings(redis_url=cluster.url, redis_cluster=True, buckets=BUCKETS)
    client = connect(settings, **options)
    await flush(client)
    return client, StockEngine(client, settings)


@pytest.fixture
async def on_cluster(cluster: Cluster) -> AsyncIterator[StockEngine]:
    client, engine = await open_engine(cluster)
    yield engine
    await client.aclose()


def batch_of(engine: StockEngine) -> ClusterBatch:
    batch = engine.scripts.pipeline
    assert isinstance(batch, ClusterBatch)
    return batch


def node_of(cluster: Cluster, key: str) -> int:
    return cluster.owner(key_slot(key.encode()), cluster.nodes[0])


def evalsha_calls(cluster: Cluster) -> int:
    total = 0
    for node in cluster.nodes:
        client = redis_sync.Redis(port=node.port)
        stats = client.info("commandstats").get("cmdstat_evalsha", {})
        total += int(stats.get("calls", 0)) if isinstance(stats, dict) else 0
        client.close()
    return total


async def test_concurrent_calls_travel_in_batches_per_node(
    on_cluster: StockEngine, cluster: Cluster
) -> None:
    """600 concurrent single-item reserves over 32 SKUs (all three masters): every
    call reaches its node once, in writes of several calls each, and the counters
    add up."""
    engine, batch = on_cluster, batch_of(on_cluster)
    for sku in SKUS:
        await engine.set_stock(sku, 1000)
    calls_before, writes_before = batch.commands, batch.batches
    server_before = evalsha_calls(cluster)
    results = await asyncio.gather(
        *(engine.reserve(f"b{i}", one(SKUS[i % len(SKUS)])) for i in range(600))
    )
    assert {r.status for r in results} == {"reserved"}
    calls, writes = batch.commands - calls_before, batch.batches - writes_before
    assert calls >= 600  # at least one script call per order went through the batches
    assert writes * 4 <= calls, f"{calls} calls in {writes} writes: not batched"
    assert evalsha_calls(cluster) - server_before <= calls  # nothing sent twice
    assert batch.fallbacks == 0
    assert all(batch.pipe_for(node).commands for node in engine.redis.get_primaries())
    stocks = [await engine.get_stock(sku) for sku in SKUS]
    assert sum(s.reserved for s in stocks) == 600
    assert sum(s.available for s in stocks) == 1000 * len(SKUS) - 600


async def test_a_multi_node_order_makes_no_task_per_group(on_cluster: StockEngine) -> None:
    """A reserve over three masters (three bucket groups, then the order's directory)
    sends its group calls at once and waits for their replies without a task each
    (issue 23: a task per group call was a good part of the cluster client's CPU);
    a refused group still undoes the others."""
    engine = on_cluster
    skus = skus_on_distinct_nodes(engine.redis)
    for sku in skus:
        await engine.set_stock(sku, 5)
    await engine.reserve("warm", one(skus[0]))  # scripts loaded, connections open
    loop = asyncio.get_running_loop()
    made: list[Any] = []

    def counting(loop: asyncio.AbstractEventLoop, coro: Any, **kw: Any) -> asyncio.Task[Any]:
        made.append(coro)
        return asyncio.Task(coro, loop=loop, **kw)

    loop.set_task_factory(counting)
    try:
        result = await engine.reserve("three", [{"sku": s, "qty": 1} for s in skus])
        assert result.status == "reserved" and len(result.lines) == 3
        assert made == []
        with pytest.raises(InsufficientStock):
            await engine.reserve("short", [{"sku": s, "qty": 4 + (s == skus[1])} for s in skus])
    finally:
        loop.set_task_factory(None)
    assert [(await engine.get_stock(s)).available for s in skus] == [3, 4, 4]


async def test_noscript_after_script_flush_on_one_node(
    on_cluster: StockEngine, cluster: Cluster
) -> None:
    """SCRIPT FLUSH on one master only: its next calls hear NOSCRIPT, load the script
    on that node through the same pipeline and succeed; nothing goes the slow way."""
    engine = on_cluster
    for sku in SKUS:
        await engine.set_stock(sku, 10)
    victim = node_of(cluster, keys.sku_key(SKUS[0], BUCKETS))
    sha = script_sha("reserve")
    cli(victim, "script", "flush")
    assert cli(victim, "script", "exists", sha).split() == ["0"]
    results = await asyncio.gather(
        *(engine.reserve(f"n{i}", one(sku)) for i, sku in enumerate(SKUS))
    )
    assert {r.status for r in results} == {"reserved"}
    assert cli(victim, "script", "exists", sha).split() == ["1"]
    assert batch_of(engine).fallbacks == 0
    assert sum([(await engine.get_stock(sku)).reserved for sku in SKUS]) == len(SKUS)


async def test_a_lost_reply_of_a_repeatable_call_is_resent(
    on_cluster: StockEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reserve whose reply is lost with its connection goes again through redis-py's
    cluster client; the script is idempotent, so the order counts once (a replay)."""
    engine = on_cluster
    await engine.set_stock("LOSE", 10)
    send = NodePipeline.execute
    lost: list[Any] = []

    async def lose(reply: Any) -> Any:
        lost.append(await reply)
        raise RedisConnectionError("reply lost (injected by the test)")

    def lose_first_reserve_reply(pipe: Any, *args: Any) -> Any:
        reply = send(pipe, *args)
        if args[0] == "EVALSHA" and "LOSE" in args and not lost:
            return asyncio.ensure_future(lose(reply))
        return reply

    monkeypatch.setattr(NodePipeline, "execute", lose_first_reserve_reply)
    result = await engine.reserve("lost-1", one("LOSE", 3))
    monkeypatch.undo()
    assert lost and result.status == "reserved"
    assert batch_of(engine).fallbacks == 1
    stock = await engine.get_stock("LOSE")
    assert (stock.available, stock.reserved) == (7, 3)


def migrate_slot(
    cluster: Cluster,
    slot: int,
    target: int,
    first: tuple[str, ...] = (),
    split: threading.Event | None = None,
    pause_s: float = 0.0,
) -> int:
    """Move ``slot`` to master ``target`` as redis-cli --cluster reshard does:
    IMPORTING/MIGRATING, MIGRATE its keys, then SETSLOT NODE on every master.
    ``first``: keys migrated first, then ``split`` is set and the slot stays split
    between the two masters for ``pause_s`` (a big slot migrating)."""
    source = cluster.owner(slot, cluster.nodes[0])
    masters = list(cluster.topology(cluster.nodes[0]))
    conns = {port: redis_sync.Redis(port=port, decode_responses=True) for port in masters}
    try:
        ids = {port: conns[port].execute_command("CLUSTER", "MYID") for port in masters}
        conns[target].execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", ids[source])
        conns[source].execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", ids[target])
        if first:
            conns[source].execute_command(
                "MIGRATE", "127.0.0.1", target, "", 0, 5000, "KEYS", *first
            )
            if split is not None:
                split.set()
            time.sleep(pause_s)
        while names := conns[source].execute_command("CLUSTER", "GETKEYSINSLOT", slot, 1000):
            conns[source].execute_command(
                "MIGRATE", "127.0.0.1", target, "", 0, 5000, "KEYS", *names
            )
        for port in (target, source, *masters):
            conns[port].execute_command("CLUSTER", "SETSLOT", slot, "NODE", ids[target])
    finally:
        for conn in conns.values():
            conn.close()
    return source


@pytest.mark.faults
async def test_a_slot_migrated_mid_run(own_cluster: Cluster) -> None:
    """Reserves on one SKU run while its bucket's slot moves to another master: they
    meet TRYAGAIN, ASK and then MOVED, and every one succeeds; afterwards the calls
    travel in batches to the new owner, and an adjust (sent at most once) follows
    the MOVED by itself and applies once."""
    client, engine = await open_engine(own_cluster)
    try:
        sku = "MIGRATING"
        slot = key_slot(keys.sku_key(sku, BUCKETS).encode())
        await engine.set_stock(sku, 100_000)
        await engine.set_stock("OTHER", 10)  # scripts and connections in place
        target = next(
            p
            for p in own_cluster.topology(own_cluster.nodes[0])
            if p != node_of(own_cluster, keys.sku_key(sku, BUCKETS))
        )
        stop = False
        done = 0

        async def buyer(w: int) -> None:
            nonlocal done
            i = 0
            while not stop:
                await engine.reserve(f"m{w}-{i}", one(sku))
                i, done = i + 1, done + 1

        buyers = [asyncio.create_task(buyer(w)) for w in range(20)]
        await asyncio.sleep(0.2)
        source = await asyncio.to_thread(migrate_slot, own_cluster, slot, target)
        await asyncio.sleep(0.3)
        stop = True
        await asyncio.gather(*buyers)  # any failed reserve fails the test here
        assert source != target and node_of(own_cluster, keys.sku_key(sku, BUCKETS)) == target
        stock = await engine.get_stock(sku)
        assert (stock.reserved, stock.available) == (done, 100_000 - done)
        batch = batch_of(engine)
        print(f"during the move: {batch.redirects} redirects, {batch.fallbacks} resent")
        target_pipe = batch.pipe_for(client.get_node(host="127.0.0.1", port=target))
        before = target_pipe.commands
        await asyncio.gather(*(engine.reserve(f"after-{i}", one(sku)) for i in range(50)))
        assert target_pipe.commands - before >= 50  # routed by the updated slot map
        # a once-only call with a stale map: drop the slot map entry back to the source
        client.nodes_manager.slots_cache[slot] = [client.get_node(port=source, host="127.0.0.1")]
        redirects = batch.redirects
        await engine.adjust(sku, 7, reason="after the move")
        assert batch.redirects == redirects + 1
        assert (await engine.get_stock(sku)).available == 100_000 - done - 50 + 7
    finally:
        await client.aclose()


@pytest.mark.faults
async def test_a_slot_split_longer_than_redis_py_waits(own_cluster: Cluster) -> None:
    """A bucket's slot half migrated for 1.5 s (its SKU key moved, its stream and
    expiry index not yet: a big slot on its way): every script on it is answered
    TRYAGAIN all that time. redis-py gives up after about 0.4 s (ClusterError 'TTL
    exhausted'), and an adjust (sent once) heard TryAgainError at once; here both
    wait it out (``redis_migration_wait_s``) and apply, the adjust once."""
    client, engine = await open_engine(own_cluster)
    try:
        sku = "SPLIT"
        key = keys.sku_key(sku, BUCKETS)
        slot = key_slot(key.encode())
        await engine.set_stock(sku, 100)
        await engine.reserve("split-0", one(sku))  # its line, the stream, the expiry index
        target = next(
            p for p in own_cluster.topology(own_cluster.nodes[0]) if p != node_of(own_cluster, key)
        )
        split = threading.Event()
        moving = asyncio.create_task(
            asyncio.to_thread(migrate_slot, own_cluster, slot, target, (key,), split, 1.5)
        )
        assert await asyncio.to_thread(split.wait, 10)
        started = time.monotonic()
        await asyncio.gather(
            engine.reserve("split-1", one(sku)), engine.adjust(sku, 5, reason="during the split")
        )
        took = time.monotonic() - started
        await moving
        stock = await engine.get_stock(sku)
        assert (stock.available, stock.reserved) == (100 - 2 + 5, 2)
        assert took > 0.5 and batch_of(engine).tryagains > 0, (took, batch_of(engine).tryagains)
        print(f"calls waited {took:.2f} s, {batch_of(engine).tryagains} TRYAGAIN replies")
    finally:
        await client.aclose()


@pytest.mark.faults
async def test_a_paused_node_fails_calls_within_the_socket_timeout(own_cluster: Cluster) -> None:
    """A master stopped with SIGSTOP: calls to it fail with TimeoutError within the
    client's socket_timeout (not resent, not hung), calls to the others go on, and
    once it runs again its calls succeed."""
    client, engine = await open_engine(own_cluster, socket_timeout=0.5)
    try:
        for sku in SKUS:
            await engine.set_stock(sku, 10)
        victim_port = node_of(own_cluster, keys.sku_key(SKUS[0], BUCKETS))
        elsewhere = next(
            s for s in SKUS if node_of(own_cluster, keys.sku_key(s, BUCKETS)) != victim_port
        )
        victim = own_cluster.node(victim_port)
        assert victim.proc is not None
        os.kill(victim.proc.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            results = await asyncio.gather(
                engine.get_stock(SKUS[0]),
                engine.adjust(SKUS[0], 1),
                engine.get_stock(elsewhere),
                return_exceptions=True,
            )
            elapsed = time.monotonic() - started
        finally:
            os.kill(victim.proc.pid, signal.SIGCONT)
        for failed in results[:2]:  # the engine's StoreUnavailable, the timeout its cause
            assert isinstance(failed, StoreUnavailable), failed
            assert isinstance(failed.__cause__, RedisTimeoutError), failed.__cause__
        assert results[2].available == 10  # type: ignore[union-attr]
        assert elapsed < 0.5 + 1.0, f"took {elapsed:.2f} s"
        assert (await engine.get_stock(SKUS[0])).available in (10, 11)  # the adjust: unknown
    finally:
        await client.aclose()
