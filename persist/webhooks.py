"""Webhooks (DESIGN §11): the outbox side and the subscriptions.

``offer`` runs inside the writer's batch transaction (``persist.events``), after
the batch is COPYed into ``writer_batch`` and before ``stock_levels`` moves on,
so a delivery exists exactly when its event is durable: a batch that rolls back
offers nothing, and a batch applied once offers once.

- ``order.confirmed`` (confirm, deduct), ``order.cancelled``,
  ``reservation.expired``: one per event (one order line), except the
  ``expire`` of an undone multi-node hold (reason ``undo-hold``: that line was
  offered expired already).
- ``stock.sold_out`` / ``stock.back_in_stock``: an event whose ``available`` is 0
  where the SKU's previous event (in the batch, else ``stock_levels``) had more,
  or the other way round (a SKU never seen counts as 0).
- ``stock.changed``: coalesced. Each batch offers the latest counters of each
  SKU (``extend`` and ``limit`` events, which change none, offer nothing);
  the (subscription, SKU) row still ``pending`` takes them (with a new
  event id) instead of a second row, and the dispatcher keeps one second
  between two of them (``webhook_throttle``).

The dispatcher that sends them is ``persist.dispatcher``.
"""

from __future__ import annotations

from typing import Any

import asyncpg

EVENT_TYPES = (
    "stock.changed",
    "stock.sold_out",
    "stock.back_in_stock",
    "reservation.expired",
    "order.confirmed",
    "order.cancelled",
)
STATES = ("pending", "sending", "delivered", "failed", "superseded")

# abort.lua's reason for undoing a refused multi-node hold (lua/_lib.lua UNDO_HOLD):
# its ``expire`` puts back a line whose expiry was offered already
UNDO_HOLD = "undo-hold"
_ORDER_TYPES = "'{order.confirmed,order.cancelled,reservation.expired}'::text[]"
_STOCK_TYPES = "'{stock.sold_out,stock.back_in_stock}'::text[]"
_COLUMNS = (
    "subscription_id, type, sku, order_id, available, reserved, sold, seq, created_at, location"
)
_VALUES = (
    "{e}.sku, {order}, {e}.available, {e}.reserved, {e}.sold, {e}.seq, "
    "to_timestamp({e}.at_ms::float8 / 1000), {location}"
)
# an order event's locations (DESIGN §13: 'berlin' or 'berlin,paris'), else NULL
_LOCATION = "nullif(regexp_replace(e.loc, ':[^,]*', '', 'g'), '')"

