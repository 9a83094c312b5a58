"""Orders on a Redis Cluster: bucket groups, the order's directory, undo and holds.

An order's lines live in their SKUs' bucket slots, its directory (what confirm,
release, extend, cancel and ``get_order`` read) in the order id's slot. The
design and why, in ``lua/README.md`` ("Orders on a Redis Cluster"):

- reserve: every group call (each checks the bucket's copy of the order), then
  commit the directory; a single-group reserve is one script call + the commit;
- deduct, one group: the directory first, then one atomic script (no unit sold
  without a directory, never seen half done); several groups: hold every group
  (RESERVED, short expiry), commit with a deadline, then confirm every group: a
  crash leaves only lines with an expiry or a committed order that a retry
  completes;
- an attempt that fails undoes every group that may have applied: its token leaves
  each line's tag set, and only a line no other attempt holds is deleted, so a
  copy of the request that holds the line too (and may commit) keeps it;
- multi-node confirm/release/extend: a lock (outliving the holds), holds on every
  group, the lock re-checked, then the operation, retried per group.

Every Redis call goes through ``engine.scripts`` (batched per node where that is
done), except redis-py's Lock of multi-node transitions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from redis.exceptions import LockNotOwnedError

from stock import keys
from stock.errors import StockError, Unavailable
from stock.formats import items_spec
from stock.scripts import NO_ORDER_KEY, LinesReply, merge_failures, merge_replies, parse_commit
from stock.validate import Item

if TYPE_CHECKING:
    from stock.engine import OrderResult, StockEngine

log = logging.getLogger("stock.cluster")

HOLD_MS = 10_000  # a multi-node transition's holds: enough for its second step
LOCK_TIMEOUT_S = HOLD_MS / 1000 + 2  # the order's lock outlives the holds it guards
LOCK_WAIT_S = 10.0  # the longest a multi-node transition waits for its order's lock
RETRIES = 3  # calls again of a group whose call failed after the order was decided


class ClusterOrders:
    """Reserve, deduct and multi-node transitions of one engine on a cluster."""

    def __init__(self, engine: StockEngine) -> None:
        self.engine = engine
        self._turns: dict[str, _Turn] = {}

    # -- reserve and deduct -------------------------------------------------------------

    async def acquire(
        self, op: str, order_id: str, items: list[Item], spec: str, ttl_ms: int, customer: str = ""
    ) -> OrderResult:
        """Every bucket group, then the directory; a deduct then settles its holds."""
        from stock.engine import _result

        e, token = self.engine, secrets.token_hex(6)
        hold_ms = e.deduct_hold_ms if op == "deduct" else ttl_ms
        groups = e._groups(items)
        if op == "deduct" and len(groups) == 1:
            return await self._deduct_one(order_id, groups[0], spec, token, customer)
        outcomes = await asyncio.gather(
            *(
                e._group_call(
                    "reserve",
                    order_id=order_id,
                    group=g,
                    spec=spec,
                    ttl_ms=hold_ms,
                    may_create=True,
                    order_kind=op,
                    tag=token,
                    customer=customer,
                )
                for g in groups
            ),
            return_exceptions=True,
        )
        failures = [o for o in outcomes if isinstance(o, BaseException)]
        if failures:  # a refused group changed nothing; any other may have applied
            await self._undo(
                order_id,
                [g for g, o in zip(groups, outcomes, strict=True) if not _refused(o)],
                spec,
                op,
                token,
            )
            raise merge_failures(failures)
        replies: list[LinesReply] = [o for o in outcomes if isinstance(o, LinesReply)]
        # A deduct's directory must come with half its holds left for the settle: a
        # stalled attempt is LATE and undoes. (A reserve that commits after its lines
        # expired is a reservation answered just before its expiry: no deadline.)
        held = [ln.expires_ms for r in replies for ln in r.lines if ln.state == "reserved"]
        deadline = min(held) - hold_ms // 2 if held and op == "deduct" else 0
        lifetime = e.retention_ms + hold_ms
        okey = keys.order_key(order_id)
        reply = await e.scripts("order", [okey], ["commit", op, spec, lifetime, deadline])
        try:
            parse_commit(reply, order_id)
        except StockError:
            await self._undo(order_id, groups, spec, op, token)
            raise
        if op == "deduct":
            replies = await self._settle(order_id, groups, replies, spec)
        return _result(order_id, op, merge_replies(replies))

    async def _deduct_one(
        self, order_id: str, group: list[Item], spec: str, token: str, customer: str
    ) -> OrderResult:
        """A single-group deduct: its directory first (``order.lua open``), then one
        atomic ``deduct.lua``, so no unit is ever sold without a directory and a read
        never sees it half done. A refusal takes this attempt out of the directory's
        owners (the directory goes with its last owner); a lost reply does not (the
        script may have sold: a retry replays it)."""
        from stock.engine import _result

        e, okey = self.engine, keys.order_key(order_id)
        lifetime = e.retention_ms
        opened = await e.scripts("order", [okey], ["open", "deduct", spec, lifetime, token])
        parse_commit(opened, order_id)  # a refusal: nothing was opened
        try:
            reply = await e._group_call(
                "deduct",
                order_id=order_id,
                group=group,
                spec=spec,
                may_create=True,
                order_kind="deduct",
                tag=token,
                customer=customer,
            )
        except StockError:
            try:
                await e.scripts("order", [okey], ["drop", token])
            except Exception as exc:  # an order with no line: a retry or nobody uses it
                log.error("order %r: refused deduct left its directory: %r", order_id, exc)
            raise
        return _result(order_id, "deduct", reply)

    async def _settle(
        self, order_id: str, groups: list[list[Item]], held: list[LinesReply], spec: str
    ) -> list[LinesReply]:
        """A committed deduct's last step: held lines -> CONFIRMED (``confirm.lua``).
        The order is decided: a group whose call failed is called again; the answer is
        a replay only if every line was CONFIRMED already."""
        todo = {
            i: g
            for i, (g, r) in enumerate(zip(groups, held, strict=True))
            if any(ln.state != "confirmed" for ln in r.lines)
        }
        done = {i: r for i, r in enumerate(held) if i not in todo}
        await self._apply(order_id, "confirm", todo, done, spec=spec, order_kind="deduct")
        replay = all(r.replay for r in held) and all(r.replay for r in done.values())
        return [LinesReply(replay, done[i].expires_ms, done[i].lines) for i in range(len(groups))]

    async def _undo(
        self, order_id: str, groups: list[list[Item]], spec: str, order_kind: str, token: str
    ) -> None:
        """This attempt lets go of its lines in ``groups`` (``abort.lua``: its token
        leaves each line's tag set; a line nobody else holds is deleted). Every group
        that may have applied is given, so a lost reply is undone too. A failed undo
        leaves lines with an expiry: the reaper returns them."""
        e = self.engine
        undone = await asyncio.gather(
            *(
                e._group_call(
                    "abort", order_id=order_id, group=g, spec=spec, order_kind=order_kind, tag=token
                )
                for g in groups
            ),
            return_exceptions=True,
        )
        for problem in undone:
            if isinstance(problem, BaseException):
                log.error("order %r: undo failed, the lines expire: %r", order_id, problem)

    # -- confirm, release, extend, cancel --------------------------------------------------

    async def transition(
        self, op: str, order_id: str, ttl_ms: int, reason: str = ""
    ) -> OrderResult:
        from stock.engine import _result

        e = self.engine
        order_kind, _phase, items = await e._record(order_id, e.retention_ms + ttl_ms)
        spec, groups = items_spec(items), e._groups(items)
        todo = dict(enumerate(groups))
        done: dict[int, LinesReply] = {}
        if len(groups) == 1:  # one script call: atomic on its node
            await self._apply(
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
            return _result(order_id, op, merge_replies(list(done.values())))
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
        from stock.engine import _result

        e, todo, done = self.engine, dict(enumerate(groups)), dict[int, LinesReply]()
        lock = e.redis.lock(keys.order_lock_key(order_id), timeout=LOCK_TIMEOUT_S)
        await self._lock(order_id, lock)
        lost = False
        try:
            # (a deduct's lines cannot be released or extended: no holds for those)
            if op == "confirm" or (op in ("release", "extend") and order_kind != "deduct"):
                token = await self._hold_all(order_id, groups, spec, op)
                try:
                    await lock.reacquire()  # still ours, and for the whole second step
                except LockNotOwnedError as exc:
                    lost = True
                    await self._unhold(order_id, groups, spec, token)
                    message = f"order {order_id!r} lost its lock; retry"
                    raise Unavailable(message, order_id=order_id) from exc
            await self._apply(
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
        return _result(order_id, op, merge_replies([done[i] for i in range(len(groups))]))

    async def _lock(self, order_id: str, lock: Any) -> None:
        """Wait for the order's lock without holding an in-flight slot."""
        deadline, delay = time.monotonic() + LOCK_WAIT_S, 0.005
        while not await lock.acquire(blocking=False):
            if time.monotonic() > deadline:
                raise Unavailable(f"order {order_id!r} is busy; retry", order_id=order_id)
            await self.engine._pause(delay)
            delay = min(delay * 2, 0.1)

    async def _hold_all(self, order_id: str, groups: list[list[Item]], spec: str, op: str) -> str:
        """Before a multi-node confirm, release or extend: every group's lines get
        time enough that the reaper cannot expire some of them half-way (a confirm
        also re-acquires expired lines, ``hold.lua``), or nothing changes (every
        group's holds are undone) and the call is refused. Returns the holds' token."""
        e, token = self.engine, secrets.token_hex(6)
        held = await asyncio.gather(
            *(
                e._group_call(
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
            maybe = [g for g, h in zip(groups, held, strict=True) if not _refused(h)]
            await self._unhold(order_id, maybe, spec, token)
            raise merge_failures(failures)
        return token

    async def _unhold(self, order_id: str, groups: list[list[Item]], spec: str, token: str) -> None:
        e = self.engine
        undone = await asyncio.gather(
            *(
                e._group_call(
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

    async def _apply(
        self,
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
        e = self.engine
        for attempt in range(retries + 1):
            pending = list(todo.items())
            outcomes = await asyncio.gather(
                *(
                    e._group_call(
                        op,
                        order_id=order_id,
                        group=g,
                        spec=spec,
                        ttl_ms=ttl_ms,
                        order_kind=order_kind,
                        reason=reason,
                    )
                    for _, g in pending
                ),
                return_exceptions=True,
            )
            failures = []
            for (i, _g), outcome in zip(pending, outcomes, strict=True):
                if isinstance(outcome, LinesReply):
                    done[i] = outcome
                    del todo[i]
                else:
                    failures.append(outcome)
            refused = [f for f in failures if _refused(f)]
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
            await e._pause(0.05 * (attempt + 1))


@dataclass
class _Turn:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


def _refused(outcome: Any) -> bool:
    """A script's refusal: the call ran and changed nothing."""
    return isinstance(outcome, StockError)
