-- limits.lua: a SKU's per-customer purchase limit (DESIGN §9).
-- KEYS[1] the SKU hash. ARGV[1] the limit (units a customer may hold and buy
-- of this SKU), or '' to remove it.
-- Returns {'OK', limit or ''}. The customers' counts ('c:<customer>' fields)
-- are kept either way, so a limit set during a sale counts what was bought.
-- No event: counters do not change.
if ARGV[1] == '' then
  redis.call('HDEL', KEYS[1], 'limit')
else
  redis.call('HSET', KEYS[1], 'limit', ARGV[1])
end
return {'OK', redis.call('HGET', KEYS[1], 'limit') or ''}
