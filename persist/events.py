"""Stream events and how one batch of them lands in PostgreSQL.

An event is one entry of a bucket stream (``stock:{b<n>}:events``), written by
``lua/_lib.lua``'s ``commit``: op, sku, order, qty, the counters after the
change, the SKU's ``seq``, server time ``at`` (ms), line expiry ``exp`` (ms, 0
if none) and reason. ``apply_batch`` writes a batch in one transaction:

- the ledger gets one row per event (COPY), ``(stream, stream_id)`` unique;
- ``stock_levels`` takes the counters of each SKU's latest event, and never
  goes back to an older ``seq``;
- ``reservation_lines`` takes each line's latest state (an ``abort`` leaves the
  row with state ``aborted``: the line was deleted in Redis, the row keeps the
  audit trail; a later retry of the order overwrites it);
- ``stream_offsets`` records the last entry applied per stream. Entries at or
  below the recorded offset are skipped, so a batch re-read after a crash is
  never applied twice.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

import asyncpg

LINE_STATES = {
    "reserve": "reserved",
    "deduct": "confirmed",
    "confirm": "confirmed",
    "release": "released",
    "abort": "aborted",
    "cancel": "cancelled",
    "extend": "reserved",
    "expire": "expired",
}
ORDER_KINDS = {"reserve": "reserve", "deduct": "deduct"}

LEDGER_COLUMNS = (
    "sku", "order_id", "op", "qty", "at", "available", "reserved", "sold", "seq",
    "expires_at", "reason", "stream", "stream_id",
)  # fmt: skip

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class StreamId(NamedTuple):
    ms: int
    seq: int

    @classmethod
    def parse(cls, text: str) -> StreamId:
        ms, _, seq = text.partition("-")
        return cls(int(ms), int(seq or 0))

    def __str__(self) -> str:
        return f"{self.ms}-{self.seq}"

    def next(self) -> StreamId:
        return StreamId(self.ms, self.seq + 1)


class Event(NamedTuple):
    stream: str
    id: StreamId
    op: str
    sku: str
    order: str
    qty: int
    available: int
    reserved: int
    sold: int
    seq: int
    at: int
    exp: int
    reason: str


def parse_event(stream: str, entry_id: str, fields: dict[str, str]) -> Event:
    """One stream entry as an Event."""
    return Event(
        stream,
        StreamId.parse(entry_id),
        fields["op"],
        fields["sku"],
        fields.get("order", ""),
        int(fields["qty"]),
        int(fields["available"]),
        int(fields["reserved"]),
        int(fields["sold"]),
        int(fields["seq"]),
        int(fields["at"]),
        int(fields.get("exp") or 0),
        fields.get("reason", ""),
    )


def ms_time(ms: int) -> datetime:
    """A Redis server time in ms as an aware datetime."""
    return _EPOCH + timedelta(milliseconds=ms)


def _ledger_row(e: Event) -> tuple[Any, ...]:
    return (
        e.sku, e.order, e.op, e.qty, ms_time(e.at), e.available, e.reserved, e.sold, e.seq,
        ms_time(e.exp) if e.exp else None, e.reason, e.stream, str(e.id),
    )  # fmt: skip


_OFFSETS_ENSURE = """
INSERT INTO stream_offsets (stream) SELECT unnest($1::text[]) ON CONFLICT DO NOTHING
"""
_OFFSETS_LOCK = """
SELECT stream, last_ms, last_seq FROM stream_offsets WHERE stream = any($1::text[])
ORDER BY stream FOR UPDATE
"""
_LEVELS = """
INSERT INTO stock_levels AS l (sku, available, reserved, sold, seq, updated_at)
SELECT u.sku, u.a, u.r, u.s, u.seq, now()
FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bigint[], $5::bigint[])
    AS u(sku, a, r, s, seq)
ON CONFLICT (sku) DO UPDATE SET available = excluded.available,
    reserved = excluded.reserved, sold = excluded.sold, seq = excluded.seq,
    updated_at = excluded.updated_at
