"""Poison events: one event that cannot be applied never stops the writer.

An event PostgreSQL refuses (a NUL byte in a text value, a number that does not
parse) or one that does not decode (a truncated entry, bytes that are not
UTF-8) fails the COPY of its whole batch, and, retried as it was, would fail it
forever while the streams grow. When a batch fails with such a data error the
writer applies it again through ``screened``: in the same one transaction, the
events are written in halves under savepoints until each bad one is alone; the
bad ones go to ``event_quarantine`` with their raw form (read again from the
stream, where they still are) and the error, the others land as usual, and the
stream offsets move past all of them. Quarantined events can be read, fixed and
replayed by hand (docs/runbook.md, "A quarantined event").
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from persist.events import Chunk, StreamId, write_events

log = logging.getLogger("persist.writer")

# Errors that belong to the data of an event, not to the connection or the schema.
POISON_ERRORS = (
    asyncpg.DataError,
    asyncpg.IntegrityConstraintViolationError,
    ValueError,
    TypeError,
    IndexError,
)  # UnicodeError is a ValueError

Raw = Callable[[str, str], Awaitable[list[bytes]]]  # (stream, entry id) -> fields, values
Entry = tuple[str, tuple[str, list[str]]]  # (stream, (entry id, values))

_INSERT = """
INSERT INTO event_quarantine (stream, stream_id, raw, error) VALUES ($1, $2, $3, $4)
ON CONFLICT (stream, stream_id) DO NOTHING
"""


def screened(raw: Raw, quarantined: list[tuple[str, str, str]]) -> Callable[..., Awaitable[None]]:
    """A ``write`` for ``persist.events.apply_batch`` that quarantines bad events;
    each one set aside is appended to ``quarantined`` as (stream, entry id, error)."""

    async def write(conn: asyncpg.Connection, chunks: list[Chunk]) -> None:
        entries = [(c.stream, entry) for c in chunks for entry in c.entries]
        bad: list[tuple[Entry, BaseException]] = []
        await _bisect(conn, entries, bad)
        if not bad:
            return
        rows: list[tuple[str, str, Any, str]] = []
        for (stream, (entry_id, _values)), exc in bad:
            error = f"{type(exc).__name__}: {exc}"[:1000]
            fields = await raw(stream, entry_id)
            rows.append((stream, entry_id, fields, error))
            quarantined.append((stream, entry_id, error))
            log.warning("writer: event %s %s quarantined: %s", stream, entry_id, error)
        await conn.executemany(_INSERT, rows)

    return write


async def _bisect(
    conn: asyncpg.Connection, entries: list[Entry], bad: list[tuple[Entry, BaseException]]
) -> None:
    """Write ``entries`` under a savepoint; if a data error fails them, split in two
    and try each half, down to the single events that fail on their own."""
    try:
        async with conn.transaction():  # a savepoint inside the batch's transaction
            await conn.execute("DELETE FROM writer_batch")  # (what a failed try left)
            await write_events(conn, _chunks(entries))
            await conn.execute("DELETE FROM writer_batch")  # not written twice later
    except POISON_ERRORS as exc:
        if len(entries) == 1:
            bad.append((entries[0], exc))
            return
        half = len(entries) // 2
        await _bisect(conn, entries[:half], bad)
        await _bisect(conn, entries[half:], bad)


def _chunks(entries: list[Entry]) -> list[Chunk]:
    by_stream: dict[str, list[tuple[str, list[str]]]] = {}
    for stream, entry in entries:
        by_stream.setdefault(stream, []).append(entry)
    return [
        Chunk(stream, StreamId.parse(items[0][0]), StreamId.parse(items[-1][0]), items)
        for stream, items in by_stream.items()
    ]
