"""Confirm, release, extend and cancel of an order on a Redis Cluster.

What it owns (design in ``lua/README.md``, "Orders on a Redis Cluster"):

- a single-group transition: one script call, atomic on its node;
- a multi-node confirm/release/extend/cancel: this process's turn for the order
  (``_turn``), the order's Redis lock (outliving the holds), holds on every
  group (``hold.lua``), the lock re-checked, then the operation; a refused hold
  undoes every group's holds;
- ``apply_to_groups``: an operation on every group of a decided order (held or
  committed), a group whose call failed without a refusal called again, so that
  no order is left half confirmed and half released by a lost call (a
  multi-group deduct's settle in ``stock/orders/cluster.py`` uses it too).

Every Redis call goes through ``core.scripts`` (batched per node where that is
done), except redis-py's Lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import LockNotOwnedError

from stock.core import keys
from stock.core.errors import InsufficientStock, ReservationExpired, StockError, Unavailable
from stock.core.formats import items_spec
from stock.core.validate import Item
from stock.orders.core import OrderCore
from stock.orders.results import OrderResult, order_result
from stock.redis.scripts import NO_ORDER_KEY, LinesReply, merge_failures, merge_replies

log = logging.getLogger("stock.orders.cluster")  # the name it had in stock/orders/cluster.py

HOLD_MS = 10_000  # a multi-node transition's holds: enough for its second step
LOCK_TIMEOUT_S = HOLD_MS / 1000 + 2  # the order's lock outlives the holds it guards
LOCK_WAIT_S = 10.0  # the longest a multi-node transition waits for its order's lock
RETRIES = 3  # calls again of a group whose call failed after the order was decided


class ClusterTransitions:
    """Confirm, release, extend and cancel of one orders on a cluster."""

    def __init__(self, core: OrderCore) -> None:
        self.core = core
        self._turns: dict[str, _Turn] = {}

    async def transition(
        self, op: str, order_id: str, ttl_ms: int, reason: str = ""
    ) -> OrderResult:
        """``op`` on the order read from its directory: one script call for a
        single-group order, else the order's turn and lock (``_locked``)."""
        e = self.core
        order_kind, _phase, items = await e.record(order_id, e.retention_ms + ttl_ms)
        spec, groups = items_spec(items), e.groups(items)
        todo = dict(enumerate(groups))
        done: dict[int, LinesReply] = {}
        if len(groups) == 1:  # one script call: atomic on its node
            await apply_to_groups(
                e,
                order_id,
                op,
                todo,
                done,
                spec=spec,
                order_kind=order_kind,
                ttl_ms=ttl_ms,
                reason=reason,
                retries=0,
            )
            return order_result(order_id, op, merge_replies(list(done.values())))
        async with self._turn(order_id):
            return await self._locked(op, order_id, groups, ttl_ms, spec, order_kind, reason)

    @contextlib.asynccontextmanager
    async def _turn(self, order_id: str) -> AsyncIterator[None]:
        """One multi-node transition of an order at a time in this process, first come
        first served, so that only one of them polls the order's Redis lock. The wait
        keeps its in-flight slot: it ends as soon as this process's own turn holder is
        done (which holds a slot), and handing the turn over must not queue again
        behind every operation in flight. (A wait for another process's lock gives its
        slot up: ``_lock``.)"""
        turn = self._turns.setdefault(order_id, _Turn())
        turn.users += 1
        try:
            try:
                await asyncio.wait_for(turn.lock.acquire(), LOCK_WAIT_S)
            except TimeoutError:
                raise Unavailable(f"order {order_id!r} is busy; retry", order_id=order_id) from None
            try:
                yield
            finally:
                turn.lock.release()
        finally:
            turn.users -= 1
            if not turn.users:
                self._turns.pop(order_id, None)

    async def _locked(
        self,
        op: str,
        order_id: str,
        groups: list[list[Item]],
        ttl_ms: int,
        spec: str,
        order_kind: str,
        reason: str,
    ) -> OrderResult:
        """A multi-node transition under the order's lock: holds, the lock re-checked,
        then the operation on every group."""
        e, todo, done = self.core, dict(enumerate(groups)), dict[int, LinesReply]()
        lock = OrderLock(e, order_id)
        await self._lock(order_id, lock)
        lost = False
        try:
            # (a deduct's lines cannot be released or extended: no holds for those)
            if op == "confirm" or (op in ("release", "extend") and order_kind != "deduct"):
                token = await self._hold_all(order_id, groups, spec, op, order_kind)
                try:
                    await lock.reacquire()  # still ours, and for the whole second step
                except LockNotOwnedError as exc:
                    lost = True
                    await self._unhold(order_id, groups, spec, token)
                    message = f"order {order_id!r} lost its lock; retry"
                    raise Unavailable(message, order_id=order_id) from exc
            await apply_to_groups(
                e,
                order_id,
                op,
                todo,
                done,
                spec=spec,
                order_kind=order_kind,
                ttl_ms=ttl_ms,
                reason=reason,
            )
        finally:
            if not lost:  # LockNotOwnedError here: the lock ran out under us; say so
                await lock.release()
        return order_result(order_id, op, merge_replies([done[i] for i in range(len(groups))]))

    async def _lock(self, order_id: str, lock: Any) -> None:
        """Wait for the order's lock without holding an in-flight slot."""
        deadline, delay = time.monotonic() + LOCK_WAIT_S, 0.005
        while not await lock.acquire(blocking=False):
            if time.monotonic() > deadline:
                raise Unavailable(f"order {order_id!r} is busy; retry", order_id=order_id)
            await self.core.pause(delay)
            delay = min(delay * 2, 0.1)

    async def _hold_all(
        self, order_id: str, groups: list[list[Item]], spec: str, op: str, order_kind: str
    ) -> str:
        """Before a multi-node confirm, release or extend: every group's lines get
        time enough that the reaper cannot expire some of them half-way (a confirm
        also re-acquires expired lines, ``hold.lua``), or nothing changes (every
        group's holds are undone) and the call is refused. Returns the holds' token."""
        e, token = self.core, secrets.token_hex(6)
        held = await asyncio.gather(
            *(
                e.group_call(
                    "hold",
                    order_id=order_id,
                    group=g,
                    spec=spec,
                    mode=NO_ORDER_KEY,
                    ttl_ms=HOLD_MS,
                    hold_for=op,
                    tag=token,
                )
                for g in groups
            ),
            return_exceptions=True,
        )
        failures = [h for h in held if isinstance(h, BaseException)]
        if failures:
            maybe = [g for g, h in zip(groups, held, strict=True) if not is_refusal(h)]
            await self._unhold(order_id, maybe, spec, token)
            if op == "confirm":  # a late confirm that cannot complete: none of it stays
                await unsell(self.core, order_id, groups, held, spec, op, order_kind)
            raise merge_failures(failures)
        return token

    async def _unhold(self, order_id: str, groups: list[list[Item]], spec: str, token: str) -> None:
        e = self.core
        undone = await asyncio.gather(
            *(
                e.group_call(
                    "abort",
                    order_id=order_id,
                    group=g,
                    spec=spec,
                    mode=NO_ORDER_KEY,
                    undo_holds=True,
                    tag=token,
                )
                for g in groups
            ),
            return_exceptions=True,
        )
        for problem in undone:
            if isinstance(problem, BaseException):
                log.error("order %r: undoing a hold failed, it expires: %r", order_id, problem)


