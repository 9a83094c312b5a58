"""Drill: the host of a Redis Cluster master crashes while the writer copies its
events to PostgreSQL. PostgreSQL must never hold an event Redis lost.

Three masters with AOF (``appendfsync everysec``) on a slow disk: every fsync takes
FSYNC_DELAY_MS longer, so each node holds up to about 1.2 s of written but not yet
fsynced events. An LD_PRELOAD shim (tests/fsync_log.c) logs the AOF's size at the
start of every fsync that completed. The host crash is a SIGKILL and the AOF cut
back to the last of those sizes: what a machine that lost its page cache then keeps,
and never less than Redis reported as fsynced (WAITAOF) before it died.

While the victim is down and after it restarts, PostgreSQL's counters and ledger are
equal to or behind Redis's for every SKU, never ahead; a writer then drains and the
two agree. Bounded in time (about 15 s). Also: the writer follows a bucket whose slot moves to
another master while it reads (MOVED), losing and repeating nothing."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from redis.crc import key_slot
from redis.exceptions import RedisError

from persist.snapshot import redis_levels
from persist.writer import Writer
from stock.core import keys
from stock.core.config import Settings
from stock.core.errors import StockError
from stock.orders.engine import StockEngine
from stock.redis.client import connect
from tests.conftest import BUCKETS
from tests.persist.helpers import sku_names, stock_up, wait_persisted
from tests.servers import (
    EARLY_FSYNC,
    NO_WAITAOF,
    Cluster,
    confirms_fsync_early,
    fsync_shim_env,
    fsynced_size,
    has_waitaof,
)
from tests.test_cluster_pipeline import migrate_slot
from tests.test_fault_redis_killed import newest_incr_aof

pytestmark = [pytest.mark.faults, pytest.mark.cluster]

FSYNC_DELAY_MS = 200  # every fsync of the cluster's nodes takes this much longer
LOAD_S = 2.5  # of load with the writer copying, before the crash
UNSYNCED_S = 0.4  # the crash comes when the victim's last fsync is at least this old


async def load(engine: StockEngine, skus: list[str], done: asyncio.Event) -> int:
    """Reserves, releases and adjustments from 16 buyers until ``done``; returns the
    operations Redis acknowledged. Failures (the crashed node) are skipped."""
    rng = random.Random(15)
    acked = 0

    async def buyer(n: int) -> None:
        nonlocal acked
        held: list[str] = []
        for i in range(10**9):
            if done.is_set():
                return
            try:
                r = rng.random()
                if r < 0.5:
                    order_id = f"hc-{n}-{i}"
                    await engine.reserve(order_id, [{"sku": rng.choice(skus), "qty": 1}], 300)
                    held.append(order_id)
                elif r < 0.7 and held:
                    await engine.release(held.pop())
                else:
                    await engine.adjust(rng.choice(skus), rng.choice([-1, 1, 2]))
                acked += 1
            except (StockError, RedisError, OSError):
                await asyncio.sleep(0.05)

    await asyncio.gather(*(buyer(n) for n in range(16)))
    return acked


async def seqs(client: Any, settings: Settings, skus: list[str]) -> dict[str, int]:
    state = await redis_levels(client, settings, skus)
    return {sku: s.levels.seq if s.levels else 0 for sku, s in state.items()}


async def postgres_ahead(
    client: Any, settings: Settings, pg: asyncpg.Connection, skus: list[str]
) -> list[str]:
    """SKUs for which PostgreSQL holds a seq Redis does not have (or other counters
    at the same seq): events Redis lost that PostgreSQL kept."""
    redis = await redis_levels(client, settings, skus)
    levels = {r["sku"]: r for r in await pg.fetch("SELECT * FROM stock_levels")}
    top = dict(await pg.fetch("SELECT sku, max(seq) FROM stock_ledger GROUP BY sku"))
    ahead = []
    for sku in skus:
        want, row = redis[sku].levels, levels.get(sku)
        assert want is not None, sku
        if top.get(sku, 0) > want.seq or (row is not None and row["seq"] > want.seq):
            ahead.append(f"{sku}: postgres seq {row and row['seq']} > redis seq {want.seq}")
        elif row is not None and row["seq"] == want.seq:
            got = (row["available"], row["reserved"], row["sold"])
            if got != (want.available, want.reserved, want.sold):
                ahead.append(f"{sku}: postgres {got} redis {want} at seq {want.seq}")
    return ahead


async def test_cluster_host_crash_postgres_never_ahead_of_redis(tmp_path: Path, dsn: str) -> None:
    env = fsync_shim_env(tmp_path)
    cluster = Cluster(
        tmp_path / "cluster",
        options=(
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--auto-aof-rewrite-percentage",
            "0",
        ),
    )
    for node in cluster.nodes:
        node.env = env
        (node.workdir / "fsync.delay").write_text(str(FSYNC_DELAY_MS))
    cluster.start()
    victim = cluster.node(cluster.owner(key_slot(keys.events_key(0).encode()), cluster.nodes[0]))
    if not await has_waitaof(victim.url):
        cluster.stop()
        pytest.skip(NO_WAITAOF)
    if await confirms_fsync_early(victim.url, f"{keys.bucket_tag(0)}:fsync-probe"):
        cluster.stop()
        pytest.skip(EARLY_FSYNC)
    settings = Settings(
        redis_url=cluster.url,
        redis_cluster=True,
        buckets=BUCKETS,
        database_url=dsn,
        writer_batch=5000,
        writer_interval_ms=20,
    )
    client = connect(settings)
    pg = await asyncpg.connect(dsn)
    writer_client = connect(settings)
    stop = asyncio.Event()
    writer_task: asyncio.Task[None] | None = None
    try:
        victim = cluster.node(
            cluster.owner(key_slot(keys.events_key(0).encode()), cluster.nodes[0])
        )
        skus = sku_names(48)
        on_victim = [
            sku
            for sku in skus
            if cluster.owner(key_slot(keys.sku_key(sku, BUCKETS).encode()), victim) == victim.port
        ]
        assert on_victim, "no SKU on the victim"
        engine = StockEngine(client, settings)
        await stock_up(engine, skus, 100_000)
        writer = Writer(writer_client, settings, dsn)
        writer_task = asyncio.create_task(writer.run(stop))
        done = asyncio.Event()
        loader = asyncio.create_task(load(engine, skus, done))
        await asyncio.sleep(LOAD_S)

        # The crash: when the victim's last fsync is UNSYNCED_S old (its AOF then
        # holds that much acknowledged, copied, not yet fsynced load).
        fsync_log = victim.workdir / "fsync.log"
        deadline = time.monotonic() + 10
        while time.time() - fsync_log.stat().st_mtime < UNSYNCED_S:
            assert time.monotonic() < deadline, "the victim's fsyncs never paused"
            await asyncio.sleep(0.005)
        before = await seqs(client, settings, on_victim)
        victim.kill()
        aof = newest_incr_aof(victim.workdir)
        durable = fsynced_size(victim, aof)
        cut = aof.stat().st_size - durable
        with aof.open("r+b") as f:
            f.truncate(durable)
        done.set()
        acked = await loader
        stop.set()
        await asyncio.wait_for(writer_task, 60)  # its final flush cannot reach the victim
        copied = int(await pg.fetchval("SELECT count(*) FROM stock_ledger"))

        victim.start()  # loads the cut AOF
        await client.aclose()
        client = connect(settings)  # a fresh slot map and connections
        deadline = time.monotonic() + 30
        while True:
            try:
                after = await seqs(client, settings, on_victim)
                break
            except RedisError:
                assert time.monotonic() < deadline, "the victim did not come back"
                await asyncio.sleep(0.2)
        lost = sum(before[sku] - after[sku] for sku in on_victim)
        assert cut > 0 and lost > 0, (cut, lost)  # else the drill proved nothing
        ahead = await postgres_ahead(client, settings, pg, skus)
        assert ahead == [], ahead[:10]

        # A writer after the crash: PostgreSQL catches up and equals Redis.
        stop = asyncio.Event()
        writer = Writer(writer_client, settings, dsn)
        writer_task = asyncio.create_task(writer.run(stop))
        await wait_persisted(client, settings, pg, skus, wait_s=60)
    finally:
        stop.set()
        if writer_task is not None:
            await asyncio.wait_for(asyncio.gather(writer_task, return_exceptions=True), 60)
        await pg.close()
        await client.aclose()
        await writer_client.aclose()
        cluster.stop()
    print(
        f"\n  cluster host crash: {acked} operations acknowledged, {copied} events in"
        f" PostgreSQL at the crash; the victim's AOF lost {cut} bytes ({lost} events"
        f" over {len(on_victim)} SKUs, at least); PostgreSQL ahead of Redis: none"
    )


async def test_writer_follows_a_slot_moved_mid_run(tmp_path: Path, dsn: str) -> None:
    """Load and a writer (AOF on: reads and WAITAOF per node) while bucket 0's slot
    moves to another master: the writer's reads meet ASK or MOVED, it reads the
    bucket from its new master, and PostgreSQL ends equal to Redis, every event
    once (``wait_persisted`` counts the ledger)."""
    cluster = Cluster(tmp_path / "cluster", options=("--appendonly", "yes")).start()
    settings = Settings(
        redis_url=cluster.url,
        redis_cluster=True,
        buckets=BUCKETS,
        database_url=dsn,
        writer_batch=5000,
        writer_interval_ms=20,
    )
    client, writer_client = connect(settings), connect(settings)
    pg = await asyncpg.connect(dsn)
    stop = asyncio.Event()
    try:
        skus = [s for s in sku_names(200) if keys.bucket_of(s, BUCKETS) in (0, 1)]
        engine = StockEngine(client, settings)
        await stock_up(engine, skus, 100_000)
        writer = Writer(writer_client, settings, dsn)
        writer_task = asyncio.create_task(writer.run(stop))
        done = asyncio.Event()
        loader = asyncio.create_task(load(engine, skus, done))
        await asyncio.sleep(1)
        slot = key_slot(keys.events_key(0).encode())
        source = cluster.owner(slot, cluster.nodes[0])
        target = next(p for p in cluster.topology(cluster.nodes[0]) if p != source)
        await asyncio.to_thread(migrate_slot, cluster, slot, target)
        await asyncio.sleep(1)
        done.set()
        acked = await loader
        await wait_persisted(client, settings, pg, skus, wait_s=60)
        assert writer.durable.redirects > 0
        assert writer.durable.client.get_node_from_key(keys.events_key(0)).port == target
        redirects = writer.durable.redirects
        stop.set()
        await asyncio.wait_for(writer_task, 30)
    finally:
        stop.set()
        await pg.close()
        await client.aclose()
        await writer_client.aclose()
        cluster.stop()
    print(f"\n  slot moved mid-run: {acked} operations, {redirects} bucket reads redirected")
