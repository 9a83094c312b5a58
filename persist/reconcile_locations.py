"""Reconcile per location (DESIGN §13): each (SKU, location)'s counters in Redis
against PostgreSQL's ``stock_location_levels`` with the unflushed events' ``loc``
values applied, and, in Redis, the sum over a SKU's locations against its totals;
and what ``stock resync --dry-run`` would change per location (``resync_diffs``)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import asyncpg

from persist.snapshot import unflushed
from stock.core import keys
from stock.core.config import Settings

Counters = tuple[int, int, int, int]  # available, reserved, sold, in transit


async def location_drifts(
    client: Any, conn: asyncpg.Connection, settings: Settings, skus: list[str] | None
) -> list[str]:
    """One text line per drift (``drift <sku>@<location>: ...``); [] when none."""
    names = sorted(set(skus) if skus is not None else await _located(client, conn))
    if not names:
        return []
    expected = await _expected(client, conn, settings, names)
    found, totals = await _redis(client, settings, names)
    out = []
    for sku, place in sorted(set(expected) | set(found)):
        mine, theirs = found.get((sku, place)), expected.get((sku, place))
        if mine != theirs:
            out.append(f"drift {sku}@{place}: redis {_text(mine)}, postgres {_text(theirs)}")
    for sku, (summed, total) in sorted(totals.items()):
        if summed != total:
            out.append(f"drift {sku}: its locations sum to {summed}, its totals are {total}")
    return out


async def resync_diffs(
    client: Any, conn: asyncpg.Connection, settings: Settings, skus: list[str]
) -> dict[str, list[str]]:
    """Per SKU, one line per location whose Redis counters differ from what resync
    writes (PostgreSQL's ``stock_location_levels``): ``<sku>@<location>: redis
    a/r/s/t -> postgres a/r/s/t`` (``missing`` on either side)."""
    stored = await _stored(conn, skus)
    found, _ = await _redis(client, settings, skus)
    out: dict[str, list[str]] = defaultdict(list)
    for sku, place in sorted(set(stored) | set(found)):
        mine, theirs = found.get((sku, place)), stored.get((sku, place))
        if mine != theirs:
            out[sku].append(f"{sku}@{place}: redis {_text(mine)} -> postgres {_text(theirs)}")
    return out


def _text(counters: Counters | None) -> str:
    return "missing" if counters is None else "/".join(str(c) for c in counters)


async def _located(client: Any, conn: asyncpg.Connection) -> set[str]:
    rows = await conn.fetch("SELECT DISTINCT sku FROM stock_location_levels")
    found = {r["sku"] for r in rows}
    async for key in client.scan_iter(match=f"{keys.PREFIX}:{{b*}}:loc:*", count=1000):
        found.add(str(key).partition(":loc:")[2])
    return found


async def _stored(conn: asyncpg.Connection, skus: list[str]) -> dict[tuple[str, str], Counters]:
    rows = await conn.fetch(
        "SELECT sku, location, available, reserved, sold, in_transit"
        " FROM stock_location_levels WHERE sku = any($1::text[])",
        skus,
    )
    out: dict[tuple[str, str], Counters] = {
        (r["sku"], r["location"]): (r["available"], r["reserved"], r["sold"], r["in_transit"])
        for r in rows
    }
    return out


async def _expected(
    client: Any, conn: asyncpg.Connection, settings: Settings, skus: list[str]
) -> dict[tuple[str, str], Counters]:
    out = await _stored(conn, skus)
    for sku, events in (await unflushed(client, conn, settings, skus)).items():
        for event in events:  # stream order: the last one of a location counts
            for part in filter(None, event.loc.split(",")):
                p = part.split(":")
                if len(p) == 6:
                    out[(sku, p[0])] = (int(p[2]), int(p[3]), int(p[4]), int(p[5]))
    return out


async def _redis(
    client: Any, settings: Settings, skus: list[str]
) -> tuple[dict[tuple[str, str], Counters], dict[str, tuple[tuple[int, ...], tuple[int, ...]]]]:
    pipe = client.pipeline(transaction=False)
    for sku in skus:
        pipe.hgetall(keys.locations_key(sku, settings.buckets))
        pipe.hmget(keys.sku_key(sku, settings.buckets), "available", "reserved", "sold")
    replies = await pipe.execute()
    found: dict[tuple[str, str], Counters] = {}
    totals = {}
    for i, sku in enumerate(skus):
        raw, total = replies[2 * i], replies[2 * i + 1]
        summed = [0, 0, 0]
        for field, value in raw.items():
            if str(field).startswith("@"):
                a, r, s, t = (int(v) for v in str(value).split(","))
                found[(sku, str(field)[1:])] = (a, r, s, t)
                summed = [summed[0] + a, summed[1] + r, summed[2] + s]
        if raw:
            totals[sku] = (tuple(summed), tuple(int(v or 0) for v in total))
    return found, totals
