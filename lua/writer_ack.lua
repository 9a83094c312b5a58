-- writer_ack.lua: the writer's acknowledgement of one bucket stream, after the
-- transaction that wrote its events to PostgreSQL has committed.
-- KEYS[1] the bucket's event stream
-- ARGV[1] the writer's consumer group
-- ARGV[2] the last entry id now recorded in PostgreSQL (inclusive)
-- ARGV[3] '' or the MINID to trim the stream to (the entry after ARGV[2])
-- Acknowledges every pending entry of the group at or below ARGV[2], a page of
-- 1000 at a time (XPENDING, XACK), so the writer never sends id lists; pending
-- entries above ARGV[2] (read but not written) stay pending. Then trims
-- (XTRIM MINID, exact) when ARGV[3] is set.
-- Returns the number of entries acknowledged. No event.
local acked = 0
while true do
  local pending = redis.call('XPENDING', KEYS[1], ARGV[1], '-', ARGV[2], 1000)
  if #pending == 0 then break end
  local ids = {}
  for i, entry in ipairs(pending) do ids[i] = entry[1] end
  acked = acked + redis.call('XACK', KEYS[1], ARGV[1], unpack(ids))
  if #pending < 1000 then break end
end
if ARGV[3] ~= '' then redis.call('XTRIM', KEYS[1], 'MINID', ARGV[3]) end
return acked
