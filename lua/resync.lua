-- resync.lua: rewrite one SKU from PostgreSQL (stock resync), while it is fenced.
-- KEYS[1] sku hash, KEYS[2] bucket expiry zset, KEYS[3] bucket event stream,
-- KEYS[3+i] the line string of line i (same order as the ARGV line groups)
-- ARGV[1] sku, ARGV[2] available, ARGV[3] reserved, ARGV[4] sold,
-- ARGV[5] PostgreSQL's seq for the SKU, ARGV[6] retention_ms, ARGV[7] reason,
-- ARGV[8] the resync's fence token,
-- ARGV[9..] per line four values: order_id, state, qty, expires_ms; state
--   R: stored without TTL and indexed in the expiry zset at expires_ms;
--   C/X/E/N: stored as a terminal line for retention_ms, dropped from the zset;
--   '-': the line is deleted and dropped from the zset.
-- The SKU must hold this resync's live fence (fence.lua, taken before it read
-- PostgreSQL, renewed since: so nothing changed the SKU in between): otherwise
-- nothing changes and the reply is {'NOTFENCED', sku}.
-- Counters are set, seq becomes max(seq in Redis, ARGV[5]) + 1, and the SKU
-- stays fenced (the resync lifts its fences when its chunk is done; it writes
-- the order records of these lines before this call).
-- Returns {'OK', seq}.
-- Events: op=resync with the new counters, qty = change of available,
-- reason ARGV[7]; the writer applies it like set (counters only), and its
-- higher seq makes PostgreSQL take it over any older unflushed event.
local c = read_sku(KEYS[1])
local mine = ARGV[8] .. '@'
if not c.fenced or string.sub(c.fence, 1, #mine) ~= mine then
  return {'NOTFENCED', ARGV[1]}
end
local retention = tonumber(ARGV[6])
for i = 0, (#ARGV - 8) / 4 - 1 do
  local order_id, state = ARGV[9 + 4 * i], ARGV[10 + 4 * i]
  local qty, exp = ARGV[11 + 4 * i], ARGV[12 + 4 * i]
  local k_line, member = KEYS[4 + i], ARGV[1] .. '|' .. order_id
  if state == 'R' then
    redis.call('SET', k_line, 'R|' .. qty .. '|' .. exp)
    redis.call('ZADD', KEYS[2], exp, member)
  else
    if state == '-' then
      redis.call('DEL', k_line)
    else
      redis.call('SET', k_line, state .. '|' .. qty .. '|' .. exp, 'PX', retention)
    end
    redis.call('ZREM', KEYS[2], member)
  end
end
local target = {a = tonumber(ARGV[2]), r = tonumber(ARGV[3]), s = tonumber(ARGV[4]),
                seq = math.max(c.seq, tonumber(ARGV[5]))}
local seq = commit(KEYS[1], KEYS[3], {op = 'resync', sku = ARGV[1],
  qty = target.a - c.a, reason = ARGV[7]}, target, now_ms())
return {'OK', seq}
