"""NOSCRIPT recovery, AOF restart, and the event stream's exact contents."""

from __future__ import annotations

import random
import string
from pathlib import Path
from typing import Any

import pytest
import redis as redis_sync

from persist.events import named
from stock.core import keys
from stock.core.config import Settings
from stock.core.errors import (
    InsufficientStock,
    InvalidTransition,
    OrderConflict,
    StockError,
    Unavailable,
)
from stock.orders.engine import StockEngine
from stock.redis.client import connect
from stock.redis.scripts import load_sources, raise_for
from tests.conftest import BUCKETS
from tests.servers import ServerProcess, script_sha


async def test_noscript_recovery_after_script_flush(engine: StockEngine) -> None:
    await engine.set_stock("A", 5)
    await engine.reserve("o1", [{"sku": "A", "qty": 1}])
    await engine.redis.script_flush()  # a cluster client sends it to every node
    sha = script_sha("confirm")
    assert await engine.redis.script_exists(sha) == [False]
    assert (await engine.confirm("o1")).status == "confirmed"
    assert (await engine.reserve("o2", [{"sku": "A", "qty": 1}])).status == "reserved"
    stock = await engine.get_stock("A")
    assert (stock.available, stock.reserved, stock.sold) == (3, 1, 1)


# line_item of lua/_lib.lua for each SKU: its bucket (bucket_of) and its four keys
LINE_ITEMS = """
local out = {}
for i = 3, #ARGV do
  local it = line_item(ARGV[2], tonumber(ARGV[1]), ARGV[i], 1, 'o|1')
  out[#out + 1] = {bucket_of(ARGV[i], tonumber(ARGV[1])), it.k_sku, it.k_line, it.k_due,
    it.k_events}
end
return out
"""


def some_skus() -> list[str]:
    """Valid SKUs of every length, and strings no SKU may be (non-ASCII, empty) that
    the CRC must still agree on."""
    rng = random.Random(12)
    alphabet = string.ascii_letters + string.digits + "._:-"
    valid = ["".join(rng.choices(alphabet, k=rng.randint(1, 64))) for _ in range(1500)]
    odd = ["", "é", "ß-SKU", "日本語", "emoji-\U0001f600", "\x00\x7f", "a" * 1000]
    odd += [
        "".join(chr(rng.randint(0x80, 0x2FFF)) for _ in range(rng.randint(1, 20)))
        for _ in range(200)
    ]
    return valid + odd + [f"S{i:02d}" for i in range(100)]


@pytest.mark.parametrize("buckets", [1, 2, 3, 7, 16, 64, 1000, 16_384])
def test_lua_buckets_and_keys_agree_with_keys_py(
    standalone_server: ServerProcess, buckets: int
) -> None:
    """The standalone transitions build their lines' keys in Lua (mode 'r'): the
    CRC-32 bucket and the four key names are those of stock/core/keys.py, for every SKU."""
    skus = some_skus()
    lib = load_sources()["confirm"].partition("-- confirm.lua")[0]
    client = redis_sync.Redis(port=standalone_server.port, decode_responses=True)
    try:
        reply = client.eval(lib + LINE_ITEMS, 0, buckets, keys.PREFIX, *skus)
    finally:
        client.close()
    expected = [
        [keys.bucket_of(sku, buckets), *keys.line_keys(sku, "o|1", buckets)] for sku in skus
    ]
    assert reply == expected


@pytest.mark.faults
async def test_aof_restart_keeps_counters_and_lines(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "aof", None, "--appendonly", "yes", "--appendfsync", "always")
    server.start()
    settings = Settings(redis_url=server.url, buckets=BUCKETS)
    client = connect(settings)
    try:
        engine = StockEngine(client, settings)
        await engine.set_stock("A", 10)
        await engine.reserve("held", [{"sku": "A", "qty": 2}], ttl_s=600)
        await engine.deduct("sold", [{"sku": "A", "qty": 3}])
        await client.aclose()
        server.kill()  # a crash: no shutdown, only what the AOF holds
        server.start()
        client = connect(settings)
        engine = StockEngine(client, settings)
        stock = await engine.get_stock("A")
        assert (stock.available, stock.reserved, stock.sold) == (5, 2, 3)
        assert (await engine.reserve("held", [{"sku": "A", "qty": 2}], ttl_s=600)).replay
        assert (await engine.confirm("held")).status == "confirmed"
        stock = await engine.get_stock("A")
        assert (stock.available, stock.reserved, stock.sold) == (5, 0, 5)
    finally:
        await client.aclose()
        server.stop()


async def all_events(client: Any) -> list[dict[str, str]]:
    events = []
    for key in keys.all_events_keys(BUCKETS):
        events += [named(fields) for _id, fields in await client.xrange(key)]
    return sorted(events, key=lambda e: (e["sku"], int(e["seq"])))


