"""Stream events and how one batch of them lands in PostgreSQL.

An event is one entry of a bucket stream (``stock:{b<n>}:events``), written by
``lua/_lib.lua``'s ``append_event``: op, qty, the counters after the
change, the SKU's ``seq``, server time ``at`` (ms), line expiry ``exp`` (ms, 0
if none), sku, order, reason, customer, loc and pin. The entry has one field ``e``, those
values but the reason, the customer, loc and pin joined by ``|`` in ``FIELD_ORDER`` (so it
ends with the line's expiry index member ``sku|order_id``; an order id may
itself contain ``|``, a SKU never does), a field ``reason`` only when there is
one, a field ``customer`` only when the line has a buyer and a field ``loc`` only on
a SKU with locations (``persist/locations.py``), with a field ``pin`` when the line's
item named its location. ``decode`` is the
one place in Python that reads that format (``encode`` writes it, for tests and
benchmarks). ``apply_batch`` writes a batch in one transaction: it
COPYs the events into a session table (``writer_batch``), and from there

- the ledger gets one row per event (``customer_id`` NULL when none);
- ``stock_levels`` takes the counters of each SKU's latest event, and never
  goes back to an older ``seq``; its ``limit_per_customer`` comes from the
  SKU's latest ``limit`` event (qty = the limit, 0 for none), if the batch has one;
- ``reservation_lines`` takes each line's latest state and its customer (an ``abort`` leaves the
  row with state ``aborted``: the line was deleted in Redis, the row keeps the
  audit trail; a later retry of the order overwrites it);
- ``stream_offsets`` records the last entry applied per stream. Entries at or
  below the recorded offset are skipped, so a batch re-read after a crash is
  never applied twice.

Resync and reconcile read the unflushed events as ``Event`` tuples instead.
"""

from __future__ import annotations

import io
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, NamedTuple

import asyncpg

from persist import webhooks
from persist.locations import LINE_ALLOCATIONS, LOCATION_LEVELS
from stock.core.formats import DEDUCT_HOLD, ORDER_KINDS, STATE_AFTER

# An event's values in the order of its "e" field, then its reason, customer and loc
# (a SKU with locations, DESIGN §13: 'name:qty:available:reserved:sold:in_transit,...').
FIELD_ORDER = ("op", "qty", "available", "reserved", "sold", "seq", "at", "exp", "sku", "order",
               "reason", "customer", "loc", "pin")  # fmt: skip
BATCH_COLUMNS = (
    "op", "qty", "available", "reserved", "sold", "seq", "at_ms", "expires_ms", "sku",
    "order_id", "reason", "customer_id", "loc", "pin", "stream", "stream_id", "kind",
)  # FIELD_ORDER, where the event came from, the line's order kind  # fmt: skip
_UNPACKED = ("reason", "customer", "loc", "pin")  # fields of their own, each only when there is one
_PACKED = len(FIELD_ORDER) - len(_UNPACKED)  # values in the "e" field


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
    customer: str = ""
    loc: str = ""  # a SKU with locations: each touched location's counters after it
    pin: str = ""  # the location the line's item named (DESIGN §13)


def decode(fields: Mapping[str, str] | Sequence[str]) -> list[str]:
    """One stream entry's values in FIELD_ORDER, from its fields as a parsing client
    returns them (a dict) or raw (the flat field/value list)."""
    if type(fields) is list and len(fields) == 2 and fields[0] == "e":
        values = str(fields[1]).split("|", _PACKED - 1)  # the common case: no reason
        values += ("", "", "", "")
        return values
    named = (
        fields if isinstance(fields, Mapping) else dict(zip(fields[::2], fields[1::2], strict=True))
    )
    packed = named.get("e")
    if packed is None:
        raise ValueError(f"not a stock event (fields {sorted(named)})")
    values = packed.split("|", _PACKED - 1)
    values += (named.get(name, "") for name in _UNPACKED)
    return values


def encode(values: Mapping[str, Any]) -> dict[str, str]:
    """The stream fields of an event given by name, as ``append_event`` writes them
    (for tests and benchmarks; the scripts write the events)."""
    packed = "|".join(
        str(values.get(n) or (0 if n != "order" else "")) for n in FIELD_ORDER[:_PACKED]
    )
    out = {"e": packed}
    for name in _UNPACKED:
        if values.get(name):
            out[name] = str(values[name])
    return out


def named(fields: Mapping[str, str] | Sequence[str]) -> dict[str, str]:
    """One stream entry as {name: value} (text values, as in the stream)."""
    return dict(zip(FIELD_ORDER, decode(fields), strict=True))


