-- resync.lua: rewrite one SKU from PostgreSQL (stock resync), while it is fenced.
-- KEYS[1] sku hash, KEYS[2] bucket expiry zset, KEYS[3] bucket event stream,
-- KEYS[3+i] the line string of line i (same order as the ARGV line groups)
-- ARGV[1] sku, ARGV[2] available, ARGV[3] reserved, ARGV[4] sold,
-- ARGV[5] PostgreSQL's seq for the SKU, ARGV[6] retention_ms, ARGV[7] reason,
-- ARGV[8] the resync's fence token, ARGV[9] the per-customer limit ('' none),
-- ARGV[10] k, the number of customers, ARGV[11..10+2k] per customer two values:
--   customer, units held or bought (the hash's 'c:<customer>' fields become
--   exactly these),
-- then per line five values: order_id, state, qty, expires_ms, customer ('' none);
--   state R: stored without TTL and indexed in the expiry zset at expires_ms;
--   C/X/E/N: stored as a terminal line for retention_ms, dropped from the zset;
--   '-': the line is deleted and dropped from the zset.
-- The SKU must hold this resync's live fence (fence.lua, taken before it read
-- PostgreSQL, renewed since: so nothing changed the SKU in between): otherwise
-- nothing changes and the reply is {'NOTFENCED', sku}.
-- Counters are set, seq becomes max(seq in Redis, ARGV[5]) + 1, and the SKU
-- stays fenced (the resync lifts its fences when its chunk is done; it writes
-- the order records of these lines before this call).
-- Returns {'OK', seq} (the SKU's seq after the last event).
-- Events: op=resync with the new counters, qty = change of available,
-- reason ARGV[7]; the writer applies it like set (counters only), and its
-- higher seq makes PostgreSQL take it over any older unflushed event. When the
-- limit changes, then op=limit (qty = the limit, 0 for none), as limits.lua.
local c = read_sku(KEYS[1])
local mine = ARGV[8] .. '@'
if not c.fenced or string.sub(c.fence, 1, #mine) ~= mine then
  return {'NOTFENCED', ARGV[1]}
end
local retention = tonumber(ARGV[6])
local buyers = {}  -- every 'c:<customer>' field, dropped below, then set from ARGV
for _, field in ipairs(redis.call('HKEYS', KEYS[1])) do
  if string.sub(field, 1, 2) == 'c:' then buyers[#buyers + 1] = field end
end
for first = 1, #buyers, 500 do  -- in chunks: unpack() has a stack limit
  redis.call('HDEL', KEYS[1], unpack(buyers, first, math.min(first + 499, #buyers)))
end
local k = tonumber(ARGV[10])
for i = 0, k - 1 do
  redis.call('HSET', KEYS[1], 'c:' .. ARGV[11 + 2 * i], ARGV[12 + 2 * i])
end
local base = 10 + 2 * k  -- ARGV[base + 1] is the first line's order_id
for i = 0, (#ARGV - base) / 5 - 1 do
  local at = base + 5 * i
  local order_id, state, qty, exp = ARGV[at + 1], ARGV[at + 2], ARGV[at + 3], ARGV[at + 4]
  local k_line, member = KEYS[4 + i], ARGV[1] .. '|' .. order_id
  -- a RESERVED line restored with its order's record: no attempt's undo deletes it
  local tag = state == 'R' and COMMITTED or nil
  local value = line_value({state = state, qty = qty, exp = exp, customer = ARGV[at + 5]}, tag)
  if state == 'R' then
    redis.call('SET', k_line, value)
    redis.call('ZADD', KEYS[2], exp, member)
  else
    if state == '-' then
      redis.call('DEL', k_line)
    else
      redis.call('SET', k_line, value, 'PX', retention)
    end
    redis.call('ZREM', KEYS[2], member)
  end
end
local target = {a = tonumber(ARGV[2]), r = tonumber(ARGV[3]), s = tonumber(ARGV[4]),
                seq = math.max(c.seq, tonumber(ARGV[5]))}
local now = now_ms()
local seq = commit(KEYS[1], KEYS[3], {op = 'resync', sku = ARGV[1],
  qty = target.a - c.a, reason = ARGV[7]}, target, now)
local limit = tonumber(ARGV[9])
if limit ~= c.limit then
  if limit then
    redis.call('HSET', KEYS[1], 'limit', limit)
  else
    redis.call('HDEL', KEYS[1], 'limit')
  end
  seq = commit(KEYS[1], KEYS[3], {op = 'limit', sku = ARGV[1], qty = limit or 0,
    reason = ARGV[7]}, target, now)
end
return {'OK', seq}