# A shard's move (shard_move.lua, reason 'move <id> to|from <shard>') changes no total:
# its units count as available while in flight, as GET counts them (DESIGN §12)
_MOVE = r"b.op = 'adjust' AND b.reason ~ '^move \S+ (to|from) \S+$'"
TOTALS_TABLE = """
CREATE TEMP TABLE IF NOT EXISTS writer_totals (
    sku text, shard_sku text, op text, order_id text, reason text, loc text, at_ms bigint,
    available bigint, reserved bigint, sold bigint, seq bigint, before bigint, n bigint
) ON COMMIT DELETE ROWS
"""
# Each event with its SKU's totals after it (DESIGN §12: a sharded SKU's webhooks name the
# SKU `s`, never the shard `s#i`, and carry the sum over its shards). A shard's change is
# its counters minus its previous event's (in the batch, else its shard_levels row, else
# its stock_levels row); the totals are the SKU's stock_levels row (its totals, migration
# 0009) before the batch plus the changes so far, in
# server time (a shard's events in seq order). seq is the sum of the shards' seqs: it grows
# with every change. An ordinary SKU's totals telescope to its own counters and seq.
_TOTALS = f"""
DELETE FROM writer_totals;
INSERT INTO writer_totals
SELECT t.base, t.sku, t.op, t.order_id, t.reason, t.loc, t.at_ms,
    coalesce(p.available, 0) + sum(t.da) OVER w, coalesce(p.reserved, 0) + sum(t.dr) OVER w,
    coalesce(p.sold, 0) + sum(t.ds) OVER w, coalesce(p.seq, 0) + sum(t.dq) OVER w,
    coalesce(p.available, 0) + sum(t.da) OVER w - t.da, row_number() OVER w
FROM (
    SELECT b.*, split_part(b.sku, '#', 1) AS base,
        max(b.at_ms) OVER s AS at_max,
        CASE WHEN {_MOVE} THEN 0
            ELSE b.available - coalesce(lag(b.available) OVER s, h.available, l.available, 0)
        END AS da,
        b.reserved - coalesce(lag(b.reserved) OVER s, h.reserved, l.reserved, 0) AS dr,
        b.sold - coalesce(lag(b.sold) OVER s, h.sold, l.sold, 0) AS ds,
        b.seq - coalesce(lag(b.seq) OVER s, h.seq, l.seq, 0) AS dq
    FROM writer_batch b LEFT JOIN shard_levels h ON h.sku = b.sku
        LEFT JOIN stock_levels l ON l.sku = b.sku
    WHERE EXISTS (SELECT 1 FROM webhook_subscriptions)
    WINDOW s AS (PARTITION BY b.sku COLLATE "C" ORDER BY b.seq)
) AS t LEFT JOIN (
    SELECT sku AS base, available, reserved, sold, seq FROM stock_levels
    WHERE sku IN (SELECT split_part(sku, '#', 1) FROM writer_batch)
      AND EXISTS (SELECT 1 FROM webhook_subscriptions)
) AS p USING (base)
WINDOW w AS (PARTITION BY t.base COLLATE "C" ORDER BY t.at_max, t.sku COLLATE "C", t.seq
    ROWS UNBOUNDED PRECEDING);
"""
_COLUMNS = (
    "subscription_id, type, sku, order_id, available, reserved, sold, seq, created_at, location"
)
_VALUES = (
    "{e}.sku, {order}, {e}.available, {e}.reserved, {e}.sold, {e}.seq, "
    "to_timestamp({e}.at_ms::float8 / 1000), {location}"
)
# an order event's locations (DESIGN §13: 'berlin' or 'berlin,paris'), else NULL
_LOCATION = "nullif(regexp_replace(e.loc, ':[^,]*', '', 'g'), '')"

# One round trip; nothing to do when there is no subscription (writer_totals stays
# empty); sold-out / back-in-stock compare each event's totals with the totals before it.
OFFER = f"""{_TOTALS}
INSERT INTO webhook_deliveries ({_COLUMNS})
SELECT s.id, e.type, {_VALUES.format(e="e", order="nullif(e.order_id, '')", location=_LOCATION)}
FROM (
    SELECT b.*, CASE b.op WHEN 'cancel' THEN 'order.cancelled'
        WHEN 'expire' THEN 'reservation.expired' ELSE 'order.confirmed' END AS type
    FROM writer_totals b
    WHERE b.op IN ('confirm', 'deduct', 'cancel', 'expire')
      AND NOT (b.op = 'expire' AND b.reason = '{UNDO_HOLD}')
      AND EXISTS (SELECT 1 FROM webhook_subscriptions WHERE events && {_ORDER_TYPES})
) AS e
JOIN webhook_subscriptions s ON e.type = any(s.events)
ORDER BY e.sku, e.n, s.id;

INSERT INTO webhook_deliveries ({_COLUMNS})
SELECT s.id, e.type, {_VALUES.format(e="e", order="nullif(e.order_id, '')", location="NULL")}
FROM (
    SELECT b.*, CASE WHEN b.available <= 0 THEN 'stock.sold_out'
        ELSE 'stock.back_in_stock' END AS type
    FROM writer_totals b
    WHERE (b.available <= 0) <> (b.before <= 0)
      AND EXISTS (SELECT 1 FROM webhook_subscriptions WHERE events && {_STOCK_TYPES})
) AS e
JOIN webhook_subscriptions s ON e.type = any(s.events)
ORDER BY e.sku, e.n, s.id;

INSERT INTO webhook_deliveries AS d ({_COLUMNS})
SELECT s.id, 'stock.changed', {_VALUES.format(e="c", order="NULL", location="NULL")}
FROM (
    SELECT DISTINCT ON (sku COLLATE "C") sku, available, reserved, sold, seq, at_ms
    FROM writer_totals
    WHERE op NOT IN ('extend', 'limit', 'shards')  -- they change no counters
      AND EXISTS (SELECT 1 FROM webhook_subscriptions WHERE 'stock.changed' = any(events))
    ORDER BY sku COLLATE "C", n DESC
) AS c
JOIN webhook_subscriptions s ON 'stock.changed' = any(s.events)
ON CONFLICT (subscription_id, sku) WHERE type = 'stock.changed' AND state = 'pending'
DO UPDATE SET event_id = gen_random_uuid(), seq = excluded.seq,
    available = excluded.available, reserved = excluded.reserved, sold = excluded.sold,
    created_at = excluded.created_at
WHERE excluded.seq > d.seq;
"""


