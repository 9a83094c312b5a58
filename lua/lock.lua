-- lock.lua: a multi-node transition's lock on its order (stock/cluster_transitions.py).
-- Called like every script, through the per-node batch, which follows an ASK with
-- ASKING in the same write (redis-py's own Lock sent ASKING as a command of its
-- own, on another connection, and during a long slot migration ended in "TTL
-- exhausted"). Each mode is idempotent, so a call whose reply was lost is resent.
-- KEYS[1] the lock, stock:order:{<order_id>}:lock (the order record's slot)
-- ARGV[1] 'take', 'keep' or 'drop'; ARGV[2] the holder's token; ARGV[3] lifetime in
--   ms (take, keep)
-- take: free, or this token's already: set to the token for the lifetime, 1; else 0.
-- keep: this token's: its lifetime set again, 1; else 0 (it ran out, or another
--   holder took it since).
-- drop: this token's: deleted, 1; else 0.
-- No event: the lock is not stock.
local v = redis.call('GET', KEYS[1])
local mine = v == ARGV[2]
if ARGV[1] == 'take' then
  if v and not mine then return 0 end
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
if not mine then return 0 end
if ARGV[1] == 'keep' then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
else
  redis.call('DEL', KEYS[1])
end
return 1
