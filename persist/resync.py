"""Resync (``stock resync``): rebuild Redis stock and active reservations from PostgreSQL.

SKUs go in chunks. For each chunk:

1. **Fence** (``persist/fences.py``): ``fenced = token@until_ms`` on every SKU
   hash, renewed while the chunk runs. From then on every script answers
   ``unavailable`` for them (the reaper passes their lines by), so nothing
   changes between the read below and the write. A SKU another run holds
   refuses the chunk (``FenceBusy``); a run that dies leaves fences that end by
   themselves after ``STOCK_FENCE_TTL_S``.
2. **Unflushed events**: a SKU whose stream still holds events after the
   recorded offset is waited for (a running writer flushes them) for up to
   ``wait_s``, then refused, unless ``force``.
3. **Read PostgreSQL**: ``stock_levels`` (counters, per-customer limit), the
   rows of ``reservation_lines`` that are RESERVED or ended within the retention
   window (so that a late retry still replays instead of selling twice), and
   each customer's units held or bought (``pg_buyers``); Redis RESERVED lines
   that PostgreSQL does not hold are rewritten to its state (or deleted).
4. **Write** the order records of the restored lines first (items from every
   line of the order, kind, phase ``done``; ``lua/resync_order.lua``, on the
   server's clock), then per SKU with ``lua/resync.lua`` (counters, seq, limit,
   ``c:<customer>`` counts, lines with their expiry and customer, the expiry
   index, and a ``resync`` event, plus a ``limit`` event if the limit changed,
   whose higher seq makes PostgreSQL take the result over any older unflushed
   event; refused unless the run's own fence still holds), then **unfence**.

A run that fails or dies at any point leaves each SKU either as it was or fully
restored: ``resync.lua`` rewrites one SKU in one atomic step, and the order
records it needs are written before it (a record without its lines changes no
stock: the line scripts refuse it). Run it again to finish.

``dry_run`` fences nothing and writes nothing: it prints the per-SKU diff, and
per location of a SKU with locations (DESIGN §13) the counters it would rewrite.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, TextIO

import asyncpg

from persist import snapshot
from persist.events import LINES_UPSERT, Event
from persist.fences import Fences
from persist.locations import write_locations
from persist.reconcile_locations import resync_diffs
from persist.snapshot import (
    Levels,
    Line,
    RedisSku,
    line_of,
    ms_of,
    pg_levels,
    redis_levels,
    unflushed,
)
from stock.core import keys
from stock.core.config import Settings
from stock.core.errors import FenceError
from stock.core.formats import (
    ABORTED,
    RESERVED,
    STATE_AFTER,
    STATE_NAMES,
    items_spec,
    order_record,
)
from stock.core.validate import Item
from stock.orders.engine import StockEngine
from stock.redis.scripts import Scripts, expect_ok, parse_resync

CHUNK = 200


@dataclass
class SkuPlan:
    sku: str
    target: Levels
    current: RedisSku
    restore: list[Line]  # from PostgreSQL: RESERVED, and terminal within retention
    drop: list[Line]  # RESERVED in Redis only: rewritten to PostgreSQL's state
    redis_reserved: int
    unflushed: int = 0
    buyers: snapshot.Buyers = field(default_factory=lambda: snapshot.Buyers(None, {}))

    def changed(self) -> bool:
        now = self.current.levels
        return (
            now is None
            or now.counters() != self.target.counters()
            or self.current.limit != self.buyers.limit
            or self.current.fenced
            or bool(self.drop)
            or self.redis_reserved != self.active()
        )

    def active(self) -> int:
        return sum(line.state == RESERVED for line in self.restore)

    def diff(self) -> str:
        now = self.current.levels.text() if self.current.levels else "missing"
        text = (
            f"{self.sku}: redis {now} -> postgres {self.target.text()}; reservations "
            f"redis {self.redis_reserved} -> postgres {self.active()}"
        )
        if self.drop:
            text += f" (drop {len(self.drop)})"
        if self.current.limit != self.buyers.limit:
            text += f"; limit {self.current.limit or 'none'} -> {self.buyers.limit or 'none'}"
        if self.unflushed:
            text += f"; {self.unflushed} unflushed events"
        return text


@dataclass
class ResyncReport:
    resynced: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # unflushed events, no --force
    missing: list[str] = field(default_factory=list)  # not in stock_levels


class Resync:
    """One resync run over a list of SKUs."""

    def __init__(
        self,
        client: Any,
        settings: Settings,
        conn: asyncpg.Connection,
        *,
        dry_run: bool = False,
        force: bool = False,
        wait_s: float = 5.0,
        out: TextIO = sys.stdout,
    ) -> None:
        self.redis, self.settings, self.conn = client, settings, conn
        self.dry_run, self.force, self.wait_s, self.out = dry_run, force, wait_s, out
        self.scripts = Scripts(client)
        self.fences = Fences(self.scripts, settings)
        self.report = ResyncReport()
        self.events: dict[str, list[Event]] = {}  # unflushed, per SKU, of the current chunk

    async def run(self, skus: list[str] | None) -> ResyncReport:
        wanted = set(skus) if skus is not None else set(await pg_levels(self.conn, None))
        # bucket by bucket, so that each chunk reads few expiry indexes and streams
        buckets = self.settings.buckets
        names = sorted(wanted, key=lambda sku: (keys.bucket_of(sku, buckets), sku))
        for start in range(0, len(names), CHUNK):
            await self._chunk(names[start : start + CHUNK])
            if len(names) > CHUNK:
                done = min(start + CHUNK, len(names))
                print(f"resync: {done}/{len(names)} SKUs", file=sys.stderr, flush=True)
        return self.report

    async def _chunk(self, skus: list[str]) -> None:
        if self.dry_run:
            await self._resync(skus)
            return
        async with self.fences.holding(skus):
            await self._resync(skus)

    async def _resync(self, skus: list[str]) -> None:
        pending = await self._unflushed(skus)
        refused = [] if self.force else [s for s in skus if pending.get(s)]
        self.report.refused += refused
        plans = await self._plan([s for s in skus if s not in refused], pending)
        places = await self._places([p.sku for p in plans])
        for plan in plans:
            if plan.changed() or places.get(plan.sku):
                self.report.changed.append(plan.sku)
                if self.dry_run:
                    print(plan.diff(), *places.get(plan.sku, []), sep="\n", file=self.out)
        if not self.dry_run:
            await self._write(plans)
        self.report.resynced += [p.sku for p in plans]

    async def _places(self, skus: list[str]) -> dict[str, list[str]]:
        """With ``dry_run``: per SKU, the locations whose counters resync would rewrite."""
        if not self.dry_run or not skus:
            return {}
        return await resync_diffs(self.redis, self.conn, self.settings, skus)

    async def _unflushed(self, skus: list[str]) -> dict[str, int]:
        """Unflushed events per SKU; waits up to ``wait_s`` for a writer to flush them."""
        deadline = time.monotonic() + (0 if self.dry_run or self.force else self.wait_s)
        while True:
            self.events = await unflushed(self.redis, self.conn, self.settings, skus)
            counts = {sku: len(evs) for sku, evs in self.events.items() if evs}
            if not counts or time.monotonic() >= deadline:
                return counts
            await asyncio.sleep(0.2)

    async def _plan(self, skus: list[str], pending: dict[str, int]) -> list[SkuPlan]:
        target = await pg_levels(self.conn, skus)
        self.report.missing += [s for s in skus if s not in target]
        skus = [s for s in skus if s in target]
        current = await redis_levels(self.redis, self.settings, skus)
        restore = await self._pg_lines(skus)
        in_redis = await self._redis_reserved(skus)
        drop = await self._stale(in_redis, restore)
        buyers = await snapshot.pg_buyers(self.conn, skus)
        return [
            SkuPlan(
                sku,
                target[sku],
                current[sku],
                restore.get(sku, []),
                drop.get(sku, []),
                len(in_redis.get(sku, [])),
                pending.get(sku, 0),
                buyers[sku],
            )
            for sku in skus
        ]

    async def _pg_lines(self, skus: list[str]) -> dict[str, list[Line]]:
        """RESERVED lines, and terminal ones still within retention (so late retries replay)."""
        rows = await self.conn.fetch(
            "SELECT order_id, sku, qty, state, expires_at, customer_id FROM reservation_lines"
            " WHERE sku = any($1::text[]) AND (state = 'reserved' OR (state <> 'aborted'"
            " AND updated_at > now() - make_interval(secs => $2))) ORDER BY sku, order_id",
            skus,
            float(self.settings.retention_s),
        )
        out: dict[str, list[Line]] = defaultdict(list)
        for r in rows:
            out[r["sku"]].append(line_of(r))
        return out

    async def _redis_reserved(self, skus: list[str]) -> dict[str, list[str]]:
        """Order ids of the lines in each SKU's bucket expiry index (RESERVED in Redis)."""
        wanted = set(skus)
        buckets = sorted({keys.bucket_of(s, self.settings.buckets) for s in skus})
        pipe = self.redis.pipeline(transaction=False)
        for b in buckets:
            pipe.zrange(keys.due_key(b), 0, -1)
        out: dict[str, list[str]] = defaultdict(list)
        for members in await pipe.execute():
            for member in members:
                sku, order_id = keys.split_member(member)
                if sku in wanted:
                    out[sku].append(order_id)
        return out

    async def _stale(
        self, in_redis: dict[str, list[str]], restore: dict[str, list[Line]]
    ) -> dict[str, list[Line]]:
        keep = {(sku, line.order_id) for sku, lines in restore.items() for line in lines}
        stale = [(s, o) for s, orders in in_redis.items() for o in orders if (s, o) not in keep]
        if not stale:
            return {}
        rows = await self.conn.fetch(
            "SELECT r.order_id, r.sku, r.qty, r.state, r.expires_at, r.customer_id"
            " FROM reservation_lines r"
            " JOIN unnest($1::text[], $2::text[]) AS u(sku, o) ON r.sku = u.sku"
            " AND r.order_id = u.o",
            [s for s, _ in stale],
            [o for _, o in stale],
        )
        known = {(r["sku"], r["order_id"]): r for r in rows}
        out: dict[str, list[Line]] = defaultdict(list)
        for sku, order_id in stale:
            r = known.get((sku, order_id))
            out[sku].append(line_of(r) if r is not None else Line(order_id, ABORTED, 0, 0))
        return out

    async def _write(self, plans: list[SkuPlan]) -> None:
        """Order records first, then each SKU in one step: a SKU is as it was or whole."""
        if self.fences.lost is not None:  # the renewer found a fence gone: write nothing
            raise self.fences.lost
        orders = sorted({line.order_id for p in plans for line in p.restore})
        if orders:
            await self._write_orders(orders)
        writes = (self._write_sku(p) for p in plans)
        seqs: list[int | BaseException] = await asyncio.gather(*writes, return_exceptions=True)
        done = [(p, s) for p, s in zip(plans, seqs, strict=True) if isinstance(s, int)]
        lines = {
            p.sku: [(line.order_id, line.state) for line in p.restore + p.drop] for p, _ in done
        }
        await write_locations(self.scripts, self.conn, self.settings, self.fences.token, lines)
        await self._supersede([p for p, _ in done], [s for _, s in done])
        for seq in seqs:  # FenceLost: the fence ended before the write (stock.core.errors)
            if isinstance(seq, BaseException):
                raise seq

    async def _supersede(self, plans: list[SkuPlan], seqs: list[int]) -> None:
        """With ``force``: lines rewritten here that unflushed events also touch get
        the resync's seq in PostgreSQL, so those older events, once flushed, do not
        overwrite them (the writer never goes back to a lower seq)."""
        rows = []
        for plan, seq in zip(plans, seqs, strict=True):
            touched = {e.order for e in self.events.get(plan.sku, []) if e.op in STATE_AFTER}
            for line in plan.restore + plan.drop:
                if line.order_id in touched:
                    rows.append((line, plan.sku, seq))
        if not rows:
            return
        await self.conn.execute(
            LINES_UPSERT,
            [line.order_id for line, _, _ in rows],
            [sku for _, sku, _ in rows],
            [str(line.qty) for line, _, _ in rows],
            [STATE_NAMES[line.state] for line, _, _ in rows],
            ["" for _ in rows],
            [str(line.expires_ms) for line, _, _ in rows],
            [str(seq) for _, _, seq in rows],
            [line.customer for line, _, _ in rows],
        )

    async def _write_sku(self, plan: SkuPlan) -> int:
        """``resync.lua`` for one SKU: its new seq."""
        bucket = keys.bucket_of(plan.sku, self.settings.buckets)
        keys_ = [keys.sku_key(plan.sku, self.settings.buckets)]
        keys_ += [keys.due_key(bucket), keys.events_key(bucket)]
        t = plan.target
        args: list[Any] = [plan.sku, t.available, t.reserved, t.sold, t.seq]
        args += [self.settings.retention_s * 1000, "resync", self.fences.token]
        limit, held = plan.buyers
        args += ["" if limit is None else limit, len(held)]
        for customer, units in sorted(held.items()):
            args += [customer, units]
        for line in plan.restore + plan.drop:
            keys_.append(keys.line_keys(plan.sku, line.order_id, self.settings.buckets).line)
            args += [line.order_id, line.state, line.qty, line.expires_ms, line.customer]
        return parse_resync(await self.scripts("resync", keys_, args))

    async def _write_orders(self, orders: list[str]) -> None:
        rows = await self.conn.fetch(
            "SELECT order_id, sku, qty, kind, expires_at FROM reservation_lines"
            " WHERE order_id = any($1::text[]) AND state <> 'aborted'",
            orders,
        )
        items: dict[str, list[Item]] = defaultdict(list)
        kinds: dict[str, str] = {}
        expiry: dict[str, int] = defaultdict(int)
        for r in rows:
            items[r["order_id"]].append(Item(r["sku"], r["qty"]))
            kinds[r["order_id"]] = kinds.get(r["order_id"]) or r["kind"]
            expiry[r["order_id"]] = max(expiry[r["order_id"]], ms_of(r["expires_at"]))
        retention = self.settings.retention_s * 1000
        replies = await asyncio.gather(
            *(
                self.scripts(
                    "resync_order",
                    [keys.order_key(order_id)],
                    [
                        order_record(kinds.get(order_id) or "reserve", items_spec(items[order_id])),
                        expiry[order_id],
                        retention,
                    ],
                )
                for order_id in orders
            )
        )
        for reply in replies:
            expect_ok(reply, "resync_order.lua")