async def test_stream_has_one_event_per_change(engine: StockEngine) -> None:
    await engine.set_stock("A", 10)
    await engine.set_stock("B", 4)
    await engine.reserve("o1", [{"sku": "A", "qty": 2}, {"sku": "B", "qty": 1}])
    await engine.reserve("o1", [{"sku": "A", "qty": 2}, {"sku": "B", "qty": 1}])  # replay
    with pytest.raises(OrderConflict):
        await engine.reserve("o1", [{"sku": "A", "qty": 3}])
    with pytest.raises(InsufficientStock):
        await engine.reserve("o2", [{"sku": "A", "qty": 1}, {"sku": "B", "qty": 9}])
    await engine.confirm("o1")
    await engine.confirm("o1")  # replay
    with pytest.raises(InvalidTransition):
        await engine.release("o1")
    await engine.deduct("d1", [{"sku": "A", "qty": 1}])
    await engine.cancel("d1")
    await engine.adjust("A", -2, reason="damaged")
    events = await all_events(engine.redis)
    # On a cluster the refused o2 reserved A on its own node before B's node
    # said no; the compensation undoes it, and both changes are in the stream.
    compensated = [
        ("A", "reserve", "o2", 1, (7, 3, 0)),
        ("A", "abort", "o2", 1, (8, 2, 0)),
    ]
    expected = [
        ("A", "set", "", 10, (10, 0, 0)),
        ("A", "reserve", "o1", 2, (8, 2, 0)),
        *(compensated if engine.cluster else []),
        ("A", "confirm", "o1", 2, (8, 0, 2)),
        ("A", "deduct", "d1", 1, (7, 0, 3)),
        ("A", "cancel", "d1", 1, (8, 0, 2)),
        ("A", "adjust", "", -2, (6, 0, 2)),
        ("B", "set", "", 4, (4, 0, 0)),
        ("B", "reserve", "o1", 1, (3, 1, 0)),
        ("B", "confirm", "o1", 1, (3, 0, 1)),
    ]
    seen = [
        (
            e["sku"],
            e["op"],
            e["order"],
            int(e["qty"]),
            (int(e["available"]), int(e["reserved"]), int(e["sold"])),
        )
        for e in events
    ]
    assert seen == expected
    a_events = 8 if engine.cluster else 6
    assert [int(e["seq"]) for e in events] == [*range(1, a_events + 1), 1, 2, 3]
    assert events[a_events - 1]["reason"] == "damaged"
    assert all(int(e["at"]) > 1_600_000_000_000 for e in events)
    reserve = events[1]
    assert int(reserve["exp"]) == int(reserve["at"]) + 900_000


@pytest.mark.parametrize(
    "reply", [["NOTFENCED", "A"], ["BUSY"], ["LOST", "A"], ["SOMETHING_NEW", "x", 3]]
)
def test_an_unknown_reply_code_is_a_typed_error(reply: list[Any]) -> None:
    """A code the caller does not expect (another script's, a newer version's) is a
    503 that names it, never a generic 500."""
    with pytest.raises(StockError) as caught:
        raise_for(reply, "o1")
    assert isinstance(caught.value, Unavailable), repr(caught.value)
    assert caught.value.status == 503
    assert repr(reply[0]) in caught.value.message


async def test_a_busy_order_record_is_unavailable(engine: StockEngine) -> None:
    """order.lua's BUSY (a 'pending' record of an earlier version, its lease running)
    reaches the caller as Unavailable, through the real script."""
    lease = "tok@99999999999999"
    await engine.redis.set(keys.order_key("old"), f"reserve|pending|{lease}|A:1")
    with pytest.raises(Unavailable, match="busy"):
        await engine.release("old")


async def test_the_order_lock_script(engine: StockEngine) -> None:
    """lua/lock.lua: one holder at a time; take, keep and drop are idempotent for
    their holder (a call whose reply was lost is resent) and refuse any other."""
    key = keys.order_lock_key("lk-1")

    async def call(mode: str, token: str, ms: int = 10_000) -> int:
        return int(await engine.scripts("lock", [key], [mode, token, ms]))

    assert (await call("take", "a"), await call("take", "a"), await call("take", "b")) == (1, 1, 0)
    assert (await call("keep", "b"), await call("drop", "b")) == (0, 0)
    assert await call("keep", "a", 50_000) == 1
    assert 40_000 < await engine.redis.pttl(key) <= 50_000
    assert (await call("drop", "a"), await call("drop", "a")) == (1, 0)
    assert await engine.redis.exists(key) == 0
    assert await call("take", "b", 100) == 1
    assert 0 < await engine.redis.pttl(key) <= 100
