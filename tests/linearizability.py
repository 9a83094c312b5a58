"""A linearizability checker for one SKU's history of stock operations (Wing & Gong,
with memoization on (model state, set of linearized operations), as Lowe's and
Porcupine's checkers do).

A history is a list of :class:`Op`: what a client asked (``kind``, ``order``,
``qty``), when it invoked it and when the answer came back (``invoke``/``ret``, on
one monotonic clock), and the answer, normalized to a small tuple (``result``).
An operation whose outcome is unknown (a timeout, a reset connection, a 5xx) has
``result=None``: it may have taken effect at any point after its invoke, or never.

The history is linearizable when some total order of the operations (unknown ones
optionally left out) respects real time (an operation that returned before
another was invoked comes first) and, replayed on the sequential model of DESIGN
§3 (:func:`step`), gives every recorded answer. Orders touch one SKU each here, so
every SKU's history is checked on its own (linearizability is compositional).

Normalized answers:

=========================================  ===============================================
operation                                  answers
=========================================  ===============================================
``read``, ``adjust`` (``qty`` = delta)     ``("ok", available, reserved, sold)``
``reserve``, ``deduct``                    ``("created",)`` (201), ``("replay",)`` (200)
``confirm``, ``release``, ``cancel``,      ``("ok",)`` (200, a replay included; a release
``extend``                                 or cancel of no order leaves a TCC tombstone
                                           that refuses the order id's try, confirm and
                                           extend: ``invalid_transition``)
refusals                                   ``("insufficient_stock", available)``,
                                           ``("invalid_transition", state)``,
                                           ``("order_conflict",)``, ``("not_found",)``,
                                           ``("reservation_expired",)``
=========================================  ===============================================
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from tests.model import ACQUIRED, EXPIRED, TOMBSTONES, TRANSITIONS

Result = tuple[object, ...]


@dataclass(frozen=True)
class Op:
    kind: str  # read, adjust, reserve, deduct, confirm, release, cancel, extend
    sku: str
    invoke: float
    ret: float  # when the answer came back (for an unknown outcome: when the client gave up)
    result: Result | None  # None: outcome unknown
    order: str = ""
    qty: int = 0  # reserve/deduct quantity; adjust delta
    note: str = ""  # why its outcome is unknown (for reports)

    def text(self) -> str:
        what = f"{self.kind}({self.order or self.sku}{', ' + str(self.qty) if self.qty else ''})"
        return f"{what} -> {self.result if self.result is not None else '?'}"


TOMB = "tomb"  # a Line's kind for a TCC tombstone (a release or cancel of no order)


class Line(NamedTuple):
    kind: str  # reserve or deduct, or TOMB (state: released or cancelled, qty 0)
    qty: int
    state: str  # a state name of tests.model


class State(NamedTuple):
    """The model: one SKU's counters and the line of every order id of the history
    (by a dense index, so that a state is a small hashable tuple)."""

    available: int
    reserved: int
    sold: int
    lines: tuple[Line | None, ...]

    def put(self, index: int, line: Line, da: int = 0, dr: int = 0, ds: int = 0) -> State:
        lines = (*self.lines[:index], line, *self.lines[index + 1 :])
        return State(self.available + da, self.reserved + dr, self.sold + ds, lines)


def answer(state: State, op: Op, index: int) -> tuple[Result, State]:
    """What the sequential model answers to ``op`` in ``state``, and the state after it.
    ``index`` is the op's order's index in ``state.lines``."""
    a, r, s = state.available, state.reserved, state.sold
    if op.kind == "read":
        return ("ok", a, r, s), state
    if op.kind == "adjust":
        if a + op.qty < 0:
            return ("insufficient_stock", a), state
        return ("ok", a + op.qty, r, s), state._replace(available=a + op.qty)
    line = state.lines[index]
    if line is not None and line.kind == TOMB:  # a hanging try, confirm or extend: refused
        if TOMBSTONES.get(op.kind) == line.state:
            return ("ok",), state  # a retried cancel replays
        return ("invalid_transition", line.state), state
    if op.kind in ACQUIRED:
        target = ACQUIRED[op.kind]
        if line is not None:
            if line.kind != op.kind or line.qty != op.qty:
                return ("order_conflict",), state
            if line.state != target:
                return ("invalid_transition", line.state), state
            return ("replay",), state
        if a < op.qty:
            return ("insufficient_stock", a), state
        held = op.qty if op.kind == "reserve" else 0
        new = Line(op.kind, op.qty, target)
        return ("created",), state.put(index, new, -op.qty, held, op.qty - held)
    if line is None:
        if op.kind in TOMBSTONES:  # TCC empty rollback: the cancel overtook its try
            return ("ok",), state.put(index, Line(TOMB, 0, TOMBSTONES[op.kind]))
        return ("not_found",), state
    table = TRANSITIONS[op.kind]
    if line.state not in table:
        return ("invalid_transition", line.state), state
    step = table[line.state]
    if step is None:  # a replay
        return ("ok",), state
    if line.state == EXPIRED and op.kind == "confirm" and a < line.qty:
        return ("reservation_expired",), state
    to, da, dr, ds = step
    q = line.qty
    return ("ok",), state.put(index, line._replace(state=to), da * q, dr * q, ds * q)


def step(state: State, op: Op, index: int) -> State | None:
    """The state after ``op`` if the model agrees with its recorded answer, else None.
    An unknown outcome is taken here as "it happened": only when the model lets it
    change something (not happening at all is left to the search's end)."""
    result, after = answer(state, op, index)
    if op.result is None:
        return after if after != state else None
    if result == op.result:
        return after
    line = state.lines[index] if index >= 0 else None
    if (  # a cluster runs a try's groups before it reads the tombstone: short wins
        line is not None
        and line.kind == TOMB
        and op.kind in ACQUIRED
        and op.result == ("insufficient_stock", state.available)
        and state.available < op.qty
    ):
        return state
    return None


@dataclass
class Verdict:
    ok: bool
    ops: int  # operations checked (unknown reads are left out)
    explored: int  # (state, linearized set) pairs visited
    linearized: int = 0  # most operations with a known outcome placed in one order
    stuck: list[str] = field(default_factory=list)  # at that point: what each candidate saw
    state: State | None = None

    def explain(self) -> str:
        if self.ok:
            return f"linearizable ({self.ops} operations, {self.explored} states explored)"
        lines = "\n  ".join(self.stuck)
        return (
            f"NOT linearizable: at most {self.linearized} of the known outcomes fit one "
            f"order; then, in state {self.state and self.state[:3]}, the candidates "
            f"were:\n  {lines}"
        )


def check(history: Sequence[Op], available: int) -> Verdict:
    """Whether one SKU's ``history`` is linearizable from ``available`` units (none
    reserved or sold). A depth-first search over the orders real time allows."""
    ops = [op for op in history if not (op.result is None and op.kind == "read")]
    n = len(ops)
    orders = {op.order: None for op in ops if op.order}
    index = {order: i for i, order in enumerate(orders)}
    where = [index.get(op.order, -1) for op in ops]
    by_invoke = sorted(range(n), key=lambda i: ops[i].invoke)
    ret = [op.ret if op.result is not None else math.inf for op in ops]
    by_ret = sorted(range(n), key=lambda i: ret[i])
    known = sum(1 << i for i in range(n) if ops[i].result is not None)
    initial = State(available, 0, 0, (None,) * len(index))
    seen: set[tuple[State, int]] = set()
    best = (-1, initial, 0)
    stack = [(initial, 0)]
    while stack:
        state, done = stack.pop()
        if done & known == known:  # what is left had unknown outcomes: never happened
            return Verdict(True, n, len(seen))
        if (state, done) in seen:
            continue
        seen.add((state, done))
        placed = (done & known).bit_count()
        if placed > best[0]:
            best = (placed, state, done)
        # the earliest answer still to place: nothing invoked after it can come first
        deadline = next(ret[i] for i in by_ret if not done >> i & 1)
        nexts = []
        for i in by_invoke:
            if ops[i].invoke >= deadline:
                break
            if not done >> i & 1:
                after = step(state, ops[i], where[i])
                if after is not None:
                    nexts.append((after, done | 1 << i))
        stack.extend(reversed(nexts))  # the earliest invoked is tried first
    placed, state, done = best
    return Verdict(False, n, len(seen), placed, _candidates(ops, where, state, done), state)


def _candidates(ops: list[Op], where: list[int], state: State, done: int) -> list[str]:
    """Each operation that could come next in ``state``: what it saw, what the model says."""
    pending = [i for i in range(len(ops)) if not done >> i & 1]
    deadline = min((ops[i].ret for i in pending if ops[i].result is not None), default=math.inf)
    out = []
    for i in sorted(pending, key=lambda i: ops[i].invoke):
        if ops[i].invoke < deadline:
            model, _ = answer(state, ops[i], where[i])
            out.append(f"{ops[i].text()} (model: {model}) [{ops[i].invoke:.4f}, {ops[i].ret:.4f}]")
    return out


def by_sku(history: Sequence[Op]) -> dict[str, list[Op]]:
    out: dict[str, list[Op]] = {}
    for op in history:
        out.setdefault(op.sku, []).append(op)
    return out