def parse_event(stream: str, entry_id: str, fields: Mapping[str, str] | Sequence[str]) -> Event:
    """One stream entry as an Event."""
    op, qty, available, reserved, sold, seq, at, exp, sku, order, reason, customer, loc, pin = (
        decode(fields)
    )
    return Event(
        stream,
        StreamId.parse(entry_id),
        op,
        sku,
        order,
        int(qty),
        int(available),
        int(reserved),
        int(sold),
        int(seq),
        int(at),
        int(exp or 0),
        reason,
        customer,
        loc,
        pin,
    )


_OFFSETS_ENSURE = """
INSERT INTO stream_offsets (stream) SELECT unnest($1::text[]) ON CONFLICT DO NOTHING
"""
_OFFSETS_LOCK = """
SELECT stream, last_ms, last_seq FROM stream_offsets WHERE stream = any($1::text[])
ORDER BY stream FOR UPDATE
"""
_BATCH_TABLE = """
CREATE TEMP TABLE IF NOT EXISTS writer_batch (
    op text, sku text, order_id text, qty bigint, available bigint, reserved bigint,
    sold bigint, seq bigint, at_ms bigint, expires_ms bigint, reason text, customer_id text,
    loc text, pin text, stream text, stream_id text, kind text
) ON COMMIT DELETE ROWS
"""
_STATE_OF_OP = "CASE op " + " ".join(
    f"WHEN '{op}' THEN '{state}'" for op, state in STATE_AFTER.items()
)
_LINE_OPS = ", ".join(f"'{op}'" for op in STATE_AFTER)
# A SKU (and so each of its lines) lives in one stream, in seq order: the entry
# with the highest seq of a SKU or line in the batch is its latest.
_LEDGER_COLUMNS = tuple(c for c in BATCH_COLUMNS[:-1] if c != "pin")
# the ledger's location: the names of the locations an event touched ('berlin,paris')
_LOCATION_NAMES = "CASE WHEN loc <> '' THEN regexp_replace(loc, ':[^,]*', '', 'g') END"
_FROM_BATCH = f"""
INSERT INTO stock_ledger ({", ".join(_LEDGER_COLUMNS).replace("loc", "location")})
SELECT {
    ", ".join(_LEDGER_COLUMNS)
    .replace("customer_id", "nullif(customer_id, '')")
    .replace("loc", _LOCATION_NAMES)
}
FROM writer_batch;

{LOCATION_LEVELS}

INSERT INTO stock_levels AS l
    (sku, available, reserved, sold, seq, limit_per_customer, limit_seq, updated_at)
SELECT c.sku, c.available, c.reserved, c.sold, c.seq, m.per_customer, m.seq, now()
FROM (
    SELECT DISTINCT ON (sku) sku, available, reserved, sold, seq
    FROM writer_batch ORDER BY sku, seq DESC
) AS c LEFT JOIN (
    SELECT DISTINCT ON (sku) sku, nullif(qty, 0) AS per_customer, seq
    FROM writer_batch WHERE op = 'limit' ORDER BY sku, seq DESC
) AS m USING (sku)
ON CONFLICT (sku) DO UPDATE SET available = excluded.available,
    reserved = excluded.reserved, sold = excluded.sold, seq = excluded.seq,
    updated_at = excluded.updated_at,
    limit_per_customer = CASE WHEN excluded.limit_seq IS NULL THEN l.limit_per_customer
        ELSE excluded.limit_per_customer END,
    limit_seq = coalesce(excluded.limit_seq, l.limit_seq)
WHERE excluded.seq > l.seq;

INSERT INTO reservation_lines AS r
    (order_id, sku, qty, state, kind, expires_at, seq, customer_id, allocations, pin,
     updated_at)
SELECT order_id, sku, qty, {_STATE_OF_OP} END, kind,
    CASE WHEN expires_ms > 0 THEN to_timestamp(expires_ms::float8 / 1000) END, seq,
    nullif(customer_id, ''), {LINE_ALLOCATIONS}, nullif(pin, ''), now()
FROM (
    SELECT DISTINCT ON (order_id, sku) order_id, sku, qty, op, expires_ms, seq, kind, customer_id,
        loc, pin
    FROM writer_batch WHERE op IN ({_LINE_OPS})
    ORDER BY order_id, sku, seq DESC
) AS latest
ON CONFLICT (order_id, sku) DO UPDATE SET qty = excluded.qty, state = excluded.state,
    kind = CASE WHEN excluded.kind <> '' THEN excluded.kind ELSE r.kind END,
    expires_at = excluded.expires_at, seq = excluded.seq, updated_at = excluded.updated_at,
    customer_id = coalesce(excluded.customer_id, r.customer_id),
    allocations = coalesce(excluded.allocations, r.allocations),
    pin = coalesce(excluded.pin, r.pin)
WHERE excluded.seq > r.seq;
"""
LINES_UPSERT = """
INSERT INTO reservation_lines AS r
    (order_id, sku, qty, state, kind, expires_at, seq, customer_id, updated_at)
SELECT u.o, u.sku, u.qty::bigint, u.state, u.kind,
    CASE WHEN u.exp::bigint > 0 THEN to_timestamp(u.exp::float8 / 1000) END, u.seq::bigint,
    nullif(u.customer, ''), now()
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
    $8::text[]) AS u(o, sku, qty, state, kind, exp, seq, customer)
ON CONFLICT (order_id, sku) DO UPDATE SET qty = excluded.qty, state = excluded.state,
    kind = CASE WHEN excluded.kind <> '' THEN excluded.kind ELSE r.kind END,
    expires_at = excluded.expires_at, seq = excluded.seq, updated_at = excluded.updated_at,
    customer_id = coalesce(excluded.customer_id, r.customer_id)
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


_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


class Chunk(NamedTuple):
    """The fresh entries read from one stream: ids ascending, values as ``decode``
    returns them."""

    stream: str
    first: StreamId
    last: StreamId
    entries: list[tuple[str, list[str]]]


def _copy_rows(chunks: list[Chunk]) -> bytes:
    """The chunks' events as COPY text rows (BATCH_COLUMNS). ``kind`` is the order
    kind of the line as far as this batch knows it (from its reserve/deduct event)."""
    out = []
    kinds: dict[str, str] = {}
    for chunk in chunks:
        tail = f"\t{chunk.stream}\t"
        for entry_id, values in chunk.entries:  # FIELD_ORDER
            if values[10] or values[11] or "\\" in values[9]:  # order, reason, customer
                values = [*values[:9], *(v.translate(_ESCAPES) for v in values[9:])]
            op, kind = values[0], ""
            if op in STATE_AFTER:  # a line's event
                line = values[9] + "|" + values[8]
                if op in ORDER_KINDS:  # (a cluster deduct's hold: a reserve, by reason)
                    kind = "deduct" if values[10] == DEDUCT_HOLD else op
                    kinds[line] = kind
                else:
                    kind = kinds.get(line, "")
            out.append("\t".join(values) + tail + entry_id + "\t" + kind + "\n")
    return "".join(out).encode()


async def prepare(conn: asyncpg.Connection) -> None:
    """Create the writer's session table (once per connection)."""
    await conn.execute(_BATCH_TABLE)


