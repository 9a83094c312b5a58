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

# One round trip; each statement skips everything when no subscription wants its types
# (only sold-out / back-in-stock need each event's previous ``available``: a sort).
OFFER = f"""
INSERT INTO webhook_deliveries ({_COLUMNS})
SELECT s.id, e.type, {_VALUES.format(e="e", order="nullif(e.order_id, '')", location=_LOCATION)}
FROM (
    SELECT b.*, CASE b.op WHEN 'cancel' THEN 'order.cancelled'
        WHEN 'expire' THEN 'reservation.expired' ELSE 'order.confirmed' END AS type
    FROM writer_batch b
    WHERE b.op IN ('confirm', 'deduct', 'cancel', 'expire')
      AND NOT (b.op = 'expire' AND b.reason = '{UNDO_HOLD}')
      AND EXISTS (SELECT 1 FROM webhook_subscriptions WHERE events && {_ORDER_TYPES})
) AS e
JOIN webhook_subscriptions s ON e.type = any(s.events)
ORDER BY e.seq, s.id;

INSERT INTO webhook_deliveries ({_COLUMNS})
SELECT s.id, e.type, {_VALUES.format(e="e", order="nullif(e.order_id, '')", location="NULL")}
FROM (
    SELECT ev.*, CASE WHEN ev.available <= 0 THEN 'stock.sold_out'
        ELSE 'stock.back_in_stock' END AS type
    FROM (
        SELECT b.*, coalesce(lag(b.available) OVER (PARTITION BY b.sku COLLATE "C"
            ORDER BY b.seq), l.available, 0) AS before
        FROM writer_batch b LEFT JOIN stock_levels l ON l.sku = b.sku
        WHERE EXISTS (SELECT 1 FROM webhook_subscriptions WHERE events && {_STOCK_TYPES})
    ) AS ev
    WHERE (ev.available <= 0) <> (ev.before <= 0)
) AS e
JOIN webhook_subscriptions s ON e.type = any(s.events)
ORDER BY e.seq, s.id;

INSERT INTO webhook_deliveries AS d ({_COLUMNS})
SELECT s.id, 'stock.changed', {_VALUES.format(e="c", order="NULL", location="NULL")}
FROM (
    SELECT DISTINCT ON (sku COLLATE "C") sku, available, reserved, sold, seq, at_ms
    FROM writer_batch
    WHERE op NOT IN ('extend', 'limit')  -- they change no counters
      AND EXISTS (SELECT 1 FROM webhook_subscriptions WHERE 'stock.changed' = any(events))
    ORDER BY sku COLLATE "C", seq DESC
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
