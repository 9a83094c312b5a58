"""DESIGN §4 "Hot path cost" on standalone Redis, counted by the server itself (its
``MONITOR`` feed and ``INFO commandstats``): confirm, release, extend and cancel are
one script call each, which reads the order record and finds the order's lines by
itself."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Iterator
from typing import Any

import pytest
import redis as redis_sync

from stock.core import keys
from stock.core.config import Settings
from stock.core.errors import NotFound, OrderClosed, StockError
from stock.orders.engine import StockEngine
from stock.redis.client import connect
from tests.conftest import BUCKETS
from tests.servers import ServerProcess

END = "counted"


class Counter:
    """The commands an operation sends: each one the server ran for a client (its
    ``MONITOR`` feed, commands a script runs inside the server left out), and the
    EVALSHA calls of ``INFO commandstats``. (The commandstats of the other commands
    cannot tell: they count the GETs, HSETs, ... a script runs too, and the one
    script now does the GET the engine sent before.)"""

    def __init__(self, server: redis_sync.Redis) -> None:
        self.server = server
        self.raised: StockError | None = None

    async def count(self, operation: Awaitable[Any]) -> dict[str, Any]:
        """The calls of ``operation``; a StockError it raises is kept in ``raised``."""
        self.server.config_resetstat()
        self.raised = None
        with self.server.monitor() as feed:
            try:
                await operation
            except StockError as error:
                self.raised = error
            finally:
                self.server.echo(END)
                seen = []
                while (command := feed.next_command())["command"] != f"ECHO {END}":
                    if command["client_type"] != "lua":
                        seen.append((command["client_port"], command["command"]))
                # (the connection that sent the ECHO may have opened meanwhile: not ours)
                sent = [c.split()[0].lower() for p, c in seen if p != command["client_port"]]
        stats: dict[str, Any] = self.server.info("commandstats")
        evalsha = int(stats.get("cmdstat_evalsha", {"calls": 0})["calls"])
        return {"evalsha_calls": evalsha, "sent": {name: sent.count(name) for name in set(sent)}}


@pytest.fixture
def counter(standalone_server: ServerProcess) -> Iterator[Counter]:
    client = redis_sync.Redis(port=standalone_server.port, decode_responses=True)
    yield Counter(client)
    client.close()


@pytest.fixture
async def engine(standalone_server: ServerProcess) -> AsyncIterator[StockEngine]:
    settings = Settings(redis_url=standalone_server.url, buckets=BUCKETS)
    client = connect(settings)
    await client.flushall()
    engine = StockEngine(client, settings)
    await warm_up(engine)
    yield engine
    await client.aclose()


async def warm_up(engine: StockEngine) -> None:
    """Every script loaded (a first EVALSHA hears NOSCRIPT and loads it)."""
    await engine.set_stock("W", 10)
    for order_id in ("w-confirm", "w-release"):
        await engine.reserve(order_id, [{"sku": "W", "qty": 1}])
    await engine.deduct("w-deduct", [{"sku": "W", "qty": 1}])
    await engine.extend("w-confirm", 60)
    await engine.confirm("w-confirm")
    await engine.release("w-release")
    await engine.cancel("w-deduct")
    await engine.release("w-tombstone")


ONE_EVALSHA = {"evalsha_calls": 1, "sent": {"evalsha": 1}}


@pytest.mark.parametrize("skus", [["A"], ["A", "B", "C", "D", "E"]], ids=["one", "five"])
async def test_each_transition_is_one_evalsha(
    engine: StockEngine, counter: Counter, skus: list[str]
) -> None:
    """Confirm, release, extend and cancel (and their replays) of a known order: one
    EVALSHA each, nothing else. Five SKUs span several buckets."""
    assert len({keys.bucket_of(s, BUCKETS) for s in skus}) == len(skus)
    items = [{"sku": sku, "qty": 2} for sku in skus]
    for sku in skus:
        await engine.set_stock(sku, 100)
    await engine.reserve("r1", items, ttl_s=60)
    await engine.reserve("r2", items, ttl_s=60)
    await engine.deduct("d1", items)
    assert await counter.count(engine.extend("r1", 600)) == ONE_EVALSHA
    assert await counter.count(engine.confirm("r1")) == ONE_EVALSHA
    assert await counter.count(engine.confirm("r1")) == ONE_EVALSHA  # a replay
    assert await counter.count(engine.release("r2")) == ONE_EVALSHA
    assert await counter.count(engine.release("r2")) == ONE_EVALSHA
    assert await counter.count(engine.cancel("d1")) == ONE_EVALSHA
    assert await counter.count(engine.cancel("d1")) == ONE_EVALSHA
    for sku in skus:
        stock = await engine.get_stock(sku)
        assert (stock.available, stock.reserved, stock.sold) == (98, 0, 2)


async def test_unknown_and_closed_orders_in_one_call(engine: StockEngine, counter: Counter) -> None:
    """A confirm or extend of an unknown order is refused by the one call; so is one of
    a TCC tombstone (the release that made it took a second call: the tombstone)."""
    for operation in (engine.confirm("nobody"), engine.extend("nobody", 60)):
        assert await counter.count(operation) == ONE_EVALSHA
        assert isinstance(counter.raised, NotFound)
        assert counter.raised.details == {"order_id": "nobody"}
    assert (await engine.release("gone")).lines == []  # the tombstone
    for operation in (engine.confirm("gone"), engine.extend("gone", 60)):
        assert await counter.count(operation) == ONE_EVALSHA
        assert isinstance(counter.raised, OrderClosed)
        assert counter.raised.details == {"state": "released"}