async def resync(
    client: Any,
    settings: Settings,
    dsn: str,
    skus: list[str] | None,
    *,
    dry_run: bool = False,
    force: bool = False,
    wait_s: float = 5.0,
    out: TextIO = sys.stdout,
) -> int:
    """The ``stock resync`` command: returns the exit status (1 when a SKU was refused)."""
    conn = await asyncpg.connect(dsn)
    try:
        run = Resync(client, settings, conn, dry_run=dry_run, force=force, wait_s=wait_s, out=out)
        if skus is not None:  # a sharded SKU's shards come with it (DESIGN §12)
            skus = keys.with_shards(skus, list(await pg_levels(conn, None)))
        report = await run.run(skus)
        if not dry_run:
            await StockEngine(client, settings).sharded.restore(report.resynced)
    except FenceError as exc:
        print(f"resync: {exc}; each SKU is as it was or resynced: run it again", file=out)
        return 3
    finally:
        await conn.close()
    verb = "would resync" if dry_run else "resynced"
    print(f"resync: {verb} {len(report.resynced)} SKUs, {len(report.changed)} changed", file=out)
    if report.missing:
        print(f"resync: not in PostgreSQL, left alone: {' '.join(report.missing)}", file=out)
    if report.refused:
        print(
            "resync: refused (unflushed events; run the writer or use --force): "
            + " ".join(report.refused),
            file=out,
        )
    return 1 if report.refused else 0
