-- order.lua: open an order's record on a cluster, where the record lives on
-- its own node and the lines are reserved group by group afterwards.
-- KEYS[1] the order record (a string, see read_record in _lib.lua)
-- ARGV[1] items_spec ('sku:qty,...' canonical), ARGV[2] kind ('reserve' or
-- 'deduct'), ARGV[3] record lifetime in ms (ttl + retention), ARGV[4] the
-- attempt's token
-- Returns {'NEW'} after creating it with phase 'pending' and owner = token,
-- {'EXISTS', phase} when the same order is already there; a 'pending' one
-- (an earlier attempt stopped between groups, or is still running) passes to
-- this attempt (owner = token), which may create the missing lines and close
-- it; {'CONFLICT', kind} when the order id holds other items or another kind.
-- No event: the record is routing data, not stock.
local rec = read_record(KEYS[1])
if rec then
  if rec.spec ~= ARGV[1] or rec.kind ~= ARGV[2] then return {'CONFLICT', rec.kind} end
  if rec.phase == 'pending' then
    redis.call('SET', KEYS[1], record_value(rec.kind, 'pending', ARGV[4], rec.spec), 'KEEPTTL')
  end
  return {'EXISTS', rec.phase}
end
redis.call('SET', KEYS[1], record_value(ARGV[2], 'pending', ARGV[4], ARGV[1]), 'PX', ARGV[3])
return {'NEW'}
