"""Drill: the host of a Redis Cluster master crashes while its replica lags behind,
and the replica takes over. PostgreSQL must never hold an event the new master lacks.

It runs on the suite's own servers, where tests/test_fault_cluster_host_crash.py
(AOF, no replicas) skips: Valkey's WAITAOF answers before the fsync under
``appendfsync everysec`` (redis/redis#13793) and Redis 7.0 has no WAITAOF, so on a
master with a replica the writer ends each node's reads with ``WAIT 1`` on the same
connection (persist/durable_read.py), which this drill checks.

Three masters with a replica each, AOF ``everysec``, stock load over many SKUs and
the writer copying. The victim master's replica is SIGSTOPped and more is written to
the victim than the kernel's socket buffers between the two can hold, so what comes
after (the load goes on) is only in the victim's memory; then the victim is
SIGKILLed: its host is gone, and whatever its replica had not received with it. The
replica resumes and takes over (``CLUSTER FAILOVER TAKEOVER``: promoted despite the
lag). PostgreSQL's counters and ledger must be equal to or behind the new master's
for every SKU, never ahead; a writer then drains and the two agree. About 20 s."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from pathlib import Path

import asyncpg
import pytest
from redis.asyncio import Redis
from redis.crc import key_slot
from redis.exceptions import RedisError

from persist.durable_read import WAIT, DurableReads
from persist.writer import Writer
from stock.core import keys
from stock.core.config import Settings
from stock.orders.engine import StockEngine
from stock.redis.client import connect
from tests.conftest import BUCKETS
from tests.persist.helpers import sku_names, stock_up, wait_persisted
from tests.servers import Cluster, ServerProcess, cli
from tests.test_fault_cluster_host_crash import load, postgres_ahead, seqs

pytestmark = [pytest.mark.faults, pytest.mark.cluster]

LOAD_S = 1.5  # of load with the writer copying, before the replica stops
LAGGING_S = 1.0  # of load while the replica is stopped, before the crash
CHUNK = 4 << 20  # bytes of each filler write


async def _never_early(*_: object) -> bool:
    return False


def socket_buffers() -> int:
    """The most the kernel can buffer on one loopback TCP connection: the receiver's
    and the sender's buffer maximums (net.ipv4.tcp_rmem, tcp_wmem)."""
    total = 0
    for name in ("tcp_rmem", "tcp_wmem"):
        try:
            total += int(Path(f"/proc/sys/net/ipv4/{name}").read_text().split()[2])
        except (OSError, IndexError, ValueError):
            total += 32 << 20
    return total


def promoted(cluster: Cluster, slot: int, via: ServerProcess, port: int) -> bool:
    try:
        return cluster.owner(slot, via) == port
    except LookupError:
        return False  # (the victim failed, the replica not yet promoted)


