"""Reserve and deduct on a Redis Cluster: bucket groups, the order's directory, undo.

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
  copy of the request that holds the line too (and may commit) keeps it.

Confirm, release, extend and cancel (the multi-node ones with their lock and
holds) and the per-group retries of a decided order: ``stock/orders/cluster_transitions.py``.
Every Redis call goes through ``core.scripts`` (batched per node where that is
done).
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Any

from stock.core import formats, keys
from stock.core.errors import OrderConflict, ReservationExpired, StockError
from stock.core.validate import Item
from stock.orders.cluster_transitions import (
    RETRIES,
    ClusterTransitions,
    apply_to_groups,
    is_refusal,
    unsell,
)
from stock.orders.core import OrderCore
from stock.orders.results import OrderResult, order_result
from stock.redis.line_layout import LineCall, OfKind
from stock.redis.scripts import LinesReply, merge_failures, merge_replies, parse_commit

log = logging.getLogger("stock.orders.cluster")

CONFLICT_TRIES = 5  # tries of an acquire whose conflict no committed order explains


class ClusterOrders:
    """Reserve, deduct and (through ``ClusterTransitions``) the transitions of one
    orders on a cluster."""

    def __init__(self, core: OrderCore) -> None:
        self.core = core
        self.transitions = ClusterTransitions(core)

    # -- reserve and deduct -------------------------------------------------------------

    async def acquire(
        self, op: str, order_id: str, items: list[Item], spec: str, ttl_ms: int, customer: str = ""
    ) -> OrderResult:
        """``_acquire_once``, again while a conflict came from an attempt that did not
        commit: a bucket's copy is written before the directory, so two attempts of
        one ``order_id`` with other items can each meet the other's copy in some
        bucket and both undo. Only the directory decides: a conflict with an order it
        holds is answered; else (the other attempt undoes or is still deciding) this
        one tries again after a random pause, so exactly one wins and a loser's 409
        describes an order that exists (the last try answers the conflict anyway:
        a crashed attempt's lines and copy stay until they expire)."""
        for attempt in range(CONFLICT_TRIES):
            try:
                return await self._acquire_once(op, order_id, items, spec, ttl_ms, customer)
            except OrderConflict:
                if attempt == CONFLICT_TRIES - 1 or await self._other_order(order_id, op, spec):
                    raise
            await self.core.pause(random.uniform(0.0, 0.01 * 2**attempt))
        raise AssertionError("unreachable")  # pragma: no cover

    async def _other_order(self, order_id: str, op: str, spec: str) -> bool:
        """Whether the directory holds a committed order of the id with another kind or
        other items (a conflict that is final). A single-group deduct's directory (one
        with owners) is opened before its script runs, which may yet refuse and drop
        it: final only once its line is there."""
        core = self.core
        found = await core.scripts("order", [keys.order_key(order_id)], ["read", 0])
        if not found:
            return False
        record = formats.parse_record(found[0])
        if record.phase != formats.DONE or (record.kind, record.spec) == (op, spec):
            return False
        if not record.owner:
            return True
        first = formats.parse_spec(record.spec)[0]
        line = keys.line_keys(first.sku, order_id, core.settings.buckets).line
        return await core.exists(line)

    async def _acquire_once(
        self, op: str, order_id: str, items: list[Item], spec: str, ttl_ms: int, customer: str
    ) -> OrderResult:
        """Every bucket group, then the directory; a deduct then settles its holds."""
        e, token = self.core, self.core.token()
        hold_ms = e.deduct_hold_ms if op == "deduct" else ttl_ms
        groups = e.groups(items)
        if op == "deduct" and len(groups) == 1:
            return await self._deduct_one(order_id, groups[0], spec, token, customer)
        outcomes = await e.group_calls(
            "reserve",
            [
                LineCall(
                    order_id=order_id,
                    purpose=OfKind(op),
                    items=g,
                    spec=spec,
                    ttl_ms=hold_ms,
                    may_create=True,
                    tag=token,
                    customer=customer,
                )
                for g in groups
            ],
        )
        failures = [o for o in outcomes if isinstance(o, BaseException)]
        if failures:  # a refused group changed nothing; any other may have applied
            await self._undo(
                order_id,
                [g for g, o in zip(groups, outcomes, strict=True) if not is_refusal(o)],
                spec,
                op,
                token,
            )
            if op == "deduct":  # a committed deduct that cannot complete: undo all of it
                await unsell(self.core, order_id, groups, outcomes, spec, op, op)
            raise merge_failures(failures)
        replies: list[LinesReply] = [o for o in outcomes if isinstance(o, LinesReply)]
        # A deduct's directory must come with half its holds left for the settle: a
        # stalled attempt is LATE and undoes. (A reserve that commits after its lines
        # expired is a reservation answered just before its expiry: no deadline.)
        held = [ln.expires_ms for r in replies for ln in r.lines if ln.state == "reserved"]
        deadline = min(held) - hold_ms // 2 if held and op == "deduct" else 0
        lifetime = e.retention_ms + hold_ms
        okey = keys.order_key(order_id)
        if op == "reserve":  # a plain SET NX GET, not a second script (lua/README.md)
            reply = await self._commit_plain(okey, spec, lifetime)
        else:
            reply = await e.scripts("order", [okey], ["commit", op, spec, lifetime, deadline])
        try:
            parse_commit(reply, order_id)
        except StockError:
            await self._undo(order_id, groups, spec, op, token)
            raise
        if op == "deduct":
            replies = await self._settle(order_id, groups, replies, spec)
        return order_result(order_id, op, merge_replies(replies))

    async def _commit_plain(self, okey: str, spec: str, lifetime: int) -> list[str]:
        """A reserve's directory by ``SET NX GET`` (no deadline), answered as
        ``order.lua commit`` answers; what it cannot tell (a ``pending`` record of
        an earlier version, a reply redis-py's fallback turned into a bool) goes
        to ``order.lua commit``, which decides the same way for the same request."""
        e = self.core
        value = formats.order_record("reserve", spec)
        got = await e.scripts.pipeline.execute("SET", okey, value, "NX", "GET", "PX", lifetime)
        if got is None:
            return ["NEW"]
        if isinstance(got, bytes):
            got = got.decode()
        if isinstance(got, str):
            record = formats.parse_record(got)
            if got == value:
                return ["DONE"]
            if record.phase in formats.TOMBSTONES:
                return ["TOMBSTONE", record.phase]
            if record.phase == formats.DONE:
                return ["CONFLICT", record.kind]
        return list(await e.scripts("order", [okey], ["commit", "reserve", spec, lifetime, 0]))

    async def _deduct_one(
        self, order_id: str, group: list[Item], spec: str, token: str, customer: str
    ) -> OrderResult:
        """A single-group deduct: its directory first (``order.lua open``), then one
        atomic ``deduct.lua``, so no unit is ever sold without a directory and a read
        never sees it half done. A refusal takes this attempt out of the directory's
        owners (the directory goes with its last owner); a lost reply does not (the
        script may have sold: a retry replays it)."""
        e, okey = self.core, keys.order_key(order_id)
        lifetime = e.retention_ms
        opened = await e.scripts("order", [okey], ["open", "deduct", spec, lifetime, token])
        parse_commit(opened, order_id)  # a refusal: nothing was opened
        try:
            reply = await e.group_call(
                "deduct",
                LineCall(
                    order_id=order_id,
                    purpose=OfKind("deduct"),
                    items=group,
                    spec=spec,
                    may_create=True,
                    tag=token,
                    customer=customer,
                ),
            )
        except StockError:
            try:
                await e.scripts("order", [okey], ["drop", token])
            except Exception as exc:  # an order with no line: a retry or nobody uses it
                log.error("order %r: refused deduct left its directory: %r", order_id, exc)
            raise
        return order_result(order_id, "deduct", reply)

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
        try:
            await apply_to_groups(
                self.core, order_id, "confirm", todo, done, spec=spec, order_kind="deduct"
            )
        except ReservationExpired as late:  # a hold ran out and its stock went: undo all
            outcomes = [done.get(i, late) for i in range(len(groups))]
            await unsell(self.core, order_id, groups, outcomes, spec, "deduct", "deduct")
            raise
        replay = all(r.replay for r in held) and all(r.replay for r in done.values())
        return [LinesReply(replay, done[i].expires_ms, done[i].lines) for i in range(len(groups))]

    async def _undo(
        self, order_id: str, groups: list[list[Item]], spec: str, order_kind: str, token: str
    ) -> None:
        """This attempt lets go of its lines in ``groups`` (``abort.lua``: its token
        leaves each line's tag set; a line nobody else holds is deleted). Every group
        that may have applied is given, so a lost reply is undone too. A group whose
        undo failed without a refusal is undone again (it is idempotent), ``RETRIES``
        times: a hanging try's holds must not outlive its refusal. An undo that still
        fails leaves lines with an expiry: the reaper returns them."""
        e, todo = self.core, list(groups)
        for attempt in range(RETRIES + 1):
            undone = await asyncio.gather(
                *(
                    e.group_call(
                        "abort",
                        LineCall(
                            order_id=order_id,
                            purpose=OfKind(order_kind),
                            items=g,
                            spec=spec,
                            tag=token,
                        ),
                    )
                    for g in todo
                ),
                return_exceptions=True,
            )
            failed = [(g, o) for g, o in zip(todo, undone, strict=True) if not _undone(o)]
            todo = [g for g, _o in failed]
            if not todo:
                return
            if attempt == RETRIES:
                for _g, problem in failed:
                    log.error("order %r: undo failed, the lines expire: %r", order_id, problem)
                return
            await e.pause(0.05 * (attempt + 1))

    # -- confirm, release, extend, cancel --------------------------------------------------

    async def transition(
        self, op: str, order_id: str, ttl_ms: int, reason: str = ""
    ) -> OrderResult:
        """Confirm, release, extend or cancel: ``stock/orders/cluster_transitions.py``."""
        return await self.transitions.transition(op, order_id, ttl_ms, reason)


def _undone(outcome: Any) -> bool:
    """An undo that ran, or was refused (a line moved on, a fenced SKU): not again."""
    return not isinstance(outcome, BaseException) or is_refusal(outcome)
