"""The Lua scripts: the only module that knows their file names and reply codes.

Every reply code becomes a typed result or a ``stock.core.errors`` error here
(``parse_*``, ``raise_for``); a code this version does not know is ``UnknownReply``
(503), never a bare string for the caller to compare.

Each ``lua/<op>.lua`` is read once with ``importlib.resources`` (the wheel ships
them as ``stock/lua``; a source checkout reads the top-level ``lua/``), prefixed
with ``lua/_lib.lua`` and called by EVALSHA through an auto-pipeline, which loads
the script and calls again on NOSCRIPT (after a restart, failover or SCRIPT FLUSH).
"""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, NoReturn

from redis.asyncio import RedisCluster

from stock.core.errors import (
    FenceBusy,
    FenceLost,
    InsufficientStock,
    InvalidRequest,
    InvalidTransition,
    LimitExceeded,
    NotFound,
    OrderClosed,
    OrderConflict,
    ReservationExpired,
    StaleStock,
    StockError,
    Unavailable,
    UnknownReply,
)
from stock.core.formats import state_name
from stock.redis.cluster_pipeline import ClusterBatch
from stock.redis.pipeline import AutoPipeline, evalsha

LINE_OPS = ("reserve", "deduct", "confirm", "release", "abort", "cancel", "extend", "hold")
OTHER_OPS = (
    "set",
    "adjust",
    "expire",
    "defer",
    "limits",
    "order",
    "lock",
    "resync",
    "writer_ack",
    "shard_move",  # sharded SKUs: stock/orders/sharded.py
    "locations",  # a SKU's locations, allocation strategy, transfers (DESIGN §13)
)
RESYNC_OPS = ("fence", "resync_order", "resync_locations")  # persist/fences.py, persist/resync.py


def _lua_dir() -> Path:
    packaged = resources.files("stock") / "lua"
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parents[2] / "lua"


def with_lib(source: str) -> str:
    """A script's full source: ``lua/_lib.lua``, ``lua/_loc.lua`` (locations), then
    ``source``."""
    lua = _lua_dir()
    return (lua / "_lib.lua").read_text() + "\n" + (lua / "_loc.lua").read_text() + "\n" + source


def load_sources() -> dict[str, str]:
    """Script name -> full source (``_lib.lua`` + the operation's file)."""
    lua = _lua_dir()
    return {
        op: with_lib((lua / f"{op}.lua").read_text()) for op in LINE_OPS + OTHER_OPS + RESYNC_OPS
    }


_SOURCES = load_sources()


@dataclass(frozen=True, slots=True)
class LineResult:
    sku: str
    state: str  # a name of formats.STATE_NAMES
    qty: int
    expires_ms: int
    allocations: str = ""  # 'location:qty,...' on a SKU with locations (DESIGN §13)


@dataclass(frozen=True, slots=True)
class LinesReply:
    replay: bool
    expires_ms: int
    lines: list[LineResult]


@dataclass(frozen=True, slots=True)
class Counters:
    sku: str
    available: int
    reserved: int
    sold: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "sku": self.sku,
            "available": self.available,
            "reserved": self.reserved,
            "sold": self.sold,
        }


def _pairs(values: Sequence[Any]) -> list[tuple[str, int]]:
    return [(str(values[i]), int(values[i + 1])) for i in range(0, len(values), 2)]


_LOCATION_REFUSALS = {
    "NOLOCATION": "SKU {0!r} has no location {1!r}",
    "LOCATED": "SKU {0!r} has locations: name the location (PUT /v1/stock/{{sku}}/locations/...)",
}


def _short(rest: Sequence[Any]) -> list[dict[str, Any]]:
    """An INSUFFICIENT reply's items; 'n@location' is one location's refusal (a pinned
    item, a transfer), which names the location."""
    out: list[dict[str, Any]] = []
    for i in range(0, len(rest), 2):
        avail, _, where = str(rest[i + 1]).partition("@")
        item: dict[str, Any] = {"sku": str(rest[i]), "available": int(avail)}
        if where:
            item["location"] = where
        out.append(item)
    return out


