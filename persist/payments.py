"""Payment reconciliation (``stock reconcile-payments``, DESIGN §9).

A payment channel's CSV export (a header row; columns ``order_id`` and
``status`` with ``paid``, ``refunded`` or ``failed``, optionally ``time`` in
ISO 8601; other columns ignored) is compared with the orders' lines: Redis for
orders it still holds (live ones, and finished ones within the retention
window), else PostgreSQL's ``reservation_lines``.

An order with several rows gets one payment status (``settle``): its rows in
the order of their times (the file's order without a ``time`` column, and for
equal times), the last ``paid`` or ``refunded`` wins; ``failed`` counts only
when there is neither (a failed try undoes no payment). Deciding per row
instead made run 1 confirm a paid-then-refunded order and run 2 cancel it.
Each order of the file gets one outcome:

| payment | lines | outcome | ``--repair`` |
|---|---|---|---|
| paid | all confirmed | ``ok`` | |
| paid | reserved | ``paid_still_reserved`` | confirm |
| paid | expired | ``paid_not_sold`` | confirm (re-acquires the stock), else ``refund_needed`` |
| paid | released, cancelled, unknown | ``paid_not_sold`` | ``refund_needed`` (a person refunds) |
| refunded | confirmed | ``refunded_still_sold`` | cancel (stock back) |
| failed | confirmed | ``sold_not_paid`` | none: a person looks |
| refunded/failed | anything else | ``ok`` | |

With ``--since``/``--until`` the orders sold (confirm or deduct in the ledger)
in that window and absent from the file are ``sold_not_paid`` too. Repairs
go through the engine's normal confirm and cancel with ledger reason
``reconcile-payments``, so a second run with the same file finds them ``ok``
and changes nothing.
"""

from __future__ import annotations

import asyncio
import csv
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

import asyncpg
import orjson

from stock.core.errors import InvalidRequest, NotFound, StockError, StoreUnavailable
from stock.orders.engine import StockEngine

REASON = "reconcile-payments"
STATUSES = ("paid", "refunded", "failed")
CHUNK = 1000  # orders looked up together
CONCURRENCY = 64  # Redis lookups and repairs in flight
PROGRESS_S = 2.0
REPAIRED = ("confirmed", "cancelled")  # the actions that settle a finding
_NO_TIME = datetime.min.replace(tzinfo=UTC)  # (an export without a time column)


@dataclass(frozen=True, slots=True)
class Finding:
    order_id: str
    outcome: str
    action: str  # what --repair did or would do: none, confirm, cancel, refund_needed, ...

    def needs_person(self) -> bool:
        return self.outcome != "ok" and self.action not in REPAIRED


def read_export(path: Path) -> Iterator[tuple[int, str, str, datetime | None]]:
    """(line number, order_id, status, time or None) per data row; a bad row is an
    InvalidRequest naming its line, so an operator's wrong file stops before
    anything changes."""
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        fields = reader.fieldnames or []
        missing = [name for name in ("order_id", "status") if name not in fields]
        if missing:
            raise InvalidRequest(f"{path}: header lacks column(s) {', '.join(missing)}")
        for row in reader:
            order_id = (row.get("order_id") or "").strip()
            status = (row.get("status") or "").strip().lower()
            if not order_id or status not in STATUSES:
                raise InvalidRequest(
                    f"{path}:{reader.line_num}: need an order_id and a status of "
                    f"{'/'.join(STATUSES)}, got {row.get('order_id')!r}, {row.get('status')!r}"
                )
            at = None
            if "time" in fields:
                try:
                    at = parse_time((row.get("time") or "").strip())
                except InvalidRequest as exc:
                    raise InvalidRequest(f"{path}:{reader.line_num}: {exc.message}") from None
            yield reader.line_num, order_id, status, at


def settle(rows: Iterable[tuple[int, str, str, datetime | None]]) -> list[tuple[str, str]]:
    """(order_id, status) once per order, in the order of first appearance: of its
    rows by time (then line), the last ``paid``/``refunded``, else ``failed``."""
    by_order: dict[str, list[tuple[datetime, int, str]]] = {}
    for line, order_id, status, at in rows:
        by_order.setdefault(order_id, []).append((at or _NO_TIME, line, status))
    settled = []
    for order_id, its in by_order.items():
        money = [status for _, _, status in sorted(its) if status != "failed"]
        settled.append((order_id, money[-1] if money else "failed"))
    return settled


def summarise(states: list[str]) -> str:
    """One word for an order's line states: sold, reserved, expired, closed or unknown."""
    if not states:
        return "unknown"
    if all(s == "confirmed" for s in states):
        return "sold"
    if any(s == "reserved" for s in states):
        return "reserved"
    if any(s == "expired" for s in states) and not any(s == "confirmed" for s in states):
        return "expired"
    if any(s == "confirmed" for s in states):
        return "partly_sold"
    return "closed"  # released, cancelled


def judge(status: str, held: str) -> tuple[str, str]:
    """(outcome, the repair it calls for) for a payment status and summarise()'s word."""
    if status == "paid":
        if held == "sold":
            return "ok", "none"
        if held in ("reserved", "partly_sold"):
            return "paid_still_reserved", "confirm"
        if held == "expired":
            return "paid_not_sold", "confirm"
        return "paid_not_sold", "refund_needed"
    if held in ("sold", "partly_sold"):
        return (
            ("refunded_still_sold", "cancel") if status == "refunded" else ("sold_not_paid", "none")
        )
    return "ok", "none"


