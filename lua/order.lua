-- order.lua: open an order's record on a cluster, where the record lives on
-- its own node and the lines are reserved group by group afterwards.
-- KEYS[1] the order record (a string, see read_record in _lib.lua)
-- ARGV[1] items_spec ('sku:qty,...' canonical), ARGV[2] kind ('reserve' or
-- 'deduct'), ARGV[3] record lifetime in ms (ttl + retention), ARGV[4] the
-- attempt's token, ARGV[5] the attempt's lease in ms
-- One attempt works on an order at a time: the record's owner is
-- 'token@lease_until_ms' (server time).
-- Returns {'NEW'} after creating it with phase 'pending', owned by this
-- attempt; {'EXISTS', 'done'} for a finished order (a replay);
-- {'EXISTS', 'pending'} when an earlier attempt stopped between groups and its
-- lease ran out: this attempt takes the order over and may create the
-- missing lines; {'BUSY'} while another attempt's lease runs (retry shortly);
-- {'CONFLICT', kind} when the order id holds other items or another kind.
-- No event: the record is routing data, not stock.
local now = now_ms()
local owner = ARGV[4] .. '@' .. (now + tonumber(ARGV[5]))
local rec = read_record(KEYS[1])
if rec then
  if rec.spec ~= ARGV[1] or rec.kind ~= ARGV[2] then return {'CONFLICT', rec.kind} end
  if rec.phase == 'pending' then
    local lease = tonumber(string.match(rec.owner, '@(%d+)$')) or 0
    if lease > now then return {'BUSY'} end
    redis.call('SET', KEYS[1], record_value(rec.kind, 'pending', owner, rec.spec), 'KEEPTTL')
  end
  return {'EXISTS', rec.phase}
end
redis.call('SET', KEYS[1], record_value(ARGV[2], 'pending', owner, ARGV[1]), 'PX', ARGV[3])
return {'NEW'}
