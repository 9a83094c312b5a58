-- adjust.lua: add to or take from a SKU's available stock (restock, shrinkage).
-- KEYS[1] sku hash, KEYS[2] bucket event stream
-- ARGV[1] sku, ARGV[2] delta (non-zero integer), ARGV[3] expected available
-- or '' (compare-and-set), ARGV[4] reason
-- Returns {'OK', available, reserved, sold}, {'STALE', available} when the
-- expected value differs, {'INSUFFICIENT', sku, available} when available
-- would go below 0, {'UNAVAILABLE', sku} when fenced.
-- Events: op=adjust with qty = delta and the reason.
local c = read_sku(KEYS[1])
if c.fenced then return {'UNAVAILABLE', ARGV[1]} end
if c.located then return {'LOCATED', ARGV[1]} end  -- adjust per location (locations.lua)
if ARGV[3] ~= '' and tonumber(ARGV[3]) ~= c.a then return {'STALE', c.a} end
local delta = tonumber(ARGV[2])
if c.a + delta < 0 then return {'INSUFFICIENT', ARGV[1], c.a} end
c.a = c.a + delta
commit(KEYS[1], KEYS[2], {op = 'adjust', sku = ARGV[1], qty = delta, reason = ARGV[4]}, c, now_ms())
return {'OK', c.a, c.r, c.s}