def raise_for(reply: Sequence[Any], order_id: str = "", script: str = "a script") -> NoReturn:
    """Turn a script's refusal code into the matching StockError; an unknown code
    into UnknownReply."""
    code, rest = reply[0], reply[1:]
    if code == "INSUFFICIENT":
        short = _short(rest)
        names = ", ".join(str(s["sku"]) for s in short)
        raise InsufficientStock(f"not enough stock for {names}", items=short)
    if code == "CONFLICT":
        raise OrderConflict(f"order {order_id!r} already exists with other items")
    if code == "TRANSITION":
        state = state_name(str(rest[1]))
        raise InvalidTransition(
            f"order {order_id!r} line {rest[0]!r} is {state}", state=state, sku=rest[0]
        )
    if code == "EXPIRED":  # every short SKU, as for INSUFFICIENT
        short = [{"sku": sku, "available": avail} for sku, avail in _pairs(rest)]
        names = ", ".join(f"{s['sku']!r} ({s['available']} available)" for s in short)
        raise ReservationExpired(
            f"reservation {order_id!r} expired and there is not enough stock for {names}",
            sku=rest[0],
            available=int(rest[1]),
            items=short,
        )
    if code == "UNAVAILABLE":
        raise Unavailable(f"SKU {rest[0]!r} is being resynced; retry shortly", sku=rest[0])
    if code == "NOTFOUND":
        raise NotFound(f"order {order_id!r} has no line for {rest[0]!r}")
    if code == "NOORDER":
        raise NotFound(f"unknown order {order_id!r}", order_id=order_id)
    if code == "CLOSED":
        raise OrderClosed(
            f"order {order_id!r} was {rest[0]} before it was reserved", state=str(rest[0])
        )
    if code == "LIMIT":
        over = [
            {"sku": str(rest[i]), "limit": int(rest[i + 1]), "held": int(rest[i + 2])}
            for i in range(0, len(rest), 3)
        ]
        names = ", ".join(str(o["sku"]) for o in over)
        raise LimitExceeded(f"per-customer limit reached for {names}", items=over)
    if code == "CUSTOMER_REQUIRED":
        raise InvalidRequest(
            f"SKU {rest[0]!r} has a per-customer limit: customer_id is required",
            field="customer_id",
        )
    if code == "REHOME":  # a sharded SKU's customer lives in another shard (sharded.py)
        raise Unavailable(
            f"SKU {rest[0]!r}: the customer's home shard is {rest[1]}; retry",
            sku=str(rest[0]),
            home=int(rest[1]),
        )
    if code in ("NOLOCATION", "LOCATED"):
        raise InvalidRequest(_LOCATION_REFUSALS[code].format(*rest), field="location")
    if code == "STALE":
        raise StaleStock("available differs from expected_available", available=int(rest[0]))
    raise UnknownReply(
        f"{script} answered {code!r}, which this version does not know; retry shortly",
        reply=[str(value) for value in reply[:4]],
    )


def parse_lines(reply: Sequence[Any], order_id: str, script: str = "a line script") -> LinesReply:
    """A line script's reply (``run_lines`` in ``lua/_lib.lua``)."""
    if reply[0] not in ("OK", "REPLAY"):
        raise_for(reply, order_id, script)
    rest = reply[2:]
    lines = [
        LineResult(
            str(rest[i]),
            state_name(str(rest[i + 1])),
            int(rest[i + 2]),
            int(rest[i + 3]),
            str(rest[i + 4]),
        )
        for i in range(0, len(rest), 5)
    ]
    return LinesReply(replay=reply[0] == "REPLAY", expires_ms=int(reply[1]), lines=lines)


def merge_replies(outcomes: Sequence[Any]) -> LinesReply:
    """One reply for the bucket groups of one order: a replay only if every group was."""
    replies = [o for o in outcomes if isinstance(o, LinesReply)]
    if len(replies) == 1:  # a single-group order
        return replies[0]
    return LinesReply(
        replay=all(r.replay for r in replies),
        expires_ms=max(r.expires_ms for r in replies),
        lines=[line for r in replies for line in r.lines],
    )


def merge_failures(failures: list[BaseException]) -> BaseException:
    """One error for a failed multi-group call: all short items, else the first error."""
    short = [f for f in failures if isinstance(f, InsufficientStock)]
    if short:
        items = [item for f in short for item in f.details["items"]]
        names = ", ".join(i["sku"] for i in items)
        return InsufficientStock(f"not enough stock for {names}", items=items)
    late = [f for f in failures if isinstance(f, ReservationExpired)]
    if len(late) > 1:  # a late confirm on several nodes: name every short SKU too
        items = [item for f in late for item in f.details["items"]]
        message = "; ".join(f.message for f in late)
        return ReservationExpired(message, **{**late[0].details, "items": items})
    for failure in failures:
        if isinstance(failure, StockError):
            return failure
    return failures[0]


def parse_counters(reply: Sequence[Any], sku: str, script: str = "set/adjust") -> Counters:
    if reply[0] != "OK":
        raise_for(reply, script=script)
    return Counters(sku, int(reply[1]), int(reply[2]), int(reply[3]))


def parse_limit(reply: Sequence[Any], sku: str) -> int | None:
    """``limits.lua``: the SKU's per-customer limit now, ``None`` for none."""
    if reply[0] == "NOTFOUND":
        raise NotFound(f"unknown SKU {sku!r}", sku=sku)
    if reply[0] != "OK":
        raise_for(reply, script="limits.lua")
    return int(reply[1]) if reply[1] != "" else None


