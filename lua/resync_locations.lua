-- resync_locations.lua: `stock resync` of one SKU's locations (DESIGN §13), after
-- resync.lua rewrote the SKU, under the same live fence.
-- KEYS[1] sku hash, KEYS[2] the SKU's locations hash, KEYS[3] its transfers hash,
-- KEYS[3+i] the allocation record of line i (_loc.lua: alloc_key)
-- ARGV[1] the resync's fence token, ARGV[2] retention_ms, ARGV[3] the allocation
-- 'strategy;order;split' ('' none), ARGV[4] home, ARGV[5] units in transit,
-- ARGV[6] k locations, then five values each: name, available, reserved, sold,
-- in_transit; then m transfers, two values each: transfer_id, its value
-- 'from|to|qty|state|reason'; then per line two values: state, its allocation
-- record ('pin|location:qty,...', _loc.lua; '' drops the record). A RESERVED line's record has no
-- expiry, a terminal one's the retention window.
-- The two hashes become exactly this, and the SKU hash's 'locs' flag says whether
-- there are any (k = 0: the SKU has no locations).
-- Returns {'OK'} or {'NOTFENCED', key} (resync.lua). No event: PostgreSQL is where
-- these values come from.
local c = read_sku(KEYS[1])
local mine = ARGV[1] .. '@'
if not c.fenced or string.sub(c.fence, 1, #mine) ~= mine then
  return {'NOTFENCED', KEYS[1]}
end
redis.call('DEL', KEYS[2], KEYS[3])
local k = tonumber(ARGV[6])
if k == 0 then redis.call('HDEL', KEYS[1], 'locs') end
if k > 0 then
  redis.call('HSET', KEYS[1], 'locs', 1)  -- read_sku: the SKU has locations
  local strategy, order, split = string.match(ARGV[3], '^([^;]*);([^;]*);([^;]*)$')
  if strategy then
    redis.call('HSET', KEYS[2], 'strategy', strategy, 'order', order, 'split', split)
  end
  redis.call('HSET', KEYS[2], 'home', ARGV[4], 'transit', ARGV[5])
end
for i = 0, k - 1 do
  local at = 7 + 5 * i
  redis.call('HSET', KEYS[2], '@' .. ARGV[at],
    ARGV[at + 1] .. ',' .. ARGV[at + 2] .. ',' .. ARGV[at + 3] .. ',' .. ARGV[at + 4])
end
local base = 7 + 5 * k
local m = tonumber(ARGV[base])
for i = 0, m - 1 do
  redis.call('HSET', KEYS[3], ARGV[base + 1 + 2 * i], ARGV[base + 2 + 2 * i])
end
if k > 0 then refresh_cands(KEYS[2], KEYS[1]) end
base = base + 1 + 2 * m
for i = 0, #KEYS - 4 do
  local state, allocs = ARGV[base + 2 * i], ARGV[base + 1 + 2 * i]
  if allocs == '' then
    redis.call('DEL', KEYS[4 + i])
  elseif state == 'R' then
    redis.call('SET', KEYS[4 + i], allocs)
  else
    redis.call('SET', KEYS[4 + i], allocs, 'PX', ARGV[2])
  end
end
return {'OK'}