Write = Callable[[asyncpg.Connection, list[Chunk]], Awaitable[None]]


async def apply_batch(
    conn: asyncpg.Connection, chunks: list[Chunk], write: Write | None = None
) -> dict[str, StreamId]:
    """Apply ``chunks`` (one per stream) in one transaction.

    Returns the new offset of every stream in the batch; events at or below
    the offset recorded in PostgreSQL are skipped. ``write`` replaces the
    plain COPY (``persist.quarantine`` passes one that sets bad events aside).
    """
    streams = sorted({c.stream for c in chunks})
    async with conn.transaction():
        await conn.execute(_OFFSETS_ENSURE, streams)
        records = await conn.fetch(_OFFSETS_LOCK, streams)
        offsets = {r["stream"]: StreamId(r["last_ms"], r["last_seq"]) for r in records}
        fresh = [_above(c, offsets[c.stream]) for c in chunks]
        fresh = [c for c in fresh if c.entries]
        if fresh:
            await (write or write_events)(conn, fresh)
        new = dict(offsets)
        for c in fresh:
            new[c.stream] = max(new[c.stream], c.last)
        changed = [s for s in streams if new[s] != offsets[s]]
        if changed:
            await conn.execute(
                _OFFSETS_SET, changed, [new[s].ms for s in changed], [new[s].seq for s in changed]
            )
    return new


def _above(chunk: Chunk, offset: StreamId) -> Chunk:
    """The part of ``chunk`` after ``offset`` (all of it, unless another writer got there)."""
    if chunk.first > offset:
        return chunk
    entries = [(i, f) for i, f in chunk.entries if StreamId.parse(i) > offset]
    first = StreamId.parse(entries[0][0]) if entries else chunk.last
    return Chunk(chunk.stream, first, chunk.last, entries)


async def write_events(conn: asyncpg.Connection, chunks: list[Chunk]) -> None:
    """COPY the events into the session table, then let PostgreSQL fan them out."""
    await conn.copy_to_table(
        "writer_batch", source=io.BytesIO(_copy_rows(chunks)), columns=BATCH_COLUMNS
    )
    await webhooks.offer(conn)  # the outbox, in this transaction, before stock_levels moves
    await conn.execute(_FROM_BATCH)