class OrderLock:
    """The order's Redis lock (``lua/lock.lua``), called through the order scripts:
    on a cluster the per-node batch follows an ASK with ASKING on the same connection.
    (redis-py's Lock took redis-py's own ASK path, which sends ASKING on another
    connection: during a long slot migration its calls ended in "TTL exhausted".)"""

    def __init__(self, core: OrderCore, order_id: str) -> None:
        self.core, self.key = core, keys.order_lock_key(order_id)
        self.token = secrets.token_hex(8)
        self.lifetime_ms = int(LOCK_TIMEOUT_S * 1000)

    async def _call(self, mode: str) -> bool:
        args = [mode, self.token, self.lifetime_ms]
        return int(await self.core.scripts("lock", [self.key], args)) == 1

    async def acquire(self, blocking: bool = False) -> bool:
        """Taken (or ours already: the call is idempotent); never waits."""
        return await self._call("take")

    async def reacquire(self) -> None:
        """Its lifetime set again, or LockNotOwnedError (it ran out under us)."""
        if not await self._call("keep"):
            raise LockNotOwnedError("the order's lock is no longer held by this call")

    async def release(self) -> None:
        if not await self._call("drop"):
            raise LockNotOwnedError("the order's lock ran out before its release")


async def apply_to_groups(
    core: OrderCore,
    order_id: str,
    op: str,
    todo: dict[int, list[Item]],
    done: dict[int, LinesReply],
    *,
    spec: str,
    order_kind: str,
    ttl_ms: int = 0,
    reason: str = "",
    retries: int = RETRIES,
) -> None:
    """``op`` on every group of ``todo`` (index -> group), replies into ``done``.
    The order is decided (held, or committed): a group whose call failed without
    a refusal is called again (the calls are idempotent), so that no order is
    left half confirmed and half released by a lost call."""
    e = core
    for attempt in range(retries + 1):
        pending = list(todo.items())
        outcomes = await e.group_calls(
            op,
            [g for _, g in pending],
            order_id=order_id,
            spec=spec,
            ttl_ms=ttl_ms,
            order_kind=order_kind,
            reason=reason,
        )
        failures = []
        for (i, _g), outcome in zip(pending, outcomes, strict=True):
            if isinstance(outcome, LinesReply):
                done[i] = outcome
                del todo[i]
            else:
                failures.append(outcome)
        refused = [f for f in failures if is_refusal(f)]
        if refused or not failures or attempt == retries:
            if failures:
                raise merge_failures(refused or failures)
            return
        log.warning(
            "order %r: %s of %d groups failed, again: %r",
            order_id,
            op,
            len(failures),
            failures[0],
        )
        await e.pause(0.05 * (attempt + 1))


