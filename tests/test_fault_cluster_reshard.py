"""Drill: live resharding under HTTP load (issue 15 item 2).

A real ``stock serve`` (writer to PostgreSQL and reaper running) on a 3-master
cluster takes reserves (one to three SKUs of 40, some with a 1 s TTL left to
expire), confirms, releases and adjusts from many concurrent clients while a 4th
master joins (``valkey-cli --cluster add-node``), ``--cluster reshard`` moves
SLOTS slots to it (two bucket slots among them, made big beforehand), and two
more reshards move them back before ``del-node`` removes it. Every 503 (and lost
connection) would be retried by the client, as the same request, until the
answer is definite; an adjust is never resent. Then: no 500 and no 503, no ERROR
in the service's log, every order in the state its answers said, each adjust
applied at most once, the conservation law per SKU, PostgreSQL == Redis after
the writer drains, the moved buckets' short reservations expired and their
events of their time on the new master (expiries included) reached PostgreSQL,
and scripts ran on the new master after NOSCRIPT.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from redis.crc import key_slot

from stock.app.embedded import free_port
from stock.core import keys
from stock.core.config import Settings
from stock.redis.client import connect
from tests.conftest import BUCKETS
from tests.drills import (
    ADMIN,
    call,
    call_text,
    check_conservation,
    check_holders,
    holdings,
    levels,
    metric,
    order_states,
    pg_checks,
    put_stock,
    reserve_body,
    serve_env,
    serving,
)
from tests.postgres import Postgres
from tests.servers import Cluster, ServerProcess, cli, cluster_cli, node_id, wait_agreed

pytestmark = [pytest.mark.faults, pytest.mark.cluster]

SKUS = [f"RS-{i:02d}" for i in range(40)]
UNITS = 100_000  # per SKU: no SKU sells out, so the moved buckets keep changing
# Slots moved to the 4th master: the lowest 210 of the 2nd and 3rd masters (5461-5670
# and 10923-11132), which hold the slots of buckets 12 and 3 (5566, 11128) of 16.
SLOTS = 420
# Keys put in each moving bucket's slot beforehand, stand-ins for the retained lines of
# past orders (7 days of them in production): a big slot takes a while to migrate,
# and while it does a script on its keys is answered ASK or TRYAGAIN.
FILLER = 20_000
CLIENTS = 32
SHORT_TTL_S = 1  # reservations left to expire (the reaper's work)
DEFINITE_S = 30  # how long a client retries one request before the drill fails


@dataclass
class Load:
    """What the clients sent and were answered."""

    answers: Counter[tuple[str, int]] = field(default_factory=Counter)  # (op, status)
    retried: Counter[str] = field(default_factory=Counter)  # op -> requests answered 503
    resent: int = 0  # 503s and lost connections sent again
    errors: list[str] = field(default_factory=list)  # 500s and other wrong answers
    expect: dict[str, str] = field(default_factory=dict)  # order id -> its state
    adjusted: dict[str, int] = field(default_factory=dict)  # reason -> status (not resent)
    items: dict[str, list[str]] = field(default_factory=dict)  # order id -> SKUs

    @property
    def requests(self) -> int:
        return sum(self.answers.values())


async def definite(
    http: aiohttp.ClientSession, load: Load, op: str, url: str, body: Any = None
) -> int:
    """POST until the answer is definite (not a 503, not a lost connection), as a
    client that retries would; returns the status."""
    deadline = time.monotonic() + DEFINITE_S
    first = True
    while True:
        try:
            status, answer = await call(http, "POST", url, timeout=10, json=body)
        except (aiohttp.ClientError, TimeoutError):
            status, answer = 0, None
        if status not in (0, 503):
            load.answers[op, status] += 1
            if status >= 500 or status in (400, 401, 404, 422):
                load.errors.append(f"{op} {url} {body}: {status} {answer}")
            return status
        if first:
            load.retried[op] += 1
            first = False
        load.resent += 1
        assert time.monotonic() < deadline, f"no definite answer for {op} {url} {body}"
        await asyncio.sleep(0.05)


async def client(
    http: aiohttp.ClientSession, base: str, load: Load, n: int, stop: asyncio.Event
) -> None:
    rng = random.Random(n)
    held: list[str] = []  # this client's long reservations
    count = 0
    while not stop.is_set():
        if len(held) > 2 and rng.random() < 0.5:
            order_id = held.pop(rng.randrange(len(held)))
            op = "confirm" if rng.random() < 0.6 else "release"
            status = await definite(http, load, op, f"{base}/v1/reservations/{order_id}/{op}")
            if status == 200:
                load.expect[order_id] = "confirmed" if op == "confirm" else "released"
            continue
        count += 1
        order_id = f"rs{n}-{count}"
        skus = rng.sample(SKUS, 1 if rng.random() < 0.6 else rng.randint(2, 3))
        short = rng.random() < 0.15
        body = reserve_body(
            order_id, [(s, rng.randint(1, 3)) for s in skus], SHORT_TTL_S if short else 600
        )
        status = await definite(http, load, "reserve", f"{base}/v1/reservations", body)
        if status in (200, 201):
            load.expect[order_id] = "expired" if short else "reserved"
            load.items[order_id] = skus
            if not short:
                held.append(order_id)


async def adjuster(http: aiohttp.ClientSession, base: str, load: Load, stop: asyncio.Event) -> None:
    """An operator's adjusts, each with its own reason: never resent (a delta applied
    twice would make or lose units), so a 503 stays unknown; the ledger says."""
    rng = random.Random(-1)
    while not stop.is_set():
        reason = f"drill-adjust-{len(load.adjusted)}"
        body = {"delta": rng.choice([-3, -1, 1, 2, 5]), "reason": reason}
        url = f"{base}/v1/stock/{rng.choice(SKUS)}/adjust"
        try:
            status, answer = await call(http, "POST", url, timeout=10, json=body, headers=ADMIN)
        except (aiohttp.ClientError, TimeoutError):
            status, answer = 0, None
        load.adjusted[reason] = status
        load.answers["adjust", status] += 1
        if status not in (0, 200, 503):
            load.errors.append(f"adjust {url} {body}: {status} {answer}")
        await asyncio.sleep(0.05)


@asynccontextmanager
async def clients_running(
    http: aiohttp.ClientSession, base: str, load: Load, stop: asyncio.Event
) -> AsyncIterator[list[asyncio.Task[None]]]:
    """``CLIENTS`` clients until ``stop``; on the way out (a failed check too) those
    still running are cancelled before the session closes."""
    tasks = [asyncio.create_task(client(http, base, load, n, stop)) for n in range(CLIENTS)]
    tasks.append(asyncio.create_task(adjuster(http, base, load, stop)))
    try:
        yield tasks
    finally:
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def reshard(at: str, sources: str, target: str, slots: int) -> None:
    """``valkey-cli --cluster reshard``: ``slots`` slots from ``sources`` (node ids,
    comma separated), the lowest of each source's in equal shares, to ``target``."""
    await asyncio.to_thread(
        cluster_cli,
        "reshard",
        at,
        "--cluster-from",
        sources,
        "--cluster-to",
        target,
        "--cluster-slots",
        str(slots),
        "--cluster-yes",
    )


