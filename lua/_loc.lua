-- _loc.lua: locations (DESIGN §13). scripts.py loads it right after _lib.lua,
-- so every script carries it and fills _lib.lua's hooks (loc.plan, loc.apply,
-- loc.expire) for a SKU whose hash has the flag 'locs' (read_sku). Design and
-- key layout: lua/README.md, "Locations".
--
-- A SKU's locations live in one hash beside its counters, in its bucket:
--   <prefix>:{b<n>}:loc:<sku>   fields '@<location>' = 'a,r,s,t' (available,
--     reserved, sold, in transit out of it), 'strategy' ('priority' or
--     'most_available'), 'order' ('berlin,paris': priority order), 'split'
--     ('1': one line may take units from several locations), 'home' (the first
--     location: a line made before the SKU had locations is allocated there),
--     'transit' (units in transit, all origins), 'cands' (the priority order of
--     every location, kept by refresh_cands: a reserve walks it, sorts nothing)
-- and each line's allocations beside the line, with the line's lifetime:
--   <prefix>:{b<n>}:alloc:<sku>|<order_id>   'pin|location:qty,location:qty'
--     (pin: the location the item named, '' for none)
-- The SKU hash keeps the totals (the sums over its locations), so everything
-- that reads only the totals works as before. The two keys are derived from
-- the line's declared keys (same hash tag, so the same slot: a cluster node
-- runs the script on its own keys).

