"""``stock/core/formats.py`` and ``lua/_lib.lua`` agree: each value built on one side is
read back on the other, through a real script on a real server."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from stock.core import formats
from stock.core.config import Settings
from stock.core.formats import Line
from stock.core.validate import Item
from stock.redis.client import connect
from stock.redis.scripts import with_lib
from tests.servers import ServerProcess

# A probe: _lib.lua's readers answer the fields of KEYS[1]'s value; its writers set it.
PROBE = with_lib("""
local what, key = ARGV[1], KEYS[1]
if what == 'read_line' then
  local l = read_line(key)
  return {l.state, l.qty, l.exp, l.tag, l.customer}
elseif what == 'write_line' then
  local p = {state = ARGV[2], qty = tonumber(ARGV[3]), exp = tonumber(ARGV[4]), customer = ARGV[6]}
  redis.call('SET', key, line_value(p, ARGV[5]))
elseif what == 'read_record' then
  local r = read_record(key)
  return {r.kind, r.phase, r.owner, r.spec}
elseif what == 'write_record' then
  redis.call('SET', key, record_value(ARGV[2], ARGV[3], ARGV[4], ARGV[5]))
elseif what == 'read_copy' then
  local kind, spec = read_copy(redis.call('GET', key))
  return {kind, spec}
elseif what == 'write_copy' then
  redis.call('SET', key, copy_value(ARGV[2], ARGV[3]))
elseif what == 'read_spec' then
  local out = {}
  for _, item in ipairs(read_spec(redis.call('GET', key))) do
    out[#out + 1] = item.sku
    out[#out + 1] = item.qty
  end
  return out
end
return {}
""")

EXPIRES = 1_764_668_641_123  # a real expiry in ms: 13 digits, past Lua's %.14g shortcuts
LINES = [
    line
    for code in formats.STORED_STATES
    for line in (
        Line(code, 3, EXPIRES),  # standalone: no tag, no customer
        Line(code, 1, EXPIRES, "a1b2c3,d4e5f6"),  # a cluster line's tag set
        Line(code, 12, 0, "", "cust|with|pipes"),  # an empty tag and a customer id
        Line(code, 2, EXPIRES, "Ha1b2c3:1764668641000", "c-42"),  # both
    )
]
RECORDS = [
    formats.OrderRecord("reserve", "done", "", "A:1"),
    formats.OrderRecord("deduct", "done", "a1b2,c3d4", "A:2,b:c:1"),  # a SKU may hold ':'
    formats.OrderRecord("reserve", "cancelled", "", ""),  # a TCC tombstone
    formats.OrderRecord("reserve", "pending", "tok@1764668641000", "A:1"),
]


@pytest.fixture
async def probe(standalone_server: ServerProcess) -> AsyncIterator[Any]:
    client = connect(Settings(redis_url=standalone_server.url))
    script = client.register_script(PROBE)

    async def call(*args: Any) -> list[Any]:
        return list(await script(keys=["formats:probe"], args=list(args)))

    yield call
    await client.delete("formats:probe")
    await client.aclose()


@pytest.fixture
async def redis_get(standalone_server: ServerProcess) -> AsyncIterator[Any]:
    client = connect(Settings(redis_url=standalone_server.url))
    yield client
    await client.aclose()


@pytest.mark.parametrize("line", LINES, ids=str)
async def test_a_line_python_builds_lua_reads(probe: Any, redis_get: Any, line: Line) -> None:
    await redis_get.set("formats:probe", formats.line_value(line))
    state, qty, exp, tag, customer = await probe("read_line")
    assert Line(state, qty, exp, tag, customer) == line


@pytest.mark.parametrize("line", LINES, ids=str)
async def test_a_line_lua_builds_python_reads(probe: Any, redis_get: Any, line: Line) -> None:
    await probe("write_line", line.state, line.qty, line.expires_ms, line.tag, line.customer)
    raw = await redis_get.get("formats:probe")
    assert formats.parse_line(raw) == line
    assert raw == formats.line_value(line)  # one spelling: no trailing '|' either side
    assert formats.state_name(formats.parse_line(raw).state) == formats.STATE_NAMES[line.state]


@pytest.mark.parametrize("record", RECORDS, ids=str)
async def test_an_order_record_both_ways(
    probe: Any, redis_get: Any, record: formats.OrderRecord
) -> None:
    value = formats.order_record(record.kind, record.spec, record.phase, record.owner)
    await redis_get.set("formats:probe", value)
    assert formats.OrderRecord(*await probe("read_record")) == record
    await redis_get.delete("formats:probe")
    await probe("write_record", record.kind, record.phase, record.owner, record.spec)
    raw = await redis_get.get("formats:probe")
    assert raw == value
    assert formats.parse_record(raw) == record


@pytest.mark.parametrize(("kind", "spec"), [("reserve", "A:1"), ("deduct", "a:b:2,Z:10")])
async def test_a_bucket_copy_both_ways(probe: Any, redis_get: Any, kind: str, spec: str) -> None:
    await redis_get.set("formats:probe", formats.copy_value(kind, spec))
    assert await probe("read_copy") == [kind, spec]
    await redis_get.delete("formats:probe")
    await probe("write_copy", kind, spec)
    raw = await redis_get.get("formats:probe")
    assert raw == formats.copy_value(kind, spec)
    assert formats.parse_copy(raw) == (kind, spec)


@pytest.mark.parametrize(
    "items",
    [[Item("A", 1)], [Item("b:c:d", 12), Item("Z", 3)], [Item(f"S{i}", i + 1) for i in range(9)]],
    ids=str,
)
async def test_an_items_spec_python_builds_lua_reads(
    probe: Any, redis_get: Any, items: list[Item]
) -> None:
    await redis_get.set("formats:probe", formats.items_spec(items))
    flat = await probe("read_spec")
    assert [Item(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)] == sorted(items)


def test_the_state_tables_are_one() -> None:
    assert set(formats.STORED_STATES) | {formats.ABORTED} == set(formats.STATE_NAMES)
    assert {formats.STATE_CODES[n] for n in formats.STATE_NAMES.values()} == set(
        formats.STATE_NAMES
    )
    assert set(formats.STATE_AFTER.values()) == set(formats.STATE_NAMES.values())
    assert formats.state_name("gone") == formats.UNKNOWN
