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
import secrets

from stock.core import keys
from stock.core.errors import StockError
from stock.core.validate import Item
from stock.orders.cluster_transitions import ClusterTransitions, apply_to_groups, is_refusal
from stock.orders.core import OrderCore
from stock.orders.results import OrderResult, order_result
from stock.redis.scripts import LinesReply, merge_failures, merge_replies, parse_commit

log = logging.getLogger("stock.orders.cluster")


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
        """Every bucket group, then the directory; a deduct then settles its holds."""
        e, token = self.core, secrets.token_hex(6)
        hold_ms = e.deduct_hold_ms if op == "deduct" else ttl_ms
        groups = e.groups(items)
        if op == "deduct" and len(groups) == 1:
            return await self._deduct_one(order_id, groups[0], spec, token, customer)
        outcomes = await asyncio.gather(
            *(
                e.group_call(
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
                [g for g, o in zip(groups, outcomes, strict=True) if not is_refusal(o)],
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
        return order_result(order_id, op, merge_replies(replies))

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
        await apply_to_groups(
            self.core, order_id, "confirm", todo, done, spec=spec, order_kind="deduct"
        )
        replay = all(r.replay for r in held) and all(r.replay for r in done.values())
        return [LinesReply(replay, done[i].expires_ms, done[i].lines) for i in range(len(groups))]

    async def _undo(
        self, order_id: str, groups: list[list[Item]], spec: str, order_kind: str, token: str
    ) -> None:
        """This attempt lets go of its lines in ``groups`` (``abort.lua``: its token
        leaves each line's tag set; a line nobody else holds is deleted). Every group
        that may have applied is given, so a lost reply is undone too. A failed undo
        leaves lines with an expiry: the reaper returns them."""
        e = self.core
        undone = await asyncio.gather(
            *(
                e.group_call(
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
        """Confirm, release, extend or cancel: ``stock/orders/cluster_transitions.py``."""
        return await self.transitions.transition(op, order_id, ttl_ms, reason)