@pytest.mark.parametrize("waitaof", ["as_found", "trusted"])
async def test_cluster_host_crash_lagging_replica_postgres_never_ahead(
    tmp_path: Path, dsn: str, waitaof: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``trusted``: the writer takes the server's WAITAOF for a correct one (as on
    Redis 8.0+): a master's own fsync must still not be all its reads wait for."""
    if waitaof == "trusted":
        monkeypatch.setattr(DurableReads, "_confirms_unsynced", _never_early)
    cluster = Cluster(
        tmp_path / "cluster",
        replicas=1,
        options=(
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--auto-aof-rewrite-percentage",
            "0",
            "--cluster-require-full-coverage",
            "no",
        ),
    ).start()
    masters = cluster.topology(cluster.nodes[0])
    slot = key_slot(keys.events_key(0).encode())
    victim = cluster.node(cluster.owner(slot, cluster.nodes[0]))
    replica = cluster.node(masters[victim.port]["replicas"][0])
    entry = cluster.node(next(p for p in masters if p != victim.port))  # survives
    settings = Settings(
        redis_url=entry.url,
        redis_cluster=True,
        buckets=BUCKETS,
        database_url=dsn,
        writer_batch=5000,
        writer_interval_ms=20,
    )
    client, writer_client = connect(settings), connect(settings)
    pg = await asyncpg.connect(dsn)
    stop = asyncio.Event()
    writer_task: asyncio.Task[None] | None = None
    stopped = False
    try:
        skus = sku_names(96)
        on_victim = [
            sku
            for sku in skus
            if cluster.owner(key_slot(keys.sku_key(sku, BUCKETS).encode()), entry) == victim.port
        ]
        assert on_victim, "no SKU on the victim"
        engine = StockEngine(client, settings)
        await stock_up(engine, skus, 100_000)
        writer = Writer(writer_client, settings, dsn)
        writer_task = asyncio.create_task(writer.run(stop))
        done = asyncio.Event()
        loader = asyncio.create_task(load(engine, skus, done))
        await asyncio.sleep(LOAD_S)
        chosen = dict(writer.durable.waits)

        # The replica stops reading its master; the filler (a key on the victim)
        # fills the socket buffers between them, so the load that follows stays in
        # the victim's output buffer, which its crash loses.
        os.kill(replica.proc.pid, signal.SIGSTOP)  # type: ignore[union-attr]
        stopped = True
        filler = Redis.from_url(victim.url)
        try:
            for _ in range(socket_buffers() // CHUNK + 2):
                await filler.set(f"{keys.bucket_tag(0)}:filler", b"x" * CHUNK)
        finally:
            await filler.aclose()
        await asyncio.sleep(LAGGING_S)
        before = await seqs(client, settings, on_victim)
        victim.kill()
        done.set()
        acked = await loader
        stop.set()
        await asyncio.wait_for(writer_task, 60)  # its final flush cannot reach the victim
        copied = int(await pg.fetchval("SELECT count(*) FROM stock_ledger"))

        # The replica takes over with what it had received.
        os.kill(replica.proc.pid, signal.SIGCONT)  # type: ignore[union-attr]
        stopped = False
        try:
            cli(replica.port, "cluster", "failover", "takeover")
        except subprocess.CalledProcessError:
            pass  # (already promoted by the cluster's own failover)
        deadline = time.monotonic() + 30
        while not promoted(cluster, slot, entry, replica.port):
            assert time.monotonic() < deadline, "the replica was not promoted"
            await asyncio.sleep(0.1)
        await client.aclose()
        client = connect(settings)  # a fresh slot map and connections
        while True:
            try:
                after = await seqs(client, settings, on_victim)
                break
            except RedisError:
                assert time.monotonic() < deadline, "the promoted replica does not answer"
                await asyncio.sleep(0.2)
        lost = sum(before[sku] - after[sku] for sku in on_victim)
        assert lost > 0, lost  # else the drill proved nothing
        ahead = await postgres_ahead(client, settings, pg, skus)
        assert ahead == [], ahead[:10]
        # Every master's reads wait for its replica (WAIT), beside WAITAOF where the
        # server has it: a master's own fsync does not cover a failover.
        assert set(chosen) == {f"127.0.0.1:{port}" for port in masters}, chosen
        assert all(WAIT in wait.split("+") for wait in chosen.values()), chosen

        # A writer after the failover: PostgreSQL catches up and equals Redis.
        stop = asyncio.Event()
        writer = Writer(writer_client, settings, dsn)
        writer_task = asyncio.create_task(writer.run(stop))
        await wait_persisted(client, settings, pg, skus, wait_s=60)
    finally:
        if stopped:
            os.kill(replica.proc.pid, signal.SIGCONT)  # type: ignore[union-attr]
        stop.set()
        if writer_task is not None:
            await asyncio.wait_for(asyncio.gather(writer_task, return_exceptions=True), 60)
        await pg.close()
        await client.aclose()
        await writer_client.aclose()
        cluster.stop()
    print(
        f"\n  cluster host crash, lagging replica promoted: {acked} operations"
        f" acknowledged, {copied} events in PostgreSQL at the crash, the failover lost"
        f" {lost} events over {len(on_victim)} SKUs (at least); per-node waits {chosen};"
        f" PostgreSQL ahead of Redis: none"
    )
