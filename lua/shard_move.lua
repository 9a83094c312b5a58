-- shard_move.lua: a sharded SKU's units moving between two of its shards, and
-- a shard's metadata (lua/README.md "Sharded SKUs"). One call touches one
-- shard (its hash, its bucket's stream, and a key beside them), so a move is
-- three calls, each idempotent by the move id, and a crash between any two
-- leaves the move in flight in the source shard, where recovery finds it.
-- ARGV[1] mode; KEYS[1] the shard's hash, KEYS[2] its bucket's event stream.
-- out  (on the source): KEYS[3] the source's moves hash (move id ->
--   'dest|qty|ms'); ARGV[2] move id, ARGV[3] qty wanted, ARGV[4] destination
--   shard index, ARGV[5] the shard's SKU name. Takes x = min(wanted,
--   available) > 0: available -= x, moving += x, the entry is written.
--   {'OK', x}; {'OK', x} again for a move id already in flight; {'EMPTY',
--   available} when nothing can go; {'UNAVAILABLE', sku} while fenced.
--   Event: adjust, qty -x, reason 'move <id> to <dest>'.
-- in   (on the destination): KEYS[3] the move's marker (a string, kept for
--   ARGV[6] ms); ARGV[2] move id, ARGV[3] x, ARGV[4] source shard index, ARGV[5]
--   the shard's SKU name. No marker: available += x and the marker is set,
--   {'OK', x}; a marker: {'DONE'} (this move was credited already).
--   Event: adjust, qty +x, reason 'move <id> from <source>'.
-- done (on the source, after in): KEYS[3] the moves hash; ARGV[2] move id.
--   The entry goes and moving -= x; {'OK', x}, or {'OK', 0} when it was gone.
-- meta: ARGV[2] the shard's index, ARGV[3] lmod (the customers' home modulus,
--   0 for none), ARGV[4] shards, ARGV[5] span (both '' except on shard 0).
--   Creates the shard's counters when absent (0, 0, 0); {'OK'}. No event.
local mode = ARGV[1]
if mode == 'meta' then
  redis.call('HSETNX', KEYS[1], 'available', 0)
  redis.call('HSETNX', KEYS[1], 'reserved', 0)
  redis.call('HSETNX', KEYS[1], 'sold', 0)
  redis.call('HSET', KEYS[1], 'shard', ARGV[2], 'lmod', ARGV[3])
  if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], 'shards', ARGV[4], 'span', ARGV[5]) end
  return {'OK'}
end
if mode == 'done' then
  local entry = redis.call('HGET', KEYS[3], ARGV[2])
  if not entry then return {'OK', 0} end
  local x = tonumber(string.match(entry, '^%d+|(%d+)|'))
  redis.call('HDEL', KEYS[3], ARGV[2])
  if redis.call('HINCRBY', KEYS[1], 'moving', -x) <= 0 then redis.call('HDEL', KEYS[1], 'moving') end
  return {'OK', x}
end
local c = read_sku(KEYS[1])
if c.fenced then return {'UNAVAILABLE', ARGV[5]} end
local now = now_ms()
if mode == 'out' then
  local entry = redis.call('HGET', KEYS[3], ARGV[2])
  if entry then return {'OK', tonumber(string.match(entry, '^%d+|(%d+)|'))} end
  local x = math.min(tonumber(ARGV[3]), c.a)
  if x <= 0 then return {'EMPTY', c.a} end
  c.a = c.a - x
  redis.call('HINCRBY', KEYS[1], 'moving', x)
  redis.call('HSET', KEYS[3], ARGV[2], ARGV[4] .. '|' .. x .. '|' .. now)
  commit(KEYS[1], KEYS[2], {op = 'adjust', sku = ARGV[5], qty = -x,
    reason = 'move ' .. ARGV[2] .. ' to ' .. ARGV[4]}, c, now)
  return {'OK', x}
end
if mode == 'in' then
  if redis.call('EXISTS', KEYS[3]) == 1 then return {'DONE'} end
  local x = tonumber(ARGV[3])
  c.a = c.a + x
  redis.call('SET', KEYS[3], '1', 'PX', ARGV[6])
  commit(KEYS[1], KEYS[2], {op = 'adjust', sku = ARGV[5], qty = x,
    reason = 'move ' .. ARGV[2] .. ' from ' .. ARGV[4]}, c, now)
  return {'OK', x}
end
return {'BADMODE', mode}
