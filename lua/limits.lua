-- limits.lua: a SKU's per-customer purchase limit (DESIGN §9).
-- KEYS[1] the SKU hash, KEYS[2] the bucket event stream.
-- ARGV[1] sku, ARGV[2] the limit (units a customer may hold and buy of this
-- SKU), or '' to remove it.
-- Returns {'OK', limit or ''}, {'NOTFOUND', sku} for a SKU without counters,
-- or {'UNAVAILABLE', sku} while a resync fences it.
-- The customers' counts ('c:<customer>' fields) are kept either way, so a
-- limit set during a sale counts what was bought.
-- Events: op=limit with qty = the new limit (0: none), counters unchanged, so
-- that the limit reaches PostgreSQL (stock_levels.limit_per_customer); none
-- when the limit stays as it was.
local c = read_sku(KEYS[1])
if c.fenced then return {'UNAVAILABLE', ARGV[1]} end
if redis.call('HEXISTS', KEYS[1], 'available') == 0 then return {'NOTFOUND', ARGV[1]} end
local limit = tonumber(ARGV[2])
if limit ~= c.limit then
  if limit then
    redis.call('HSET', KEYS[1], 'limit', limit)
  else
    redis.call('HDEL', KEYS[1], 'limit')
  end
  commit(KEYS[1], KEYS[2], {op = 'limit', sku = ARGV[1], qty = limit or 0}, c, now_ms())
end
return {'OK', limit or ''}