def bucket_slots() -> dict[int, int]:
    return {b: key_slot(keys.bucket_tag(b).encode()) for b in range(BUCKETS)}


def slots_of(cluster: Cluster, via: ServerProcess, port: int) -> set[int]:
    master = cluster.topology(via).get(port)
    return {s for low, high in (master or {"slots": []})["slots"] for s in range(low, high + 1)}


def lowest(cluster: Cluster, via: ServerProcess) -> set[int]:
    """The slots ``reshard`` will move: the lowest SLOTS // 2 of the 2nd and 3rd
    masters."""
    topology = cluster.topology(via)
    slots: set[int] = set()
    for node in cluster.nodes[1:]:
        low = min(low for low, _high in topology[node.port]["slots"])
        slots.update(range(low, low + SLOTS // 2))
    return slots


async def fill(redis: Any, buckets: set[int]) -> None:
    for bucket in buckets:
        pipe = redis.pipeline(transaction=False)
        for i in range(FILLER):
            pipe.set(f"{keys.bucket_tag(bucket)}:drill-filler:{i}", "x" * 100, ex=300)
        await pipe.execute()


def info_fields(info: str) -> dict[str, str]:
    return dict(line.split(":", 1) for line in info.splitlines() if ":" in line)


def errorstats(info: str) -> dict[str, int]:
    """INFO errorstats as {error code: replies} (ASK, MOVED, TRYAGAIN, NOSCRIPT, ...)."""
    return {
        name.removeprefix("errorstat_"): int(value.split("=")[1])
        for name, value in info_fields(info).items()
        if name.startswith("errorstat_")
    }


async def seqs(redis: Any, settings: Settings) -> dict[str, int]:
    pipe = redis.pipeline(transaction=False)
    for sku in SKUS:
        pipe.hget(keys.sku_key(sku, settings.buckets), "seq")
    return {s: int(v or 0) for s, v in zip(SKUS, await pipe.execute(), strict=True)}


async def test_live_resharding_under_http_load(
    tmp_path: Path, dsn: str, postgres: Postgres
) -> None:
    cluster = Cluster(tmp_path / "cluster", masters=3).start()
    extra = cluster.spare(tmp_path / "node-new")
    entry = cluster.nodes[0]
    ports = [n.port for n in cluster.nodes]
    settings = Settings(redis_url=entry.url, redis_cluster=True, buckets=BUCKETS)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    load, stop = Load(), asyncio.Event()
    redis = connect(settings)
    started = time.monotonic()
    phases: list[str] = []

    def mark(phase: str) -> None:
        phases.append(
            f"{phase} {time.monotonic() - started:.1f} s ({load.requests} requests,"
            f" {load.resent} resent)"
        )
        print(f"  {phases[-1]}", flush=True)

    try:
        async with (
            serving(serve_env(settings, port, dsn), tmp_path / "serve.log") as proc,
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=CLIENTS * 2)) as http,
        ):
            await put_stock(http, base, dict.fromkeys(SKUS, UNITS))
            ids = [node_id(p) for p in ports]
            moving = {b for b, slot in bucket_slots().items() if slot in lowest(cluster, entry)}
            await fill(redis, moving)
            async with clients_running(http, base, load, stop) as clients:
                await asyncio.sleep(2)

                # A 4th master joins and SLOTS slots move to it, under load.
                new = f"127.0.0.1:{extra.port}"
                at = f"127.0.0.1:{entry.port}"
                new_id = node_id(extra.port)
                await asyncio.to_thread(cluster_cli, "add-node", new, at)
                await asyncio.to_thread(wait_agreed, [*ports, extra.port])
                mark("joined")
                await reshard(at, f"{ids[1]},{ids[2]}", new_id, SLOTS)
                mark("moved out")
                moved_slots = slots_of(cluster, entry, extra.port)
                moved = {b for b, slot in bucket_slots().items() if slot in moved_slots}
                assert moved == moving and moved, (moved, moving)
                moved_skus = [s for s in SKUS if keys.bucket_of(s, BUCKETS) in moved]
                assert moved_skus, "no SKU lives in a moved bucket"
                seq_in = await seqs(redis, settings)
                requests_in = load.requests
                await asyncio.sleep(4)  # load on the new master: its events, its expiries
                seq_out = await seqs(redis, settings)
                mark("on the new master")

                # ... and every slot moves back; the node leaves.
                await reshard(at, new_id, ids[1], SLOTS // 2)  # its lowest half
                await reshard(at, new_id, ids[2], SLOTS // 2)
                mark("moved back")
                info_new = cli(extra.port, "info", "everything")
                assert slots_of(cluster, entry, extra.port) == set()
                await asyncio.to_thread(cluster_cli, "del-node", at, new_id)
                await asyncio.to_thread(wait_agreed, ports)
                mark("removed")
                await asyncio.sleep(2)
                stop.set()
                await asyncio.gather(*clients)
                assert proc.poll() is None, "stock serve died"
                moving_s = time.monotonic() - started
                mark("load stopped")

            # No 500, nothing but definite answers (each 503 was retried to one).
            assert load.errors == [], load.errors[:10]
            # A planned reshard is absorbed by the service's own retries: no request
            # answered 503, and no background loop or undo failed.
            unavailable = dict(load.retried) | {"adjust": load.answers["adjust", 503]}
            assert sum(unavailable.values()) == 0, f"answered 503: {unavailable}"
            log = (tmp_path / "serve.log").read_text().splitlines()
            failed = [line for line in log if " ERROR " in line]
            assert failed == [], failed[:10]
            assert set(load.answers) <= {
                ("reserve", 200),
                ("reserve", 201),
                ("reserve", 409),
                ("confirm", 200),
                ("release", 200),
                ("adjust", 200),
                ("adjust", 503),
                ("adjust", 0),
            }, load.answers

            # The short reservations expire (the reaper follows the moved buckets).
            late = [o for o, want in load.expect.items() if want == "expired"]
            deadline = time.monotonic() + 20
            while late and time.monotonic() < deadline:
                states = await order_states(http, base, late)
                late = [o for o in late if (states[o] or {}).get("status") != "expired"]
                await asyncio.sleep(0.5 if late else 0)
            states = await order_states(http, base, load.expect)
            wrong = {
                o: (want, states[o] and states[o]["status"])
                for o, want in load.expect.items()
                if (states[o] or {}).get("status") != want
            }
            assert wrong == {}, list(wrong.items())[:10]
            expired_moved = [
                o
                for o, want in load.expect.items()
                if want == "expired" and set(load.items[o]) & set(moved_skus)
            ]
            assert expired_moved, "no short reservation in a moved bucket"

            mark("expired")
            _, text = await call_text(http, f"{base}/metrics")
            redis_errors = metric(text, "stock_redis_errors_total")

            # The writer followed: PostgreSQL == Redis, and the moved SKUs' events of
            # their time on the new master (their expiries too) are in the ledger.
            checks = await pg_checks(redis, settings, dsn, SKUS)
            mark("postgres")
            pg = await asyncpg.connect(dsn)
            try:
                rows = await pg.fetch(
                    "SELECT sku, op, seq FROM stock_ledger WHERE sku = ANY($1::text[])",
                    moved_skus,
                )
                adjusts = await pg.fetch(
                    "SELECT sku, qty, reason FROM stock_ledger WHERE op = 'adjust'"
                )
            finally:
                await pg.close()

            # Each adjust applied at most once, every one answered 200 exactly once;
            # the conservation law counts the applied deltas.
            applied = Counter(r["reason"] for r in adjusts)
            assert [r for r, n in applied.items() if n > 1] == [], "an adjust applied twice"
            ok = {r for r, status in load.adjusted.items() if status == 200}
            assert ok <= set(applied) <= set(load.adjusted), ok - set(applied)
            loaded = dict.fromkeys(SKUS, UNITS)
            for r in adjusts:
                loaded[r["sku"]] += r["qty"]
            reserved, sold = holdings(states)
            counters = await levels(redis, settings, SKUS)
            checks += check_conservation(counters, loaded) + len(applied)
            checks += check_holders(counters, reserved, sold) + len(states)
            there = [r for r in rows if seq_in[r["sku"]] < r["seq"] <= seq_out[r["sku"]]]
            assert len(there) == sum(seq_out[s] - seq_in[s] for s in moved_skus) > 0
            assert any(r["op"] == "expire" for r in rows), "no expiry of a moved bucket"
            checks += 2

            # NOSCRIPT on the new master healed: scripts ran there.
            stats = info_fields(info_new)
            evalsha = stats.get("cmdstat_evalsha", "calls=0").split(",")[0]
            assert int(evalsha.split("=")[1]) > 0, "no script ran on the new master"
            assert errorstats(info_new).get("NOSCRIPT", 0) > 0, "no NOSCRIPT on the new master"
            replies = Counter(errorstats(info_new))
            for p in ports:
                replies.update(errorstats(cli(p, "info", "errorstats")))
    finally:
        stop.set()
        await redis.aclose()
        extra.stop()
        cluster.stop()
        print(f"\n  stock serve log: {tmp_path / 'serve.log'}")
    print(
        f"\n  live resharding: {load.requests} HTTP requests from {CLIENTS} clients over"
        f" {moving_s:.1f} s ({requests_in} before the slots reached the new master);"
        f" {len(moved_slots)} slots moved to a 4th master and back ({len(moved)} of"
        f" {BUCKETS} buckets, {len(moved_skus)} SKUs); answers {dict(load.answers)};"
        f" answered 503 then retried {dict(load.retried)} ({load.resent} resends);"
        f" stock_redis_errors_total {redis_errors:.0f}; new master: {evalsha},"
        f" error replies of the 4 nodes {dict(replies)}; {len(expired_moved)} short"
        f" reservations of moved buckets expired; {checks} invariant checks"
    )
