"""Reading both sides for resync and reconcile: Redis counters, PostgreSQL rows,
and the events still waiting in the streams (after the recorded offsets)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any, NamedTuple

import asyncpg

from persist.events import Event, parse_event, read_offsets
from stock.core import keys
from stock.core.config import Settings
from stock.core.formats import STATE_CODES

SCAN_CHUNK = 10_000


class Levels(NamedTuple):
    """One SKU's counters and event number on one side."""

    available: int
    reserved: int
    sold: int
    seq: int

    def counters(self) -> tuple[int, int, int]:
        return self.available, self.reserved, self.sold

    def text(self) -> str:
        return f"{self.available}/{self.reserved}/{self.sold} (seq {self.seq})"


class RedisSku(NamedTuple):
    levels: Levels | None  # None when the hash has no counters (lost, or only fenced)
    fenced: bool  # a resync's fence holds
    limit: int | None = None  # the per-customer limit


class Buyers(NamedTuple):
    """A SKU's per-customer limit and its customers' units held or bought, as
    PostgreSQL knows them (what the hash's ``limit`` and ``c:<customer>`` fields hold)."""

    limit: int | None
    held: dict[str, int]


async def redis_levels(client: Any, settings: Settings, skus: list[str]) -> dict[str, RedisSku]:
    """Each SKU's counters hash in Redis."""
    pipe = client.pipeline(transaction=False)
    for sku in skus:
        pipe.hmget(keys.sku_key(sku, settings.buckets), "available", "reserved", "sold", "seq")
        pipe.hmget(keys.sku_key(sku, settings.buckets), "fenced", "limit")
    replies = await pipe.execute()
    seconds, micros = await client.time()
    now_ms = int(seconds) * 1000 + int(micros) // 1000
    out = {}
    for i, sku in enumerate(skus):
        values, (fence, limit) = replies[2 * i], replies[2 * i + 1]
        levels = None if values[0] is None else Levels(*(int(v or 0) for v in values))
        out[sku] = RedisSku(
            levels, fence_holds(fence, now_ms), None if limit is None else int(limit)
        )
    return out


def fence_holds(fence: str | None, now_ms: int) -> bool:
    """Whether a ``fenced`` value ``token@until_ms`` still holds (``fence_until`` in
    lua/_lib.lua): a fence that ran out, or of another form, is none."""
    until = (fence or "").rpartition("@")[2]
    return until.isdigit() and int(until) > now_ms


async def redis_skus(client: Any) -> set[str]:
    """Every SKU that has a counters hash in Redis (SCAN over every primary)."""
    found = set()
    async for key in client.scan_iter(match=keys.sku_key_pattern(), count=1000):
        found.add(keys.sku_of_key(key))
    return found


async def pg_levels(conn: asyncpg.Connection, skus: list[str] | None) -> dict[str, Levels]:
    """stock_levels rows: the listed SKUs, or all of them."""
    sql = "SELECT sku, available, reserved, sold, seq FROM stock_levels"
    rows = await (
        conn.fetch(sql + " WHERE sku = any($1::text[])", skus)
        if skus is not None
        else conn.fetch(sql)
    )
    return {r["sku"]: Levels(r["available"], r["reserved"], r["sold"], r["seq"]) for r in rows}


async def pg_buyers(conn: asyncpg.Connection, skus: list[str]) -> dict[str, Buyers]:
    """Each SKU's limit (stock_levels) and the units each customer holds or bought
    (the qty of their reserved and confirmed lines in reservation_lines)."""
    limits = await conn.fetch(
        "SELECT sku, limit_per_customer FROM stock_levels WHERE sku = any($1::text[])", skus
    )
    out = {r["sku"]: Buyers(r["limit_per_customer"], {}) for r in limits}
    rows = await conn.fetch(
        "SELECT sku, customer_id, sum(qty) AS held FROM reservation_lines"
        " WHERE sku = any($1::text[]) AND customer_id IS NOT NULL"
        " AND state IN ('reserved', 'confirmed') GROUP BY sku, customer_id",
        skus,
    )
    for r in rows:
        out.setdefault(r["sku"], Buyers(None, {})).held[r["customer_id"]] = int(r["held"])
    return out


async def unflushed(
    client: Any, conn: asyncpg.Connection, settings: Settings, skus: Iterable[str] | None
) -> dict[str, list[Event]]:
    """Events after the recorded offset of their stream, per SKU (in stream order).

    With ``skus`` only their buckets are read; None reads every bucket.
    """
    wanted = None if skus is None else set(skus)
    buckets = (
        range(settings.buckets)
        if wanted is None
        else sorted({keys.bucket_of(s, settings.buckets) for s in wanted})
    )
    streams = [keys.events_key(b) for b in buckets]
    offsets = await read_offsets(conn, streams)
    out: dict[str, list[Event]] = defaultdict(list)
    for stream in streams:
        start = f"({offsets[stream]}"
        while True:
            entries = await client.xrange(stream, min=start, max="+", count=SCAN_CHUNK)
            for entry_id, fields in entries:
                if not fields:
                    continue
                event = parse_event(stream, entry_id, fields)
                if wanted is None or event.sku in wanted:
                    out[event.sku].append(event)
            if len(entries) < SCAN_CHUNK:
                break
            start = f"({entries[-1][0]}"
    return dict(out)


def expected_levels(pg: Levels | None, events: list[Event], seq: int | None) -> Levels | None:
    """What Redis should hold once ``events`` are flushed on top of ``pg``.

    With ``seq`` (Redis's own) the state at exactly that event is taken when it is
    known, so an event appended after Redis was read does not count as drift.
    """
    known = [pg] if pg is not None else []
    known += [Levels(e.available, e.reserved, e.sold, e.seq) for e in events]
    if not known:
        return None
    if seq is not None:
        for levels in known:
            if levels.seq == seq:
                return levels
    return max(known, key=lambda lv: lv.seq)


class Line(NamedTuple):
    order_id: str
    state: str  # a code of formats.STATE_NAMES
    qty: int
    expires_ms: int
    customer: str = ""  # the buyer ('' for none)


def line_of(row: Any) -> Line:
    """A Line from a reservation_lines row (order_id, state, qty, expires_at, customer_id)."""
    state = STATE_CODES[row["state"]]
    return Line(
        row["order_id"], state, row["qty"], ms_of(row["expires_at"]), row["customer_id"] or ""
    )


def ms_of(at: Any) -> int:
    return 0 if at is None else round(at.timestamp() * 1000)