class PaymentReconciler:
    """Walks an export in chunks; ``findings`` in file order, then the absent sales."""

    def __init__(self, engine: StockEngine, conn: asyncpg.Connection, repair: bool) -> None:
        self.engine = engine
        self.conn = conn
        self.repair = repair
        self._slots = asyncio.Semaphore(CONCURRENCY)

    async def check(self, rows: list[tuple[str, str]]) -> list[Finding]:
        held = await self._held([order_id for order_id, _ in rows])
        return list(await asyncio.gather(*(self._finding(o, s, held[o]) for o, s in rows)))

    async def absent_sales(
        self, seen: set[str], since: datetime | None, until: datetime | None
    ) -> list[Finding]:
        """Orders sold in the window (ledger confirm/deduct) that the file lacks."""
        rows = await self.conn.fetch(
            "SELECT DISTINCT order_id FROM stock_ledger WHERE op IN ('confirm', 'deduct')"
            " AND ($1::timestamptz IS NULL OR at >= $1) AND ($2::timestamptz IS NULL OR at < $2)"
            " ORDER BY order_id",
            since,
            until,
        )
        missing = [r["order_id"] for r in rows if r["order_id"] not in seen]
        held = await self._held(missing)
        return [Finding(o, "sold_not_paid", "none") for o in missing if held[o] == "sold"]

    async def _finding(self, order_id: str, status: str, held: str) -> Finding:
        outcome, repair = judge(status, held)
        if repair not in ("confirm", "cancel"):
            return Finding(order_id, outcome, repair)
        if not self.repair:
            return Finding(order_id, outcome, f"would_{repair}")
        async with self._slots:
            try:
                if repair == "confirm":
                    await self.engine.confirm(order_id, reason=REASON)
                    return Finding(order_id, outcome, "confirmed")
                await self.engine.cancel(order_id, reason=REASON)
                return Finding(order_id, outcome, "cancelled")
            except StoreUnavailable:  # Redis away: no finding; the run fails, run it again
                raise
            except StockError as exc:
                action = "refund_needed" if repair == "confirm" else f"failed:{exc.code}"
                return Finding(order_id, outcome, action)

    async def _held(self, order_ids: list[str]) -> dict[str, str]:
        """summarise() of each order: Redis where it still knows the order, else PostgreSQL."""

        async def one(order_id: str) -> tuple[str, list[str] | None]:
            async with self._slots:
                try:
                    order = await self.engine.get_order(order_id)
                except (NotFound, InvalidRequest):
                    return order_id, None
            return order_id, [line.state for line in order["lines"]]

        found = dict(await asyncio.gather(*(one(o) for o in order_ids)))
        rest = [o for o, states in found.items() if states is None]
        from_pg: dict[str, list[str]] = {o: [] for o in rest}
        if rest:
            for row in await self.conn.fetch(
                "SELECT order_id, state FROM reservation_lines WHERE order_id = ANY($1)", rest
            ):
                from_pg[row["order_id"]].append(row["state"])
        return {o: summarise(found[o] or from_pg.get(o, [])) for o in order_ids}


async def reconcile_payments(
    engine: StockEngine,
    dsn: str,
    path: Path,
    *,
    repair: bool = False,
    since: datetime | None = None,
    until: datetime | None = None,
    as_json: bool = False,
    out: TextIO = sys.stdout,
    progress: TextIO = sys.stderr,
) -> int:
    """Print the findings; returns 1 when anything needs a person, else 0."""
    rows = settle(read_export(path))  # the whole file is checked before anything changes
    conn = await asyncpg.connect(dsn)
    try:
        reconciler = PaymentReconciler(engine, conn, repair)
        findings: list[Finding] = []
        started = last = time.monotonic()
        for start in range(0, len(rows), CHUNK):
            findings.extend(await reconciler.check(rows[start : start + CHUNK]))
            if time.monotonic() - last >= PROGRESS_S:
                last = time.monotonic()
                print(
                    f"reconcile-payments: {len(findings)}/{len(rows)} orders checked"
                    f" ({last - started:.0f} s)",
                    file=progress,
                )
        if since is not None or until is not None:
            seen = {order_id for order_id, _ in rows}
            findings.extend(await reconciler.absent_sales(seen, since, until))
    finally:
        await conn.close()
    _print(findings, as_json, out)
    return 1 if any(f.needs_person() for f in findings) else 0


def _print(findings: list[Finding], as_json: bool, out: TextIO) -> None:
    if as_json:
        for f in findings:
            out.write(
                orjson.dumps(
                    {"order_id": f.order_id, "outcome": f.outcome, "action": f.action}
                ).decode()
                + "\n"
            )
        return
    counts: dict[str, int] = {}
    width = max((len(f.order_id) for f in findings), default=8)
    header = f"{'order_id':<{width}}  {'outcome':<20}  action"
    lines = [header, "-" * len(header)]
    for f in findings:
        counts[f.outcome] = counts.get(f.outcome, 0) + 1
        if f.outcome != "ok":
            lines.append(f"{f.order_id:<{width}}  {f.outcome:<20}  {f.action}")
    summary = ", ".join(f"{n} {outcome}" for outcome, n in sorted(counts.items()))
    lines.append(f"reconcile-payments: {len(findings)} orders: {summary or 'none'}")
    out.write("\n".join(lines) + "\n")


def parse_time(text: str) -> datetime:
    """ISO 8601; a time without a zone is UTC."""
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidRequest(f"not an ISO 8601 time: {text!r}") from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)
