"""The calls that went through redis-py's own cluster path, on a slot in migration.

redis-py follows an ASK with ASKING sent as a command of its own, on whichever
connection the node's pool lends first, and the command on the next one: the
target then answers MOVED (no ASKING on that connection), the source ASK again,
until redis-py's TTL ends ("TTL exhausted"). A migration of a big slot keeps its
keys split for as long as they take to move. The order's lock (a multi-node
transition), ``get_order``'s line reads and the reaper's reads of the expiry
index go through the per-node batches (``stock.cluster_pipeline``) instead, which
send ASKING in the same write as the call (issue 20 item 10d).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from redis.crc import key_slot

from stock.core import keys
from stock.loops.reaper import Reaper
from tests.conftest import BUCKETS
from tests.servers import Cluster
from tests.test_cluster_pipeline import migrate_slot, node_of, one, open_engine

pytestmark = [pytest.mark.faults, pytest.mark.cluster]

SPLIT_S = 2.0  # how long the slot stays split (its first keys moved, the rest not)


@pytest.fixture(scope="module")
def own_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    nodes = Cluster(tmp_path_factory.mktemp("ask-cluster")).start()
    yield nodes
    nodes.stop()


def other_master(cluster: Cluster, key: str) -> int:
    return next(p for p in cluster.topology(cluster.nodes[0]) if p != node_of(cluster, key))


async def idle_connections(client: Any, batch: Any, port: int) -> None:
    """An even number (at least 4) of idle connections in redis-py's pool of the node
    at ``port``, its batch's connection taken first (``stock.cluster_pipeline`` holds
    one for as long as it works). redis-py lends them in turn: its ASKING and its
    command then never share a connection. (With an odd number the command lands, a
    round later, on the connection that got an ASKING before, and goes through.)"""
    node = client.get_node(host="127.0.0.1", port=port)
    await batch.pipe_for(node).execute("PING")
    await asyncio.gather(*(node.execute_command("PING") for _ in range(8)))
    if len(node._free) % 2:
        extra = node._free.pop()
        node._connections.remove(extra)
        await extra.disconnect()
    assert len(node._free) >= 4 and len(node._free) % 2 == 0


async def split(cluster: Cluster, slot: int, target: int, first: tuple[str, ...]) -> Any:
    """Start moving ``slot`` to ``target``, ``first`` moved at once and the rest after
    SPLIT_S; returns the task, once the slot is split."""
    started = threading.Event()
    moving = asyncio.create_task(
        asyncio.to_thread(migrate_slot, cluster, slot, target, first, started, SPLIT_S)
    )
    assert await asyncio.to_thread(started.wait, 10)
    return moving


def skus_on_two_masters(cluster: Cluster) -> tuple[str, str]:
    found: dict[int, str] = {}
    for i in range(200):
        sku = f"ASK{i}"
        found.setdefault(node_of(cluster, keys.sku_key(sku, BUCKETS)), sku)
        if len(found) == 2:
            a, b = found.values()
            return a, b
    raise AssertionError("no two masters")


async def test_a_multi_node_confirm_while_its_orders_slot_migrates(own_cluster: Cluster) -> None:
    """The order's lock key is missing on the source (ASK) while its record has
    moved: the confirm takes the lock on the target and completes."""
    client, engine = await open_engine(own_cluster)
    try:
        a, b = skus_on_two_masters(own_cluster)
        for sku in (a, b):
            await engine.set_stock(sku, 10)
        await engine.reserve("ask-1", [*one(a), *one(b)])
        okey = keys.order_key("ask-1")
        target = other_master(own_cluster, okey)
        await idle_connections(client, engine.scripts.pipeline, target)
        moving = await split(own_cluster, key_slot(okey.encode()), target, (okey,))
        try:
            confirmed = await engine.confirm("ask-1")
        finally:
            await moving
        assert confirmed.status == "confirmed"
    finally:
        await client.aclose()


@pytest.mark.parametrize("reader", ["get_order", "reaper"])
async def test_order_reads_and_the_reaper_while_a_bucket_slot_migrates(
    own_cluster: Cluster, reader: str
) -> None:
    """A bucket's line and expiry index moved, its SKU key not yet: get_order reads
    the line (ASK); the reaper reads the due line (ASK) and expires it (its script
    waits out TRYAGAIN)."""
    client, engine = await open_engine(own_cluster)
    try:
        sku, order_id = f"ASK-{reader}", f"ask-{reader}"
        await engine.set_stock(sku, 10)
        await engine.reserve(order_id, one(sku), ttl_s=1)
        line = keys.line_keys(sku, order_id, BUCKETS)
        target = other_master(own_cluster, line.sku)
        await idle_connections(client, engine.scripts.pipeline, target)
        await asyncio.sleep(1.1)
        slot = key_slot(line.sku.encode())
        moving = await split(own_cluster, slot, target, (line.line, line.due))
        try:
            if reader == "get_order":
                order = await engine.get_order(order_id)
                assert [x.state for x in order["lines"]] == ["reserved"]
            else:
                reaper = Reaper(engine.redis, engine.settings, scripts=engine.scripts)
                assert await reaper.reap_once() == 1
        finally:
            await moving
        expected = 9 if reader == "get_order" else 10
        assert (await engine.get_stock(sku)).available == expected
    finally:
        await client.aclose()
