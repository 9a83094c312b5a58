"""A pure-Python model of the stock model of DESIGN §3 (no Redis, no asyncio).

The model knows every SKU's counters and every order's lines. Each operation
is planned first: ``plan_*`` returns an :class:`Outcome` that says what the
engine must answer (success and its replay flag, or exactly which error
class), and how many delta events each SKU gains. The test calls the real
engine, compares, and only then calls ``outcome.apply(result)`` so that the
model follows.

Multi-item orders are all-or-nothing for every operation: when any line of
the order refuses, nothing changes (this is what one script call does on a
standalone Redis; the cluster must behave the same).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from stock.core.errors import (
    InsufficientStock,
    InvalidTransition,
    NotFound,
    OrderConflict,
    ReservationExpired,
    StaleStock,
    StockError,
)

RESERVED = "reserved"
CONFIRMED = "confirmed"
RELEASED = "released"
EXPIRED = "expired"
CANCELLED = "cancelled"

# op -> {from state: (to state, d_available, d_reserved, d_sold) per unit of qty}
# A from state missing here is an invalid transition. ``None`` marks a replay.
TRANSITIONS: dict[str, dict[str, tuple[str, int, int, int] | None]] = {
    "confirm": {
        RESERVED: (CONFIRMED, 0, -1, 1),
        EXPIRED: (CONFIRMED, -1, 0, 1),  # late payment: only while available >= qty
        CONFIRMED: None,
    },
    # EXPIRED -> RELEASED closes an expired line (its stock is back already)
    "release": {RESERVED: (RELEASED, 1, -1, 0), EXPIRED: (RELEASED, 0, 0, 0), RELEASED: None},
    "cancel": {CONFIRMED: (CANCELLED, 1, 0, -1), CANCELLED: None},
    "extend": {RESERVED: (RESERVED, 0, 0, 0)},  # never a replay: the expiry moves
}

ACQUIRED = {"reserve": RESERVED, "deduct": CONFIRMED}
TOMBSTONES = {"release": RELEASED, "cancel": CANCELLED}  # TCC: release/cancel of no order


@dataclass
class Counters:
    available: int = 0
    reserved: int = 0
    sold: int = 0

    def as_tuple(self) -> tuple[int, int, int]:
        return (self.available, self.reserved, self.sold)

    def total(self) -> int:
        return self.available + self.reserved + self.sold


@dataclass
class Line:
    sku: str
    qty: int
    state: str
    expires_ms: int = 0


@dataclass
class Order:
    kind: str  # "reserve" or "deduct"
    items: dict[str, int]
    lines: dict[str, Line]


@dataclass
class Outcome:
    """What the engine must answer, and how the model changes once it did."""

    error: type[StockError] | None = None
    replay: bool = False
    # acceptable details["state"] of an InvalidTransition
    states: frozenset[str] = frozenset()
    # SKUs an InsufficientStock must name
    short: frozenset[str] = frozenset()
    # delta events each SKU gains (exact on success and on every refusal)
    events: dict[str, int] = field(default_factory=dict)
    # a refused acquire on a cluster may add reserve+abort pairs (compensation)
    compensated: bool = False
    # a cluster confirm, release or extend first holds the lines (hold.lua):
    # maybe one more event each
    held: bool = False
    apply: Callable[[Any], None] = lambda result: None


class StockModel:
    def __init__(self) -> None:
        self.skus: dict[str, Counters] = {}
        self.orders: dict[str, Order] = {}
        self.tombstones: dict[str, str] = {}  # order id -> released/cancelled
        # available + reserved + sold per SKU, moved only by set_stock/adjust
        self.totals: dict[str, int] = {}

    # -- reading ------------------------------------------------------------

    def counters(self, sku: str) -> Counters:
        return self.skus.get(sku, Counters())

    def _touch(self, sku: str) -> Counters:
        return self.skus.setdefault(sku, Counters())

    def reserved_lines(self) -> list[tuple[str, Line]]:
        return [
            (oid, line)
            for oid, order in self.orders.items()
            for line in order.lines.values()
            if line.state == RESERVED
        ]

    # -- stock levels -------------------------------------------------------

    def plan_set(self, sku: str, available: int) -> Outcome:
        def apply(_result: Any) -> None:
            c = self._touch(sku)
            c.available = available
            self.totals[sku] = c.total()

        return Outcome(events={sku: 1}, apply=apply)

    def plan_adjust(self, sku: str, delta: int, expected: int | None) -> Outcome:
        c = self.counters(sku)
        if expected is not None and expected != c.available:
            return Outcome(error=StaleStock)
        if c.available + delta < 0:
            return Outcome(error=InsufficientStock, short=frozenset([sku]))

        def apply(_result: Any) -> None:
            counters = self._touch(sku)
            counters.available += delta
            self.totals[sku] = counters.total()

        return Outcome(events={sku: 1}, apply=apply)

    # -- orders -------------------------------------------------------------

    def plan_acquire(self, kind: str, order_id: str, items: dict[str, int]) -> Outcome:
        target = ACQUIRED[kind]
        if order_id in self.tombstones:  # a hanging try: refused, never a new hold
            short = frozenset(s for s, q in items.items() if self.counters(s).available < q)
            return Outcome(
                error=InvalidTransition,
                states=frozenset({self.tombstones[order_id]}),
                short=short,
                compensated=True,
            )
        order = self.orders.get(order_id)
        if order is not None:
            if order.kind != kind or order.items != items:
                return Outcome(error=OrderConflict)
            wrong = frozenset(ln.state for ln in order.lines.values() if ln.state != target)
            if wrong:
                return Outcome(error=InvalidTransition, states=wrong)
            return Outcome(replay=True)
        short = frozenset(sku for sku, qty in items.items() if self.counters(sku).available < qty)
        if short:
            return Outcome(error=InsufficientStock, short=short, compensated=True)

        def apply(result: Any) -> None:
            expiry = {line.sku: line.expires_ms for line in result.lines}
            lines = {}
            for sku, qty in items.items():
                c = self._touch(sku)
                c.available -= qty
                if kind == "reserve":
                    c.reserved += qty
                else:
                    c.sold += qty
                lines[sku] = Line(sku, qty, target, expiry[sku])
            self.orders[order_id] = Order(kind, dict(items), lines)

        return Outcome(events=dict.fromkeys(items, 1), apply=apply)

    def plan_transition(self, op: str, order_id: str) -> Outcome:
        order = self.orders.get(order_id)
        if order is None:
            return self._plan_unknown(op, order_id)
        table = TRANSITIONS[op]
        wrong = frozenset(ln.state for ln in order.lines.values() if ln.state not in table)
        if wrong:
            return Outcome(error=InvalidTransition, states=wrong)
        for line in order.lines.values():
            if line.state == EXPIRED and op == "confirm":
                if self.counters(line.sku).available < line.qty:
                    return Outcome(error=ReservationExpired, compensated=True)
        changing = [ln for ln in order.lines.values() if table[ln.state] is not None]
        if not changing:
            return Outcome(replay=True)

        def apply(result: Any) -> None:
            expiry = {line.sku: line.expires_ms for line in result.lines}
            for line in changing:
                step = table[line.state]
                assert step is not None
                to, da, dr, ds = step
                c = self._touch(line.sku)
                c.available += da * line.qty
                c.reserved += dr * line.qty
                c.sold += ds * line.qty
                line.state = to
                if op == "extend":
                    line.expires_ms = expiry[line.sku]

        held = op in ("confirm", "release", "extend")
        return Outcome(events={ln.sku: 1 for ln in changing}, apply=apply, held=held)

    def _plan_unknown(self, op: str, order_id: str) -> Outcome:
        """An order id with no order: a release or cancel leaves a tombstone (TCC empty
        rollback) and replays; anything else on a tombstone is an invalid transition."""
        tomb = self.tombstones.get(order_id)
        if tomb is not None:
            if TOMBSTONES.get(op) == tomb:
                return Outcome(replay=True)
            return Outcome(error=InvalidTransition, states=frozenset({tomb}))
        if op not in TOMBSTONES:
            return Outcome(error=NotFound)

        def apply(_result: Any) -> None:
            self.tombstones[order_id] = TOMBSTONES[op]

        return Outcome(apply=apply)

    def expire(self, order_id: str, sku: str) -> None:
        """The reaper expired this RESERVED line."""
        line = self.orders[order_id].lines[sku]
        assert line.state == RESERVED
        line.state = EXPIRED
        c = self._touch(sku)
        c.reserved -= line.qty
        c.available += line.qty
