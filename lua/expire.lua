-- expire.lua: the reaper's step for one bucket (RESERVED -> EXPIRED).
-- KEYS[1] the bucket's expiry zset, KEYS[2] the bucket's event stream,
-- then per candidate line: KEYS[2+2i-1] sku hash, KEYS[2+2i] line string
-- ARGV[1] retention_ms, ARGV[2] the events' reason ('' for none; payment-aware
-- expiry: payment-unpaid, payment-grace-exhausted), ARGV[3..] per candidate:
-- its zset member 'sku|order_id'
-- (the reaper reads due members with ZRANGE BYSCORE first and builds the keys).
-- A candidate expires only if its line is still RESERVED and its expiry
-- (server time) has passed, so racing reapers expire each line exactly once.
-- A member whose line is gone or no longer RESERVED is dropped from the index.
-- A due line of a fenced SKU waits for the fence: its score moves to the fence's
-- end, at most PASS_BY_MS ahead, so that the reaper's next read of the index gets
-- the lines behind it instead of the same fenced head again (a resync rewrites
-- its SKUs' lines with their own expiry; one killed leaves them due at its end).
-- Per expired line: reserved -= qty, available += qty.
-- Returns {expired_count, dropped_count}.
-- Events: op=expire, one per expired line.
local now = now_ms()
local until_ms = now + tonumber(ARGV[1])  -- terminal lines are kept for retention
local reason = ARGV[2]
local expired, dropped = 0, 0
local PASS_BY_MS = 1000
-- A SKU's counters are read once and stored once per call (a flash sale's
-- due lines are mostly one SKU); each expired line still gets its own event.
local counters, touched = {}, {}
local located = {}  -- a SKU's locations (_loc.lua), read once per call
local leaving, stale = {}, {}  -- members to take out of the index, in one ZREM at the end
for i = 3, #ARGV do
  local member = ARGV[i]
  local k_sku, k_line = KEYS[1 + 2 * (i - 2)], KEYS[2 + 2 * (i - 2)]
  local line = read_line(k_line)
  if not line or line.state ~= 'R' then
    stale[#stale + 1] = member
  elseif line.exp <= now then
    local c = counters[k_sku]
    if not c then
      c = read_sku(k_sku)
      counters[k_sku] = c
    end
    if not c.fenced then
      local q = line.qty
      c.r, c.a = c.r - q, c.a + q
      -- the tag goes; the customer is kept, so that a late confirm counts it again
      redis.call('SET', k_line, line_value({state = 'E', qty = q, exp = line.exp,
        customer = line.customer}), 'PXAT', until_ms)
      count_customer(k_sku, line.customer, -q)
      leaving[#leaving + 1] = member
      local locs = loc.expire(located, c, k_sku, k_line, q, tonumber(ARGV[1]))  -- where it was
      append_event(KEYS[2], 'expire', member, q, line.exp, c, now, reason, line.customer, locs)
      if not c.dirty then
        c.dirty = true
        touched[#touched + 1] = k_sku
      end
      expired = expired + 1
    else
      redis.call('ZADD', KEYS[1], 'XX', math.min(c.fence_until, now + PASS_BY_MS), member)
    end
  end
end
for _, k_sku in ipairs(touched) do store_counters(k_sku, counters[k_sku]) end

local function zrem_all(members)  -- in chunks: unpack() has a stack limit
  local removed = 0
  for first = 1, #members, 500 do
    removed = removed + redis.call('ZREM', KEYS[1],
      unpack(members, first, math.min(first + 499, #members)))
  end
  return removed
end
zrem_all(leaving)
dropped = zrem_all(stale)
return {expired, dropped}
