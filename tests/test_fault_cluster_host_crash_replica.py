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
from typing import Any

import asyncpg
import pytest
from redis.asyncio import Redis
from redis.crc import key_slot

from persist.durable_read import WAIT, DurableReads
from persist.writer import Writer
from stock.core import keys
from stock.orders.engine import StockEngine
from stock.redis.client import connect
from tests.support.persistence import sku_names, stock_up, wait_persisted
from tests.support.servers import AOF_EVERYSEC, Cluster, ServerProcess, cli
from tests.test_fault_cluster_host_crash import (
    load,
    postgres_ahead,
    seqs,
    seqs_once_back,
    skus_on,
    writer_settings,
)

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
    cluster = replicated_cluster(tmp_path)
    masters, slot = cluster.topology(cluster.nodes[0]), key_slot(keys.events_key(0).encode())
    victim, replica, entry = roles(cluster, masters, slot)
    settings = writer_settings(entry.url, dsn)
    client, writer_client = connect(settings), connect(settings)
    pg = await asyncpg.connect(dsn)
    stop = asyncio.Event()
    writer_task: asyncio.Task[None] | None = None
    stopped = False
    try:
        skus = sku_names(96)
        on_victim = skus_on(cluster, victim, skus, entry)
        engine = StockEngine(client, settings)
        await stock_up(engine, skus, 100_000)
        writer = Writer(writer_client, settings, dsn)
        writer_task = asyncio.create_task(writer.run(stop))
        done = asyncio.Event()
        loader = asyncio.create_task(load(engine, skus, done))
        await asyncio.sleep(LOAD_S)
        chosen = dict(writer.durable.waits)
        stopped = True
        await stall_replica(replica, victim)
        await asyncio.sleep(LAGGING_S)
        before = await seqs(client, settings, on_victim)
        victim.kill()
        acked, copied = await load_and_writer_stopped(done, loader, stop, writer_task, pg)

        stopped = False
        deadline = await promote(cluster, slot, entry, replica)
        await client.aclose()
        client = connect(settings)  # a fresh slot map and connections
        after = await seqs_once_back(client, settings, on_victim, deadline)
        lost = sum(before[sku] - after[sku] for sku in on_victim)
        assert lost > 0, lost  # else the drill proved nothing
        ahead = await postgres_ahead(client, settings, pg, skus)
        assert ahead == [], ahead[:10]
        check_waits(chosen, masters)

        # A writer after the failover: PostgreSQL catches up and equals Redis.
        stop = asyncio.Event()
        writer_task = asyncio.create_task(Writer(writer_client, settings, dsn).run(stop))
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


def roles(
    cluster: Cluster, masters: dict[int, Any], slot: int
) -> tuple[ServerProcess, ServerProcess, ServerProcess]:
    """The victim (the master of bucket 0's events), its replica, and a master that
    survives (the service's entry)."""
    victim = cluster.node(cluster.owner(slot, cluster.nodes[0]))
    replica = cluster.node(masters[victim.port]["replicas"][0])
    entry = cluster.node(next(p for p in masters if p != victim.port))
    return victim, replica, entry


async def load_and_writer_stopped(
    done: asyncio.Event,
    loader: asyncio.Task[int],
    stop: asyncio.Event,
    writer_task: asyncio.Task[None],
    pg: asyncpg.Connection,
) -> tuple[int, int]:
    """After the crash: the load ends, the writer stops (its final flush cannot reach
    the victim). Returns the operations acknowledged and the events copied."""
    done.set()
    acked = await loader
    stop.set()
    await asyncio.wait_for(writer_task, 60)
    return acked, int(await pg.fetchval("SELECT count(*) FROM stock_ledger"))


def check_waits(chosen: dict[str, str], masters: dict[int, Any]) -> None:
    """Every master's reads wait for its replica (WAIT), beside WAITAOF where the
    server has it: a master's own fsync does not cover a failover."""
    assert set(chosen) == {f"127.0.0.1:{port}" for port in masters}, chosen
    assert all(WAIT in wait.split("+") for wait in chosen.values()), chosen


def replicated_cluster(tmp_path: Path) -> Cluster:
    """A started cluster, one replica per master, AOF everysec, no full coverage."""
    return Cluster(
        tmp_path / "cluster",
        replicas=1,
        options=(
            *AOF_EVERYSEC,
            "--cluster-require-full-coverage",
            "no",
        ),
    ).start()


async def stall_replica(replica: ServerProcess, victim: ServerProcess) -> None:
    """The replica stops reading its master; the filler (a key on the victim) fills
    the socket buffers between them, so the load that follows stays in the
    victim's output buffer, which its crash loses."""
    os.kill(replica.proc.pid, signal.SIGSTOP)  # type: ignore[union-attr]
    filler = Redis.from_url(victim.url)
    try:
        for _ in range(socket_buffers() // CHUNK + 2):
            await filler.set(f"{keys.bucket_tag(0)}:filler", b"x" * CHUNK)
    finally:
        await filler.aclose()


async def promote(
    cluster: Cluster, slot: int, entry: ServerProcess, replica: ServerProcess
) -> float:
    """The replica takes over with what it had received; returns the deadline (30 s)
    that its first answers must meet too."""
    os.kill(replica.proc.pid, signal.SIGCONT)  # type: ignore[union-attr]
    try:
        cli(replica.port, "cluster", "failover", "takeover")
    except subprocess.CalledProcessError:
        pass  # (already promoted by the cluster's own failover)
    deadline = time.monotonic() + 30
    while not promoted(cluster, slot, entry, replica.port):
        assert time.monotonic() < deadline, "the replica was not promoted"
        await asyncio.sleep(0.1)
    return deadline
