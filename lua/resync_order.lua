-- resync_order.lua: write one order's record for `stock resync`, on the server's clock.
-- KEYS[1] the order record
-- ARGV[1] the record's value 'kind|done||items_spec' (read_record),
-- ARGV[2] the latest expiry of its lines in ms (0 when none), ARGV[3] retention_ms
-- The record is kept for retention after the later of now and that expiry
-- (as the line scripts keep it). A record already there with the same items
-- keeps its kind: PostgreSQL knows a cluster's multi-group deduct by its lines'
-- first event, the hold's 'reserve' (lua/README.md), so only Redis still knows it
-- was a deduct, and a retry of that deduct must replay. Returns {'OK'}. No
-- event: no stock changes.
local now = now_ms()
local value = ARGV[1]
local rec = read_record(KEYS[1])
if rec and rec.phase == 'done' then
  local kind, spec = string.match(value, '^(%a+)|%a+|[^|]*|(.*)$')
  if rec.spec == spec and rec.kind ~= kind then
    value = record_value(rec.kind, 'done', '', spec)
  end
end
redis.call('SET', KEYS[1], value, 'PXAT', math.max(now, tonumber(ARGV[2])) + tonumber(ARGV[3]))
return {'OK'}
