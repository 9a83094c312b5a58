"""Locations (DESIGN §13): a SKU's stock per warehouse or store, its allocation
strategy and its transfers.

The allocation itself happens inside the line scripts (``lua/_loc.lua``), in the
same atomic step as the reservation; this module sets the locations up, moves
units between them (``lua/locations.lua``) and reads them. Design and key
layout: ``lua/README.md``, "Locations".
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from stock.core import keys, validate
from stock.core.errors import InvalidRequest, NotFound, OrderConflict
from stock.orders.engine import StockEngine
from stock.redis.client import store_boundary
from stock.redis.scripts import Counters, parse_counters, raise_for

STRATEGIES = ("priority", "most_available")
TRANSIT, RECEIVED = "in_transit", "received"
_TRANSFER_STATES = {"T": TRANSIT, "D": RECEIVED}


def parse_locations(raw: dict[str, str]) -> dict[str, Any] | None:
    """The locations hash (``lua/_loc.lua``) as the API shows it; None for a SKU
    without locations."""
    places: dict[str, dict[str, int]] = {}
    for name, value in sorted(raw.items()):
        if name.startswith("@"):
            a, r, s, t = (int(v) for v in value.split(","))
            places[name[1:]] = {"available": a, "reserved": r, "sold": s, "in_transit": t}
    if not places:
        return None
    order = [n for n in raw.get("order", "").split(",") if n]
    return {
        "in_transit": int(raw.get("transit", 0)),
        "locations": places,
        "allocation": {
            "strategy": raw.get("strategy", "priority"),
            "order": order,
            "split": raw.get("split") == "1",
        },
    }


def parse_transfer(transfer_id: str, value: str) -> dict[str, Any]:
    """One transfer of the transfers hash: ``from|to|qty|state|reason``."""
    origin, to, qty, state, reason = value.split("|", 4)
    return {
        "transfer_id": transfer_id,
        "from": origin,
        "to": to,
        "qty": int(qty),
        "state": _TRANSFER_STATES.get(state, state),
        "reason": reason,
    }


class Locations:
    """The location operations of one engine (its client, scripts and settings)."""

    def __init__(self, engine: StockEngine) -> None:
        self.engine = engine
        self.buckets = engine.settings.buckets

    def _keys(self, sku: str) -> list[str]:
        return [
            keys.sku_key(sku, self.buckets),
            keys.events_key(keys.bucket_of(sku, self.buckets)),
            keys.locations_key(sku, self.buckets),
            keys.transfers_key(sku, self.buckets),
        ]

    async def _call(self, sku: str, args: Sequence[Any], *, once: bool = False) -> Any:
        return await self.engine.scripts("locations", self._keys(sku), [sku, *args], once=once)

    @store_boundary
    async def read(self, sku: str) -> dict[str, Any] | None:
        """``in_transit``, ``locations`` and ``allocation`` of a SKU with locations."""
        validate.sku(sku)
        raw = await self._hgetall(keys.locations_key(sku, self.buckets))
        return parse_locations(raw)

    @store_boundary
    async def transfers(self, sku: str) -> list[dict[str, Any]]:
        validate.sku(sku)
        raw = await self._hgetall(keys.transfers_key(sku, self.buckets))
        return [parse_transfer(i, v) for i, v in sorted(raw.items())]

    async def _hgetall(self, key: str) -> dict[str, str]:
        return await self.engine.core.hgetall(key)

    @store_boundary
    async def set(self, sku: str, location: str, available: int, reason: str = "") -> Counters:
        validate.sku(sku)
        validate.location(location)
        validate.int_in(available, "available", 0, 10**12)
        reply = await self._call(sku, ["set", location, available, reason])
        return parse_counters(reply, sku, "locations.lua")

    @store_boundary
    async def adjust(
        self, sku: str, location: str, delta: int, expected: int | None = None, reason: str = ""
    ) -> Counters:
        validate.sku(sku)
        validate.location(location)
        validate.int_in(delta, "delta", -(10**12), 10**12)
        args = ["adjust", location, delta, "" if expected is None else expected, reason]
        reply = await self._call(sku, args, once=True)  # a delta applied twice: units made
        return parse_counters(reply, sku, "locations.lua")

    @store_boundary
    async def set_allocation(
        self, sku: str, strategy: Any, order: Any = None, split: Any = False
    ) -> dict[str, Any]:
        validate.sku(sku)
        names = _allocation(strategy, order, split)
        reply = await self._call(
            sku, ["allocation", strategy, ",".join(names), "1" if split else "0"]
        )
        if reply[0] != "OK":
            raise_for(reply, script="locations.lua")
        return {"sku": sku, "strategy": strategy, "order": names, "split": split}

    @store_boundary
    async def send(
        self, sku: str, transfer_id: Any, origin: Any, to: Any, qty: Any, reason: str = ""
    ) -> dict[str, Any]:
        """A transfer leaves ``origin`` at once and is in transit until received;
        idempotent by ``transfer_id``."""
        validate.sku(sku)
        validate.order_id(transfer_id, "transfer_id")
        validate.location(origin, "from")
        validate.location(to, "to")
        if origin == to:
            raise InvalidRequest("from and to must differ", field="to")
        validate.int_in(qty, "qty", 1, validate.MAX_QTY)
        reply = await self._call(sku, ["send", transfer_id, origin, to, qty, reason])
        return _transfer(sku, transfer_id, reply)

    @store_boundary
    async def receive(self, sku: str, transfer_id: Any) -> dict[str, Any]:
        validate.sku(sku)
        validate.order_id(transfer_id, "transfer_id")
        return _transfer(sku, transfer_id, await self._call(sku, ["receive", transfer_id]))

    @store_boundary
    async def view(self, sku: str) -> tuple[Counters, int, dict[str, Any] | None]:
        """The SKU's totals, its shard count (DESIGN §12) and its locations, read in
        the same round trip."""
        (counters, shards), located = await asyncio.gather(
            self.engine.stock_view(sku), self.read(sku)
        )
        return counters, shards, located


def _allocation(strategy: Any, order: Any, split: Any) -> list[str]:
    if strategy not in STRATEGIES:
        raise InvalidRequest("strategy must be priority or most_available", field="strategy")
    if not isinstance(split, bool):
        raise InvalidRequest("split must be true or false", field="split")
    if order is None:  # none given: the locations by name
        order = []
    if not isinstance(order, list) or len(order) > 256:
        raise InvalidRequest("order must be a list of locations", field="order")
    return [validate.location(n, f"order[{i}]") for i, n in enumerate(order)]


def _transfer(sku: str, transfer_id: str, reply: Sequence[Any]) -> dict[str, Any]:
    code = reply[0]
    if code == "CONFLICT":
        raise OrderConflict(f"transfer {transfer_id!r} exists with other values")
    if code == "NOTFOUND":
        raise NotFound(f"unknown transfer {transfer_id!r}", transfer_id=transfer_id)
    if code not in ("OK", "REPLAY"):
        raise_for(reply, script="locations.lua")
    return {
        "sku": sku,
        "transfer_id": transfer_id,
        "from": str(reply[2]),
        "to": str(reply[3]),
        "qty": int(reply[4]),
        "state": _TRANSFER_STATES[str(reply[1])],
        "replay": code == "REPLAY",
    }