async def offer(conn: asyncpg.Connection) -> None:
    """Put the deliveries of the batch in ``writer_batch`` into the outbox (call it in
    the batch's transaction, before ``stock_levels`` is updated)."""
    await conn.execute(OFFER)


# -- subscriptions (the admin API) ------------------------------------------------


async def subscribe(conn: Any, url: str, events: list[str], secret: str) -> dict[str, Any]:
    row = await conn.fetchrow(
        "INSERT INTO webhook_subscriptions (url, events, secret) VALUES ($1, $2, $3)"
        " RETURNING id, url, events",
        url,
        events,
        secret,
    )
    return _subscription(row)


async def subscriptions(conn: Any) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        "SELECT id, url, events, created_at FROM webhook_subscriptions ORDER BY created_at, id"
    )
    return [{**_subscription(r), "created_at": r["created_at"]} for r in rows]


async def unsubscribe(conn: Any, subscription_id: str) -> bool:
    """Delete a subscription and its outbox rows; False when there is none."""
    gone = await conn.fetchval(
        "WITH s AS (DELETE FROM webhook_subscriptions WHERE id = $1 RETURNING id),"
        " d AS (DELETE FROM webhook_deliveries WHERE subscription_id = $1)"
        " SELECT count(*) FROM s",
        subscription_id,
    )
    return bool(gone)


async def exists(conn: Any, subscription_id: str) -> bool:
    found = await conn.fetchval(
        "SELECT 1 FROM webhook_subscriptions WHERE id = $1", subscription_id
    )
    return found is not None


async def deliveries(
    conn: Any, subscription_id: str, state: str | None, limit: int = 100
) -> list[dict[str, Any]]:
    """The subscription's latest deliveries (newest first), of one state or all."""
    if state is not None and state not in STATES:
        raise ValueError(f"unknown delivery state {state!r}")
    # the state as a literal (one of STATES), so that 'failed' uses its partial index
    where = f" AND state = '{state}'" if state else ""
    rows = await conn.fetch(
        "SELECT event_id, type, sku, order_id, available, reserved, sold, seq, state, attempts,"
        " created_at, next_at, delivered_at, last_status, last_error FROM webhook_deliveries"
        f" WHERE subscription_id = $1{where} ORDER BY id DESC LIMIT $2",
        subscription_id,
        limit,
    )
    return [dict(r) for r in rows]


def data(row: Any) -> dict[str, Any]:
    """The ``data`` of a delivery's body, from its row."""
    body = {
        "sku": row["sku"],
        "available": row["available"],
        "reserved": row["reserved"],
        "sold": row["sold"],
        "seq": row["seq"],
    }
    if row["order_id"] is not None:
        body["order_id"] = row["order_id"]
    if row.get("location") is not None:  # an order event of a SKU with locations (§13)
        body["location"] = row["location"]
    return body


def _subscription(row: Any) -> dict[str, Any]:
    return {"id": str(row["id"]), "url": row["url"], "events": list(row["events"])}