async def unsell(
    core: OrderCore,
    order_id: str,
    groups: list[list[Item]],
    outcomes: list[Any],
    spec: str,
    op: str,
    order_kind: str,
) -> None:
    """A committed deduct's retry, or a confirm, that cannot complete because a
    group's stock went (its hold ran out and the reaper expired it, then the stock
    was sold): the groups already CONFIRMED by an earlier, cut attempt are cancelled
    (``cancel.lua``, reason ``undo-<op>``), so the order is done on every group or
    on none, never half sold. Only on a short refusal: any other failure leaves a
    retry to complete the order."""
    short = (InsufficientStock, ReservationExpired)
    if not any(isinstance(o, short) for o in outcomes):
        return
    sold = {
        i: g
        for i, (g, o) in enumerate(zip(groups, outcomes, strict=True))
        if isinstance(o, LinesReply) and o.lines and all(ln.state == "confirmed" for ln in o.lines)
    }
    if sold:
        log.warning("order %r: %s cannot complete, %d groups undone", order_id, op, len(sold))
        await apply_to_groups(
            core,
            order_id,
            "cancel",
            sold,
            {},
            spec=spec,
            order_kind=order_kind,
            reason=f"undo-{op}",
        )


@dataclass
class _Turn:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


def is_refusal(outcome: Any) -> bool:
    """A script's refusal: the call ran and changed nothing."""
    return isinstance(outcome, StockError)
