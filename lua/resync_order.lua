-- resync_order.lua: write one order's record for `stock resync`, on the server's clock.
-- KEYS[1] the order record
-- ARGV[1] the record's value 'kind|done||items_spec' (read_record),
-- ARGV[2] the latest expiry of its lines in ms (0 when none), ARGV[3] retention_ms
-- The record is kept for retention after the later of now and that expiry
-- (as the line scripts keep it). Returns {'OK'}. No event: no stock changes.
local now = now_ms()
redis.call('SET', KEYS[1], ARGV[1], 'PXAT', math.max(now, tonumber(ARGV[2])) + tonumber(ARGV[3]))
return {'OK'}
