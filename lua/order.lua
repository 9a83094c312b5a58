-- order.lua: open an order's record on a cluster, where the record lives on
-- its own node and the lines are reserved group by group afterwards.
-- KEYS[1] the order record hash
-- ARGV[1] items_spec ('sku:qty,...' canonical), ARGV[2] kind ('reserve' or
-- 'deduct'), ARGV[3] record lifetime in ms (ttl + retention), ARGV[4] the
-- attempt's token
-- Returns {'NEW'} after creating it with phase 'pending' and owner = token,
-- {'EXISTS', phase} when the same order is already there; a 'pending' one
-- (an earlier attempt stopped between groups, or is still running) passes to
-- this attempt (owner = token), which may create the missing lines and close
-- it; {'CONFLICT', kind} when the order id holds other items or another kind.
-- No event: the record is routing data, not stock.
local rec = redis.call('HMGET', KEYS[1], 'items', 'kind', 'phase')
if rec[1] then
  if rec[1] ~= ARGV[1] or rec[2] ~= ARGV[2] then return {'CONFLICT', rec[2] or ''} end
  local phase = rec[3] or 'done'
  if phase == 'pending' then redis.call('HSET', KEYS[1], 'owner', ARGV[4]) end
  return {'EXISTS', phase}
end
redis.call('HSET', KEYS[1], 'items', ARGV[1], 'kind', ARGV[2], 'phase', 'pending', 'owner', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {'NEW'}
