"""Locations in PostgreSQL (DESIGN §13): what the writer does with an event's ``loc``
field, and what resync and reconcile read back.

An event of a SKU with locations carries ``loc``: per location it touched
``name:qty:available:reserved:sold:in_transit`` (that location's counters after
the event), joined by ``,``; a ``transfer`` event adds its destination as
``to:qty`` (two values, no counters). From it the writer keeps

- ``stock_location_levels``: each (SKU, location)'s counters of the latest event
  that touched it (never going back to an older ``seq``);
- ``reservation_lines.allocations``: a line's ``location:qty,...``, and
  ``reservation_lines.pin`` the location its item named (the event's ``pin``);
- ``stock_ledger.location``: the names (``persist/events.py``).
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg

from stock.core import keys
from stock.core.config import Settings
from stock.redis.scripts import Scripts, raise_for

# The SQL of one batch (``persist/events.py`` runs it with the rest, from writer_batch).
LOCATION_LEVELS = """
INSERT INTO stock_location_levels AS l
    (sku, location, available, reserved, sold, in_transit, seq, updated_at)
SELECT DISTINCT ON (b.sku, p[1]) b.sku, p[1], p[3]::bigint, p[4]::bigint, p[5]::bigint,
    p[6]::bigint, b.seq, now()
FROM writer_batch b,
    LATERAL (SELECT string_to_array(part, ':') AS p
             FROM unnest(string_to_array(b.loc, ',')) AS part) AS parts
WHERE b.loc <> '' AND cardinality(p) = 6
ORDER BY b.sku, p[1], b.seq DESC
ON CONFLICT (sku, location) DO UPDATE SET available = excluded.available,
    reserved = excluded.reserved, sold = excluded.sold, in_transit = excluded.in_transit,
    seq = excluded.seq, updated_at = excluded.updated_at
WHERE excluded.seq > l.seq;
"""
# 'name:qty:a:r:s:t,...' -> 'name:qty,...' (NULL when the SKU has no locations)
LINE_ALLOCATIONS = (
    r"CASE WHEN loc <> '' THEN regexp_replace(loc, '(:-?[0-9]+){4}(,|$)', '\2', 'g') END"
)


async def pg_locations(conn: asyncpg.Connection, skus: list[str]) -> dict[str, dict[str, Any]]:
    """Per SKU with locations: ``at`` {location: (a, r, s, t)}, ``transit``, its
    ``allocation`` (the latest ``allocation`` event's ``strategy;order;split``), its
    ``home`` (the location of its first ``set``/``adjust`` event) and the transfers
    [(transfer_id, from, to, qty, state T in transit or D received, reason)]."""
    out: dict[str, dict[str, Any]] = {}
    rows = await conn.fetch(
        "SELECT sku, location, available, reserved, sold, in_transit FROM stock_location_levels"
        " WHERE sku = any($1::text[]) ORDER BY sku, location",
        skus,
    )
    for r in rows:
        sku = out.setdefault(r["sku"], {"at": {}, "transfers": [], "allocation": "", "home": ""})
        sku["at"][r["location"]] = (r["available"], r["reserved"], r["sold"], r["in_transit"])
    if not out:
        return out
    found = list(out)
    for r in await conn.fetch(_LATEST_ALLOCATION, found):
        out[r["sku"]]["allocation"] = r["reason"]
    for r in await conn.fetch(_HOME, found):
        out[r["sku"]]["home"] = r["location"]
    for r in await conn.fetch(_TRANSFERS, found):
        origin, _, to = r["location"].partition(",")
        state = "D" if r["received"] else "T"
        out[r["sku"]]["transfers"].append((r["order_id"], origin, to, r["qty"], state, r["reason"]))
    for sku in out.values():
        sku["transit"] = sum(t[3] for t in sku["transfers"] if t[4] == "T")
    return out


_LATEST_ALLOCATION = """
SELECT DISTINCT ON (sku) sku, reason FROM stock_ledger
WHERE sku = any($1::text[]) AND op = 'allocation' ORDER BY sku, seq DESC
"""
_HOME = """
SELECT DISTINCT ON (sku) sku, location FROM stock_ledger
WHERE sku = any($1::text[]) AND op IN ('set', 'adjust') AND location IS NOT NULL
ORDER BY sku, seq
"""
_TRANSFERS = """
SELECT t.sku, t.order_id, t.location, t.qty, t.reason, EXISTS (
    SELECT 1 FROM stock_ledger r WHERE r.sku = t.sku AND r.op = 'receive'
      AND r.order_id = t.order_id) AS received
FROM stock_ledger t
WHERE t.sku = any($1::text[]) AND t.op = 'transfer'
ORDER BY t.sku, t.seq
"""


async def write_locations(
    scripts: Scripts,
    conn: asyncpg.Connection,
    settings: Settings,
    token: str,
    lines: dict[str, list[tuple[str, str]]],
) -> None:
    """``stock resync``: each SKU's locations, transfers and its restored lines'
    allocations (``lua/resync_locations.lua``), under the run's fences. ``lines``:
    per SKU the (order_id, state code) of the lines resync.lua wrote."""
    skus = sorted(lines)
    if not skus:
        return
    places = await pg_locations(conn, skus)
    rows = await conn.fetch(
        "SELECT sku, order_id, allocations, pin FROM reservation_lines"
        " WHERE sku = any($1::text[]) AND allocations IS NOT NULL",
        skus,
    )
    # the allocation record 'pin|location:qty,...' (lua/_loc.lua), its pin restored
    allocs = {(r["sku"], r["order_id"]): f"{r['pin'] or ''}|{r['allocations']}" for r in rows}
    calls = []
    for sku in skus:
        keys_, args = _resync_call(sku, places.get(sku), lines[sku], allocs, settings, token)
        calls.append(scripts("resync_locations", keys_, args))
    for reply in await asyncio.gather(*calls):
        if reply[0] != "OK":
            raise_for(reply, script="resync_locations.lua")


def _resync_call(
    sku: str,
    place: dict[str, Any] | None,
    lines: list[tuple[str, str]],
    allocs: dict[tuple[str, str], str],
    settings: Settings,
    token: str,
) -> tuple[list[str], list[Any]]:
    b = settings.buckets
    keys_ = [keys.sku_key(sku, b), keys.locations_key(sku, b), keys.transfers_key(sku, b)]
    args: list[Any] = [token, settings.retention_s * 1000]
    place = place or {"at": {}, "transfers": [], "allocation": "", "home": "", "transit": 0}
    args += [place["allocation"], place["home"], place["transit"], len(place["at"])]
    for name, counters in sorted(place["at"].items()):
        args += [name, *counters]
    args.append(len(place["transfers"]))
    for transfer_id, origin, to, qty, state, reason in place["transfers"]:
        args += [transfer_id, f"{origin}|{to}|{qty}|{state}|{reason}"]
    for order_id, state in lines:
        keys_.append(keys.alloc_key(sku, order_id, b))
        args += [state, allocs.get((sku, order_id), "")]
    return keys_, args
