-- order_close.lua: end a cluster attempt on its order record, if the attempt
-- still owns it (no later attempt of the same order took it over).
-- KEYS[1] the order record hash
-- ARGV[1] the attempt's token, ARGV[2] 'done' (every group went through: the
-- phase becomes 'done') or 'drop' (the attempt was refused and undone: the
-- record is deleted so that a retry starts afresh)
-- Returns 1 when applied, 0 when another attempt owns the record (it will
-- close it) or the record is gone.
-- No event.
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
if ARGV[2] == 'drop' then
  redis.call('DEL', KEYS[1])
else
  redis.call('HSET', KEYS[1], 'phase', 'done')
  redis.call('HDEL', KEYS[1], 'owner')
end
return 1
