-- locations.lua: a SKU's stock per location, its allocation strategy and its
-- transfers (DESIGN §13; layout in _loc.lua).
-- KEYS[1] sku hash, KEYS[2] bucket event stream, KEYS[3] the SKU's locations
-- hash, KEYS[4] the SKU's transfers hash (field transfer_id =
-- 'from|to|qty|state|reason', state T in transit, D received)
-- ARGV[1] sku, ARGV[2] op, then by op:
--   set:        ARGV[3] location, ARGV[4] available (>= 0), ARGV[5] reason
--   adjust:     ARGV[3] location, ARGV[4] delta, ARGV[5] expected available of
--               that location or '', ARGV[6] reason
--   allocation: ARGV[3] strategy, ARGV[4] priority order 'a,b', ARGV[5] split '1'/'0'
--   send:       ARGV[3] transfer_id, ARGV[4] from, ARGV[5] to, ARGV[6] qty, ARGV[7] reason
--   receive:    ARGV[3] transfer_id
-- The SKU's first location also takes the SKU's reserved and sold units (the
-- lines made before it had locations: read_alloc) and its available becomes
-- the location's. Returns set/adjust: {'OK', available, reserved, sold} (the
-- SKU's totals); allocation: {'OK'}; send/receive: {'OK'|'REPLAY', state, from,
-- to, qty}. Refusals: UNAVAILABLE (fenced), STALE (available), INSUFFICIENT
-- (sku, 'n@location'), NOLOCATION (sku, location: allocation or a transfer on
-- a SKU without it), CONFLICT (a transfer_id with other values), NOTFOUND.
-- Events: set/adjust (qty = change of available), allocation (qty 0, reason
-- the strategy), transfer (qty, order = transfer_id: from's available -> in
-- transit), receive (in transit -> to's available); each with field 'loc'.
local sku, op = ARGV[1], ARGV[2]
local c = read_sku(KEYS[1])
if c.fenced then return {'UNAVAILABLE', sku} end
local L = c.located and read_locs(KEYS[3]) or nil
local created = false  -- a new location: the priority list is refreshed (refresh_cands)
local now = now_ms()

local function place(name)  -- a location, created empty (the first one adopts the SKU)
  if not L then
    L = {key = KEYS[3], at = {}, names = {}, order = {}, transit = 0, home = name}
    redis.call('HSET', KEYS[3], 'home', name)
    redis.call('HSET', KEYS[1], 'locs', 1)  -- read_sku: the line scripts look at KEYS[3]
    L.at[name], created = {a = c.a, r = c.r, s = c.s, t = 0}, true
  end
  if not L.at[name] then
    L.at[name], created = {a = 0, r = 0, s = 0, t = 0}, true
  end
  return L.at[name]
end

local function save(name)
  redis.call('HSET', KEYS[3], '@' .. name, at_value(L.at[name]))
end

if op == 'set' or op == 'adjust' then
  local name = ARGV[3]
  local at = place(name)
  local delta = tonumber(ARGV[4])
  if op == 'set' then
    delta = delta - at.a
  else
    if ARGV[5] ~= '' and tonumber(ARGV[5]) ~= at.a then return {'STALE', at.a} end
    if at.a + delta < 0 then return {'INSUFFICIENT', sku, at.a .. '@' .. name} end
  end
  at.a, c.a = at.a + delta, c.a + delta
  save(name)
  if created then refresh_cands(KEYS[3], KEYS[1]) end
  commit(KEYS[1], KEYS[2], {op = op, sku = sku, qty = delta, reason = ARGV[op == 'set' and 5 or 6],
    loc = loc_part(name, delta, at)}, c, now)
  return {'OK', c.a, c.r, c.s}
end

if not L then return {'NOLOCATION', sku, ''} end

if op == 'allocation' then
  redis.call('HSET', KEYS[3], 'strategy', ARGV[3], 'order', ARGV[4], 'split', ARGV[5])
  refresh_cands(KEYS[3], KEYS[1])
  commit(KEYS[1], KEYS[2], {op = 'allocation', sku = sku, qty = 0,
    reason = ARGV[3] .. ';' .. ARGV[4] .. ';' .. ARGV[5]}, c, now)
  return {'OK'}
end

local id = ARGV[3]
local v = redis.call('HGET', KEYS[4], id)
local x
if v then
  local from, to, qty, state = string.match(v, '^([^|]*)|([^|]*)|(%d+)|(%u)|')
  x = {from = from, to = to, qty = tonumber(qty), state = state}
end

if op == 'send' then
  local from, to, qty = ARGV[4], ARGV[5], tonumber(ARGV[6])
  if x then
    if x.from ~= from or x.to ~= to or x.qty ~= qty then return {'CONFLICT', 'transfer'} end
    return {'REPLAY', x.state, x.from, x.to, x.qty}
  end
  local at = L.at[from]
  if not at then return {'NOLOCATION', sku, from} end
  if at.a < qty then return {'INSUFFICIENT', sku, at.a .. '@' .. from} end
  at.a, at.t, c.a, L.transit = at.a - qty, at.t + qty, c.a - qty, L.transit + qty
  save(from)
  redis.call('HSET', KEYS[3], 'transit', L.transit)
  redis.call('HSET', KEYS[4], id, from .. '|' .. to .. '|' .. qty .. '|T|' .. ARGV[7])
  commit(KEYS[1], KEYS[2], {op = 'transfer', sku = sku, order = id, qty = qty, reason = ARGV[7],
    loc = loc_part(from, -qty, at) .. ',' .. to .. ':' .. qty}, c, now)  -- to: where it goes
  return {'OK', 'T', from, to, qty}
end

if op == 'receive' then
  if not x then return {'NOTFOUND', id} end
  if x.state == 'D' then return {'REPLAY', 'D', x.from, x.to, x.qty} end
  local src, dst = place(x.from), place(x.to)
  src.t, dst.a, c.a, L.transit = src.t - x.qty, dst.a + x.qty, c.a + x.qty, L.transit - x.qty
  save(x.from)
  save(x.to)
  if created then refresh_cands(KEYS[3], KEYS[1]) end
  redis.call('HSET', KEYS[3], 'transit', L.transit)
  redis.call('HSET', KEYS[4], id, (string.gsub(v, '|T|', '|D|', 1)))
  commit(KEYS[1], KEYS[2], {op = 'receive', sku = sku, order = id, qty = x.qty,
    loc = loc_part(x.to, x.qty, dst) .. ',' .. loc_part(x.from, 0, src)}, c, now)
  return {'OK', 'D', x.from, x.to, x.qty}
end
return {'UNKNOWN_OP', op}