local function key_beside(key, from, to)  -- '<p>:{b3}' .. from .. rest -> .. to .. rest
  local i = string.find(key, '}' .. from, 1, true)
  return string.sub(key, 1, i) .. to .. string.sub(key, i + 1 + #from)
end

local function loc_key(k_sku) return key_beside(k_sku, ':sku:', ':loc:') end
local function alloc_key(k_line) return key_beside(k_line, ':line:', ':alloc:') end

local function parse_at(v)
  local a, r, s, t = string.match(v, '^(-?%d+),(-?%d+),(-?%d+),(-?%d+)$')
  return {a = tonumber(a), r = tonumber(r), s = tonumber(s), t = tonumber(t)}
end

-- read_locs (every location, for locations.lua and most_available): a location's
-- counters are parsed when first used, from L.at[0][name] through a metatable.
local LAZY = {__index = function(at, name)
  local v = at[0][name]
  if not v then return nil end
  local c = parse_at(v)
  rawset(at, name, c)
  return c
end}

-- The line scripts' view (open_locs): nothing read until used; L.at[name] is one
-- HGET of that location (a reserve on a SKU with many locations usually reads one),
-- loc_meta the strategy, split, home and priority list: from the SKU hash's
-- 'locs' field, which read_sku reads anyway ('strategy;split;home;cands', kept by
-- refresh_cands), so a reserve reads no more than the locations it looks at; a
-- 'locs' of '1' (written before that) costs one HMGET of the locations hash.
local FETCH = {__index = function(at, name)
  local v = redis.call('HGET', at[0], '@' .. name)
  if not v then return nil end
  local c = parse_at(v)
  rawset(at, name, c)
  return c
end}

local function open_locs(k, meta)
  return {key = k, at = setmetatable({[0] = k}, FETCH), meta = meta}
end

local function loc_meta(L)
  if L.strategy == nil then
    local strategy, split, home, cands =
      string.match(L.meta or '', '^([^;]*);([^;]*);([^;]*);(.*)$')
    if strategy then
      L.strategy, L.split, L.cands, L.home = strategy, split == '1', cands, home
    else
      local v = redis.call('HMGET', L.key, 'strategy', 'split', 'cands', 'home')
      L.strategy, L.split, L.cands, L.home = v[1] or 'priority', v[2] == '1', v[3] or '', v[4]
    end
  end
  return L
end

local function read_locs(k)
  local raw = redis.call('HGETALL', k)
  if #raw == 0 then return nil end
  local L = {key = k, at = setmetatable({[0] = {}}, LAZY), names = {}, strategy = 'priority',
             order = {}, split = false, transit = 0}
  for i = 1, #raw, 2 do
    local f, v = raw[i], raw[i + 1]
    if string.sub(f, 1, 1) == '@' then
      local name = string.sub(f, 2)
      L.at[0][name] = v
      L.names[#L.names + 1] = name
    elseif f == 'strategy' then L.strategy = v
    elseif f == 'order' then
      for n in string.gmatch(v, '[^,]+') do L.order[#L.order + 1] = n end
    elseif f == 'split' then L.split = v == '1'
    elseif f == 'home' then L.home = v
    elseif f == 'transit' then L.transit = tonumber(v)
    end
  end
  if #L.names == 0 then return nil end
  table.sort(L.names)
  return L
end

local function at_value(at)
  return at.a .. ',' .. at.r .. ',' .. at.s .. ',' .. at.t
end

-- One location's part of an event's 'loc' field: 'name:qty:a:r:s:t'.
local function loc_part(name, qty, at)
  return name .. ':' .. qty .. ':' .. at.a .. ':' .. at.r .. ':' .. at.s .. ':' .. at.t
end

-- The locations in the order the strategy tries them: priority: 'order' first,
-- then the others by name; most_available: most available first, ties by name.
local function candidates(L)
  local out = {}
  if L.strategy == 'most_available' then
    for _, n in ipairs(L.names) do out[#out + 1] = n end
    table.sort(out, function(x, y)
      local ax, ay = L.at[x].a, L.at[y].a
      if ax ~= ay then return ax > ay end
      return x < y
    end)
    return out
  end
  local seen = {}
  for _, n in ipairs(L.order) do
    if L.at[0][n] and not seen[n] then  -- known, not parsed yet
      out[#out + 1], seen[n] = n, true
    end
  end
  for _, n in ipairs(L.names) do
    if not seen[n] then out[#out + 1] = n end
  end
  return out
end

-- Where qty units come from: {{location, qty}, ...}, or nil and what a refusal
-- names: 'n@location' for a pinned item (that location's available), else the
-- most one line can get (split off: the largest location; split on: all).
local function allocate(L, qty, pin)
  if pin ~= '' then
    local at = L.at[pin]
    local a = at and at.a or 0
    if a < qty then return nil, a .. '@' .. pin end
    return {{pin, qty}}
  end
  loc_meta(L)
  local names  -- an iterator over the candidates, in the strategy's order
  if L.strategy == 'most_available' then
    local full = read_locs(L.key)  -- every location (parsed into L.at as used)
    for name, v in pairs(full.at[0]) do
      if rawget(L.at, name) == nil then rawset(L.at, name, parse_at(v)) end
    end
    full.at = L.at
    local list, i = candidates(full), 0
    names = function() i = i + 1; return list[i] end
  else
    names = string.gmatch(L.cands, '[^,]+')  -- priority: precomputed (refresh_cands)
  end
  local best, left, allocs = 0, qty, {}
  for n in names do
    local a = L.at[n].a
    if not L.split then
      if a >= qty then return {{n, qty}} end
      if a > best then best = a end
    elseif a > 0 then
      local take = math.min(a, left)
      allocs[#allocs + 1], left = {n, take}, left - take
      if left == 0 then return allocs end
    end
  end
  if L.split then best = qty - left end
  return nil, best
end

local function allocs_text(allocs)
  local parts = {}
  for _, al in ipairs(allocs) do parts[#parts + 1] = al[1] .. ':' .. al[2] end
  return table.concat(parts, ',')
end

-- The line's allocation record {pin, allocs}; a line made before its SKU had
-- locations: all of it at the SKU's first location.
local function read_alloc(k_line, L, qty)
  local v = redis.call('GET', alloc_key(k_line))
  if not v then return {pin = '', allocs = {{loc_meta(L).home, qty}}} end
  local pin, rest = string.match(v, '^([^|]*)|(.*)$')
  local allocs = {}
  for n, q in string.gmatch(rest, '([^:,]+):(%d+)') do allocs[#allocs + 1] = {n, tonumber(q)} end
  return {pin = pin, allocs = allocs}
end

local function locs_of(call, k_sku, meta)  -- a SKU with locations (its 'locs' field)
  call.locs = call.locs or {}
  local L = call.locs[k_sku]
  if L == nil then
    L = open_locs(loc_key(k_sku), meta)
    call.locs[k_sku] = L
  end
  return L
end

-- The priority list 'cands' of the locations hash k (candidates, priority): kept
-- whenever a location appears or the strategy changes (locations.lua,
-- resync_locations.lua), so that a reserve walks it without sorting anything;
-- with it the SKU hash k_sku's 'locs' = 'strategy;split;home;cands' (loc_meta).
local function refresh_cands(k, k_sku)
  local full = read_locs(k)
  if not full then return end
  local strategy = full.strategy
  full.strategy = 'priority'
  local cands = table.concat(candidates(full), ',')
  redis.call('HSET', k, 'cands', cands)
  full.strategy = strategy
  redis.call('HSET', k_sku, 'locs', strategy .. ';' .. (full.split and '1' or '0') .. ';' ..
    (full.home or '') .. ';' .. cands)
end

local function sign(d, q)
  if not d or d == 0 then return 0 end
  if d > 0 then return q end
  return -q
end

-- Move each allocation's units as the SKU's deltas da, dr, ds move the line's
-- qty; returns the event's 'loc' field.
local function move(L, allocs, da, dr, ds)
  local parts = {}
  for _, al in ipairs(allocs) do
    local n, q = al[1], al[2]
    local at = L.at[n]
    if not at then  -- a location that was never set: it starts empty
      at = {a = 0, r = 0, s = 0, t = 0}
      L.at[n] = at
    end
    at.a, at.r, at.s = at.a + sign(da, q), at.r + sign(dr, q), at.s + sign(ds, q)
    if (da or 0) ~= 0 or (dr or 0) ~= 0 or (ds or 0) ~= 0 then
      redis.call('HSET', L.key, '@' .. n, at_value(at))
    end
    parts[#parts + 1] = loc_part(n, q, at)
  end
  return table.concat(parts, ',')
end

-- run_lines, after decide: a new hold or sale (or a late confirm's re-take)
-- is allocated by the strategy or its pin; any other plan acts on the line's
-- recorded allocations. Returns an error reply, or nil.
function loc.plan(call, p)
  local it = p.it
  local L = p.c.located and locs_of(call, it.k_sku, p.c.locs)
  if not L then
    if it.pin and it.pin ~= '' then return {'NOLOCATION', it.sku, it.pin} end
    return nil
  end
  local rec = p.line and read_alloc(it.k_line, L, p.line.qty)
  local pin = it.pin or ''
  if rec and pin ~= '' and rec.pin ~= pin then return {'CONFLICT', call.kind} end
  if pin == '' and rec then pin = rec.pin end
  local takes = (p.da or 0) < 0 and not p.replay and (not p.line or p.line.state == 'E')
  if takes then
    local allocs, refused = allocate(L, p.qty, pin)
    if not allocs then
      p.short, p.short_at = true, refused
      return nil
    end
    -- two lines of one call never share a SKU: the counters move in loc.apply
    p.allocs, p.pin = allocs, pin
  elseif rec then
    p.allocs, p.pin = rec.allocs, rec.pin
  else
    return nil
  end
  p.allocs_text, p.located = allocs_text(p.allocs), L
  return nil
end

-- run_lines, applying a plan: the locations' counters and the allocation
-- record (kept as long as the line: no expiry while RESERVED, the retention
-- window once terminal, deleted with it). Returns the event's 'loc' field.
function loc.apply(call, p)
  if not p.located then return nil end
  local k = alloc_key(p.it.k_line)
  if p.delete then
    redis.call('DEL', k)
  elseif p.state == 'R' then
    redis.call('SET', k, p.pin .. '|' .. p.allocs_text)
  else
    redis.call('SET', k, p.pin .. '|' .. p.allocs_text, 'PX', call.retention)
  end
  return move(p.located, p.allocs, p.da, p.dr, p.ds)
end

-- expire.lua, per expired line: its units go back where they came from.
-- cache: the script's table of locations per SKU key. Returns the 'loc' field.
function loc.expire(cache, c, k_sku, k_line, qty, retention_ms)
  local L = c.located and locs_of(cache, k_sku, c.locs)
  if not L then return nil end
  local rec = read_alloc(k_line, L, qty)
  local k = alloc_key(k_line)
  if redis.call('EXISTS', k) == 1 then redis.call('PEXPIRE', k, retention_ms) end
  return move(L, rec.allocs, qty, -qty, 0)
end

