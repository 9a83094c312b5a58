-- set.lua: set a SKU's available stock (initial load, stock count).
-- KEYS[1] sku hash, KEYS[2] bucket event stream
-- ARGV[1] sku, ARGV[2] available (>= 0), ARGV[3] reason
-- reserved and sold are untouched. Returns {'OK', available, reserved, sold}
-- or {'UNAVAILABLE', sku} when the SKU is fenced, {'LOCATED', sku} when it has locations.
-- Events: op=set with qty = the change of available (may be 0 or negative).
local c = read_sku(KEYS[1])
if c.fenced then return {'UNAVAILABLE', ARGV[1]} end
if c.located then return {'LOCATED', ARGV[1]} end  -- set per location (locations.lua)
local target = tonumber(ARGV[2])
local delta = target - c.a
c.a = target
commit(KEYS[1], KEYS[2], {op = 'set', sku = ARGV[1], qty = delta, reason = ARGV[3]}, c, now_ms())
return {'OK', c.a, c.r, c.s}