WHERE excluded.seq > l.seq
"""
LINES_UPSERT = """
INSERT INTO reservation_lines AS r (order_id, sku, qty, state, kind, expires_at, seq, updated_at)
SELECT u.o, u.sku, u.qty, u.state, u.kind, u.exp, u.seq, now()
FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[], $5::text[],
            $6::timestamptz[], $7::bigint[]) AS u(o, sku, qty, state, kind, exp, seq)
ON CONFLICT (order_id, sku) DO UPDATE SET qty = excluded.qty, state = excluded.state,
    kind = CASE WHEN excluded.kind <> '' THEN excluded.kind ELSE r.kind END,
    expires_at = excluded.expires_at, seq = excluded.seq, updated_at = excluded.updated_at
WHERE excluded.seq > r.seq
"""
_OFFSETS_SET = """
UPDATE stream_offsets AS o SET last_ms = u.ms, last_seq = u.seq, updated_at = now()
FROM unnest($1::text[], $2::bigint[], $3::bigint[]) AS u(stream, ms, seq)
WHERE o.stream = u.stream
"""


async def read_offsets(conn: asyncpg.Connection, streams: list[str]) -> dict[str, StreamId]:
    """The recorded offset of each stream (0-0 when none)."""
    rows = await conn.fetch(
        "SELECT stream, last_ms, last_seq FROM stream_offsets WHERE stream = any($1::text[])",
        streams,
    )
    found = {r["stream"]: StreamId(r["last_ms"], r["last_seq"]) for r in rows}
    return {s: found.get(s, StreamId(0, 0)) for s in streams}


async def apply_batch(conn: asyncpg.Connection, events: list[Event]) -> dict[str, StreamId]:
    """Apply ``events`` (each stream's in id order) in one transaction.

    Returns the new offset of every stream in the batch; events at or below
    the offset recorded in PostgreSQL are skipped.
    """
    streams = sorted({e.stream for e in events})
    async with conn.transaction():
        await conn.execute(_OFFSETS_ENSURE, streams)
        rows = await conn.fetch(_OFFSETS_LOCK, streams)
        offsets = {r["stream"]: StreamId(r["last_ms"], r["last_seq"]) for r in rows}
        fresh = [e for e in events if e.id > offsets[e.stream]]
        if fresh:
            await _write(conn, fresh)
        new = dict(offsets)
        for e in fresh:
            if e.id > new[e.stream]:
                new[e.stream] = e.id
        changed = [s for s in streams if new[s] != offsets[s]]
        if changed:
            await conn.execute(
                _OFFSETS_SET,
                changed,
                [new[s].ms for s in changed],
                [new[s].seq for s in changed],
            )
    return new


async def _write(conn: asyncpg.Connection, events: list[Event]) -> None:
    await conn.copy_records_to_table(
        "stock_ledger", records=[_ledger_row(e) for e in events], columns=LEDGER_COLUMNS
    )
    levels: dict[str, Event] = {}
    lines: dict[tuple[str, str], Event] = {}
    kinds: dict[tuple[str, str], str] = {}  # from the line's reserve/deduct event, if in batch
    for e in events:
        old = levels.get(e.sku)
        if old is None or e.seq > old.seq:
            levels[e.sku] = e
        if e.op in LINE_STATES:
            key = (e.order, e.sku)
            prev = lines.get(key)
            if prev is None or e.seq > prev.seq:
                lines[key] = e
            if e.op in ORDER_KINDS:
                kinds[key] = ORDER_KINDS[e.op]
    latest = list(levels.values())
    await conn.execute(
        _LEVELS,
        [e.sku for e in latest],
        [e.available for e in latest],
        [e.reserved for e in latest],
        [e.sold for e in latest],
        [e.seq for e in latest],
    )
    if lines:
        changes = list(lines.values())
        await conn.execute(
            LINES_UPSERT,
            [e.order for e in changes],
            [e.sku for e in changes],
            [e.qty for e in changes],
            [LINE_STATES[e.op] for e in changes],
            [kinds.get((e.order, e.sku), "") for e in changes],
            [ms_time(e.exp) if e.exp else None for e in changes],
            [e.seq for e in changes],
        )