def parse_commit(reply: Sequence[Any], order_id: str) -> bool:
    """``order.lua`` commit or open: True when this call wrote the record (``NEW``),
    False when it was there already (``DONE``); else the error that refused it."""
    code = str(reply[0])
    if code in ("NEW", "DONE"):
        return code == "NEW"
    if code == "TOMBSTONE":
        raise OrderClosed(
            f"order {order_id!r} was {reply[1]} before it was reserved", state=str(reply[1])
        )
    if code == "LATE":
        raise Unavailable(f"order {order_id!r} took too long and was undone; retry")
    raise_for(reply, order_id, "order.lua")  # CONFLICT, or a code it does not know


@dataclass(frozen=True, slots=True)
class Tomb:
    """``order.lua tomb``: ``exists`` (a committed order: run the transition), else
    the tombstone's state and whether this call wrote it (``new``)."""

    exists: bool
    new: bool = False
    state: str = ""


def parse_tomb(reply: Sequence[Any], order_id: str, state: str) -> Tomb:
    """``state``: the tombstone the call asked for (``released`` or ``cancelled``)."""
    code = reply[0]
    if code == "EXISTS":
        return Tomb(exists=True)
    if code == "NEW":
        return Tomb(exists=False, new=True, state=state)
    if code == "TOMBSTONE":
        return Tomb(exists=False, new=False, state=str(reply[1]))
    raise_for(reply, order_id, "order.lua")


def parse_fence(reply: Sequence[Any]) -> int:
    """``fence.lua``: the number of SKUs fenced, renewed or lifted; FenceBusy when
    another resync holds one (take), FenceLost when one is no longer this run's."""
    code = reply[0]
    if code == "OK":
        return int(reply[1])
    if code == "BUSY":
        sku, fence = reply[1], reply[2]
        raise FenceBusy(f"SKU {sku!r} is fenced by another resync ({fence})", str(sku))
    if code == "LOST":
        sku = reply[1]
        raise FenceLost(f"the fence on SKU {sku!r} ended before the resync's write", str(sku))
    raise_for(reply, script="fence.lua")


def parse_resync(reply: Sequence[Any]) -> int:
    """``resync.lua``: the SKU's new seq; FenceLost when its fence was not this run's."""
    if reply[0] == "OK":
        return int(reply[1])
    if reply[0] == "NOTFENCED":
        sku = reply[1]
        raise FenceLost(f"the fence on SKU {sku!r} ended before its write", str(sku))
    raise_for(reply, script="resync.lua")


def expect_ok(reply: Sequence[Any], script: str) -> None:
    """A script that answers ``{'OK'}`` or a refusal (``resync_order.lua``)."""
    if reply[0] != "OK":
        raise_for(reply, script=script)


class Scripts:
    """The registered scripts of one client (standalone or cluster).

    Calls are auto-pipelined: on standalone through one AutoPipeline (which never
    sends a call twice), on a cluster through one per node (``ClusterBatch``),
    which resends a lost call through redis-py's cluster client unless ``once``.
    ``pipeline`` also carries the engine's keyed non-script commands (GET, HMGET).
    """

    def __init__(self, client: Any) -> None:
        self.client = client
        self._scripts = {name: client.register_script(src) for name, src in _SOURCES.items()}
        self._auto: AutoPipeline | None = None
        self._batch: ClusterBatch | None = None
        self.pipeline: AutoPipeline | ClusterBatch
        if isinstance(client, RedisCluster):
            self.pipeline = self._batch = ClusterBatch(client)
        else:
            self.pipeline = self._auto = AutoPipeline(client)

    def __call__(
        self, name: str, keys: Sequence[str], args: Sequence[Any], *, once: bool = False
    ) -> Awaitable[Any]:
        """Run script ``name`` (await the result). With ``once`` the call is never sent
        a second time: on a cluster a call whose reply was lost (a timeout, a dropped
        connection) is resent through redis-py, which is harmless for the idempotent
        order scripts but would apply a non-idempotent one (``adjust``) twice; the
        caller hears the error instead and the outcome stays the caller's to check.

        A plain function returning the call's awaitable, not a coroutine of its own
        (each level of coroutines is paid again at every wait for a reply). On a
        cluster the call is sent at once (``ClusterBatch.call``): several calls made
        one after the other, then awaited, travel together."""
        script = self._scripts[name]
        if self._auto is not None:
            return evalsha(self._auto, script.sha, _SOURCES[name], list(keys), list(args))
        assert self._batch is not None
        command = ("EVALSHA", script.sha, len(keys), *keys, *args)
        fallback = None if once else (lambda: script(keys=keys, args=args))
        return self._batch.call(keys[0], command, fallback, _SOURCES[name])
