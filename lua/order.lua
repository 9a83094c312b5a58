-- order.lua: open an order's record on a cluster, where the record lives on
-- its own node and the lines are reserved group by group afterwards.
-- KEYS[1] the order record hash
-- ARGV[1] items_spec ('sku:qty,...' canonical), ARGV[2] kind ('reserve' or
-- 'deduct'), ARGV[3] record lifetime in ms (ttl + retention)
-- Returns {'NEW'} after creating it with phase 'pending', {'EXISTS', phase}
-- when the same order is already there ('pending' means an earlier attempt
-- stopped between groups, so lines may still be created), or
-- {'CONFLICT', kind} when the order id holds other items or another kind.
-- No event: the record is routing data, not stock.
local rec = redis.call('HMGET', KEYS[1], 'items', 'kind', 'phase')
if rec[1] then
  if rec[1] ~= ARGV[1] or rec[2] ~= ARGV[2] then return {'CONFLICT', rec[2] or ''} end
  return {'EXISTS', rec[3] or 'done'}
end
redis.call('HSET', KEYS[1], 'items', ARGV[1], 'kind', ARGV[2], 'phase', 'pending')
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {'NEW'}
