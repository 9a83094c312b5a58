-- _lib.lua: helpers shared by the scripts. scripts.py prepends this file
-- to every script before it is loaded, so each script stays one EVALSHA.
--
-- The value formats (the line, the order record, the bucket's copy of an
-- order, the items spec) and the state codes mirror stock/core/formats.py, the one
-- place in Python that knows them: keep the two in step (read_line/line_value,
-- read_record/record_value, read_copy/copy_value, read_spec;
-- tests/test_formats.py runs a round trip through a real script).
--
-- Line call layout (reserve, deduct, hold, confirm, release, abort, cancel, extend):
--   ARGV[1] mode        '1' when KEYS[1] is the order record (standalone:
--                       every key on one server); 'r' when KEYS[1] is the
--                       order record and the lines come from it (standalone
--                       confirm, release, extend, cancel: see open_record);
--                       'b' when KEYS[1] is the bucket's copy of the order
--                       (cluster: kind|items, see open_copy); '0' when no
--                       order key comes first
--   ARGV[2] order_id
--   ARGV[3] ttl_ms      reservation lifetime (reserve, extend); else 0
--   ARGV[4] retention_ms how long a terminal line is kept for replays
--   ARGV[5] may_create  '1' when new lines may be created (reserve/deduct)
--   ARGV[6] items_spec  canonical 'sku:qty,...' of the whole order
--   ARGV[7] one slot, three meanings, by script (a LineCall's purpose in
--           stock/redis/line_layout.py names each): the order's kind, 'reserve'
--           or 'deduct' (reserve, deduct, confirm, release, extend, cancel, and
--           abort of an attempt: call.kind; OfKind); the step a hold prepares,
--           'confirm', 'release' or 'extend' (hold.lua: hold_for; HoldFor);
--           'hold', the undo of a hold's changes (abort.lua: undo_holds; UndoHolds)
--   ARGV[8] tag         the calling attempt's token on a cluster ('' standalone)
--   ARGV[9] reason      free text for the events' reason field ('' for none)
--   ARGV[10] customer   the buyer (reserve/deduct; '' for none): per-customer limits
--   ARGV[11..] sku, qty pairs, one per line of this call
--   KEYS (after the optional order key), four per line, same order as ARGV:
--     sku hash, line string, bucket expiry zset, bucket event stream
-- Mode 'r' (standalone only): KEYS = {order record}; ARGV[6] and ARGV[7] are
--   '' (the record's items and kind count), ARGV[11] the number of buckets,
--   ARGV[12] the key prefix ('stock'); no pairs. The script reads the record and
--   builds each line's four keys as stock/core/keys.py does (line_item): keys a
--   script does not declare, which only a standalone server allows.
--
-- A line is a string 'state|qty|expires_ms', 'state|qty|expires_ms|tag' or
-- 'state|qty|expires_ms|tag|customer' (tag may be empty; a customer id may
-- hold '|', so it comes last); states (formats.STATE_NAMES): R reserved,
-- C confirmed, X released, E expired, N cancelled; '-' (aborted) is never
-- stored: it names a deleted line in replies and resync.lua. A customer's
-- units of a SKU held or bought (R, C) are counted in the SKU hash's field
-- 'c:<customer>', checked against its field 'limit' when a line is created
-- (per-customer purchase limits).
-- Terminal lines expire after retention. On a cluster, where one order is
-- several calls, the tag is the set of attempts that created or replayed the
-- line (has_tag, add_tag), so that a failed attempt never undoes a line
-- another attempt also holds (abort.lua).
-- Replies (stock/redis/scripts.py turns each into a result or a typed error):
--   {'OK'|'REPLAY', expires_ms, sku, state, qty, expires_ms, allocations, ...}
--   (allocations 'location:qty,...' on a SKU with locations, else '')
--   {'INSUFFICIENT', sku, available, ...}  {'CONFLICT', kind}
--   {'TRANSITION', sku, state}  {'EXPIRED', sku, available}
--   {'UNAVAILABLE', sku}  {'NOTFOUND', sku}  {'CLOSED', state}
--   {'LIMIT', sku, limit, held, ...}  {'CUSTOMER_REQUIRED', sku}
--   mode 'r' also: {'NOORDER'} (no record)  {'CLOSED', state} (a TCC tombstone)

-- A line's states and an order record's phases, by name (formats.py: RESERVED ...
-- ABORTED, DONE, TOMBSTONES; tests/test_formats.py checks that the two agree).
local RESERVED, CONFIRMED, RELEASED, EXPIRED, CANCELLED = 'R', 'C', 'X', 'E', 'N'
local ABORTED = '-'  -- never stored: a deleted line in replies
local DONE = 'done'  -- an order record's phase once its lines are there
local TOMBSTONE_RELEASED, TOMBSTONE_CANCELLED = 'released', 'cancelled'  -- TCC, no items
-- Locations (DESIGN §13): hooks that lua/_loc.lua (loaded right after this
-- file) fills in; run_lines and expire.lua call them for a SKU whose hash says
-- it has locations (read_sku: 'located').
local loc = {}

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- A resync's fence is the field fenced = 'token@until_ms' (fence.lua): it holds
-- until until_ms of server time. Returns until_ms while it holds, else 0 (no
-- fence, one that ran out, or a value of any other form).
local function fence_until(v)
  if not v then return 0 end
  local until_ms = tonumber(string.match(v, '@(%d+)$'))
  if until_ms and until_ms > now_ms() then return until_ms end
  return 0
end

-- 'locs' is set once the SKU has locations (_loc.lua): a plain SKU's scripts then
-- never look for its locations hash.
local function read_sku(key, customer)
  local v
  if customer and customer ~= '' then
    v = redis.call('HMGET', key, 'available', 'reserved', 'sold', 'seq', 'fenced', 'limit',
      'locs', 'c:' .. customer, 'shard', 'lmod')
  else
    v = redis.call('HMGET', key, 'available', 'reserved', 'sold', 'seq', 'fenced', 'limit',
      'locs')
  end
  local fence = fence_until(v[5])
  return {a = tonumber(v[1]) or 0, r = tonumber(v[2]) or 0, s = tonumber(v[3]) or 0,
          seq = tonumber(v[4]) or 0, fenced = fence > 0, fence_until = fence, fence = v[5],
          limit = tonumber(v[6]), located = v[7] ~= false, locs = v[7] or nil, held = tonumber(v[8]) or 0,
          shard = tonumber(v[9]), lmod = tonumber(v[10]) or 0}
end

-- A customer's units of a SKU held or bought: moved by delta, the field
-- dropped at 0 so that a sale's buyers cost nothing once their lines are gone.
local function count_customer(sku_key, customer, delta)
  if customer == '' or delta == 0 then return end
  if redis.call('HINCRBY', sku_key, 'c:' .. customer, delta) <= 0 then
    redis.call('HDEL', sku_key, 'c:' .. customer)
  end
end

local function holds(state)
  return state == RESERVED or state == CONFIRMED
end

-- The line at key as {state, qty, exp, tag, customer} (formats.parse_line), or nil.
local function read_line(key)
  local v = redis.call('GET', key)
  if not v then return nil end
  local state, qty, exp, tag, customer = string.match(v, '^(%u)|(%d+)|(%d+)|?([^|]*)|?(.*)$')
  return {state = state, qty = tonumber(qty), exp = tonumber(exp), tag = tag,
          customer = customer}
end

-- Append a delta event to the bucket stream; c is the table read_sku returned,
-- with the new counters (its seq is advanced here). The event is one stream
-- field 'e': 'op|qty|available|reserved|sold|seq|at|exp|sku|order' (integers
-- in decimal), so it ends with the line's member 'sku|order_id' ('sku|' for a
-- SKU-wide event; an order id may itself contain '|'), plus a field 'reason'
-- only when there is one (set, adjust, resync, a transition's reason) and a
-- field 'customer' only when the line has a buyer (per-customer limits).
-- persist/events.py decodes it (decode); keep the two in step.
-- A field 'loc' (the line's allocations with each location's counters after
-- the change, _loc.lua) only on a SKU with locations, and with it a field 'pin'
-- only when the line's item named a location (so that resync restores the pin).
local function append_event(events_key, op, member, qty, exp, c, at, reason, customer, locs,
                            pin)
  c.seq = c.seq + 1
  local e = string.format('%s|%d|%d|%d|%d|%d|%d|%d|%s', op, qty, c.a, c.r, c.s, c.seq, at,
    exp, member)
  local has_reason, has_customer = reason and reason ~= '', customer and customer ~= ''
  if locs and locs ~= '' then  -- a SKU with locations (DESIGN §13)
    local args = {'XADD', events_key, '*', 'e', e, 'loc', locs}
    if has_reason then args[#args + 1], args[#args + 2] = 'reason', reason end
    if has_customer then args[#args + 1], args[#args + 2] = 'customer', customer end
    if pin and pin ~= '' then args[#args + 1], args[#args + 2] = 'pin', pin end
    redis.call(unpack(args))
  elseif has_reason and has_customer then
    redis.call('XADD', events_key, '*', 'e', e, 'reason', reason, 'customer', customer)
  elseif has_reason then
    redis.call('XADD', events_key, '*', 'e', e, 'reason', reason)
  elseif has_customer then
    redis.call('XADD', events_key, '*', 'e', e, 'customer', customer)
  else
    redis.call('XADD', events_key, '*', 'e', e)
  end
end

local function store_counters(sku_key, c)
  redis.call('HSET', sku_key, 'available', c.a, 'reserved', c.r, 'sold', c.s, 'seq', c.seq)
end

-- Store the SKU's counters and append their delta event, in one step.
-- ev: {op, sku, order (none for a SKU-wide event), qty, exp, reason, customer, loc}.
local function commit(sku_key, events_key, ev, c, at)
  append_event(events_key, ev.op, ev.sku .. '|' .. (ev.order or ''), ev.qty, ev.exp or 0, c, at,
    ev.reason, ev.customer, ev.loc, ev.pin)
  store_counters(sku_key, c)
  return c.seq
end

-- A SKU's bucket, crc32(sku) % buckets, as keys.bucket_of computes it (zlib's
-- CRC-32 of the SKU's bytes; tests/test_scripts.py compares the two). Half a
-- byte at a time with a table of 16 constants: two lookups per byte.
local CRC_NIBBLES = {
  0x00000000, 0x1DB71064, 0x3B6E20C8, 0x26D930AC, 0x76DC4190, 0x6B6B51F4, 0x4DB26158, 0x5005713C,
  0xEDB88320, 0xF00F9344, 0xD6D6A3E8, 0xCB61B38C, 0x9B64C2B0, 0x86D3D2D4, 0xA00AE278, 0xBDBDF21C,
}

local function bucket_of(sku, buckets)
  local band, bxor, rshift = bit.band, bit.bxor, bit.rshift
  local crc = -1  -- 0xFFFFFFFF
  for i = 1, #sku do
    crc = bxor(crc, string.byte(sku, i))
    crc = bxor(rshift(crc, 4), CRC_NIBBLES[band(crc, 15) + 1])
    crc = bxor(rshift(crc, 4), CRC_NIBBLES[band(crc, 15) + 1])
  end
  crc = bit.bnot(crc)  -- a signed 32-bit number: as unsigned
  if crc < 0 then crc = crc + 4294967296 end
  return crc % buckets
end

-- One line's item with its four keys, named as stock/core/keys.py line_keys names them:
-- '<prefix>:{b<bucket>}:sku:<sku>', ':line:<sku>|<order_id>', ':due', ':events'.
local function line_item(prefix, buckets, sku, qty, order_id)
  local tag = prefix .. ':{b' .. string.format('%d', bucket_of(sku, buckets)) .. '}:'
  return {sku = sku, qty = qty, k_sku = tag .. 'sku:' .. sku,
          k_line = tag .. 'line:' .. sku .. '|' .. order_id, k_due = tag .. 'due',
          k_events = tag .. 'events'}
end

local function parse_call()
  local mode = ARGV[1]
  if mode == 'r' then  -- the lines come from the record (open_record)
    return {order_key = KEYS[1], from_record = true, order_id = ARGV[2],
            ttl = tonumber(ARGV[3]), retention = tonumber(ARGV[4]), may_create = false,
            tag = ARGV[8], reason = ARGV[9], customer = ARGV[10] or '',
            buckets = tonumber(ARGV[11]), prefix = ARGV[12], items = {}}
  end
  local call = {
    order_key = mode == '1' and KEYS[1] or nil, copy_key = mode == 'b' and KEYS[1] or nil,
    order_id = ARGV[2], ttl = tonumber(ARGV[3]), retention = tonumber(ARGV[4]),
    may_create = ARGV[5] == '1', spec = ARGV[6], kind = ARGV[7], tag = ARGV[8], reason = ARGV[9],
    customer = ARGV[10] or '',
    items = {},
  }
  local base = mode == '0' and 0 or 1
  for i = 1, (#ARGV - 10) / 2 do
    local k = base + (i - 1) * 4
    -- qty, or 'qty@location' for an item pinned to a location (DESIGN §13)
    local qty, pin = string.match(ARGV[10 + 2 * i], '^(%d+)@?(.*)$')
    call.items[i] = {
      sku = ARGV[9 + 2 * i], qty = tonumber(qty), pin = pin,
      k_sku = KEYS[k + 1], k_line = KEYS[k + 2], k_due = KEYS[k + 3], k_events = KEYS[k + 4],
    }
  end
  return call
end

-- The order record is one string 'kind|phase|owner|items_spec' (a string
-- costs less memory than a hash; formats.order_record, formats.parse_record):
-- kind 'reserve'/'deduct', phase 'done' or a TCC tombstone ('released'/
-- 'cancelled', no items); owner '' or, on a cluster's directory (order.lua),
-- the owner set of a single-group deduct ('token,token').
local function read_record(key)
  local v = redis.call('GET', key)
  if not v then return nil end
  local kind, phase, owner, spec = string.match(v, '^(%a+)|(%a+)|([^|]*)|(.*)$')
  return {kind = kind, phase = phase, owner = owner, spec = spec}
end

local function record_value(kind, phase, owner, spec)
  return kind .. '|' .. phase .. '|' .. owner .. '|' .. spec
end

-- A bucket's copy of a cluster order: 'kind|items_spec' (formats.copy_value).
local function copy_value(kind, spec)
  return kind .. '|' .. spec
end

local function read_copy(v)
  return string.match(v, '^(%a+)|(.*)$')
end

-- The items of an items spec 'sku:qty,...' as {sku, qty} (formats.parse_spec).
local function read_spec(spec)
  local items = {}
  for part in string.gmatch(spec, '[^,]+') do
    local sku, qty = string.match(part, '^(.*):(%d+)$')  -- a SKU may hold ':'
    items[#items + 1] = {sku = sku, qty = tonumber(qty)}
  end
  return items
end

-- Standalone confirm/release/extend/cancel (mode 'r'): the order's kind and
-- items from its record, each line's keys built here (line_item), so that the
-- transition is one script call. No record: NOORDER; a TCC tombstone: CLOSED
-- with its state. Returns an error reply, or nil after filling call.kind,
-- call.spec and call.items.
local function open_record(call)
  local rec = read_record(call.order_key)
  if not rec or not rec.phase then return {'NOORDER'} end
  if rec.phase ~= DONE then return {'CLOSED', rec.phase} end  -- a TCC tombstone
  call.kind, call.spec = rec.kind, rec.spec
  for _, item in ipairs(read_spec(rec.spec)) do
    call.items[#call.items + 1] = line_item(call.prefix, call.buckets, item.sku, item.qty,
      call.order_id)
  end
  return nil
end

-- Standalone reserve/deduct: the order record decides conflict and replay.
-- Returns an error reply, or nil after setting call.new_order/may_create.
local function open_order(call)
  if not call.order_key then return nil end
  local rec = read_record(call.order_key)
  if rec and rec.phase ~= DONE then  -- a TCC tombstone
    return {'CLOSED', rec.phase}
  end
  if rec then
    if rec.spec ~= call.spec or rec.kind ~= call.kind then return {'CONFLICT', rec.kind} end
    call.may_create = false
  else
    call.may_create, call.new_order = true, true
  end
  return nil
end

-- Cluster reserve/deduct: the bucket's copy of the order ('kind|items_spec',
-- written with the order's first lines in this bucket) decides conflict and
-- replay for the group. call.copy: 'same' (the lines are this order's: a
-- replay re-tags them), 'none' (no copy: new lines are created with the copy;
-- an existing line, from an earlier version, replays without a new tag).
local function open_copy(call)
  if not call.copy_key then return nil end
  local v = redis.call('GET', call.copy_key)
  if not v then
    call.copy = 'none'
    return nil
  end
  local kind, spec = read_copy(v)
  if kind ~= call.kind or spec ~= call.spec then return {'CONFLICT', kind} end
  call.copy = 'same'
  return nil
end

-- The copy's lifetime never shrinks: extended to lifetime_ms when shorter.
local function keep_copy(key, lifetime)
  local left = redis.call('PTTL', key)
  if left >= 0 and left < lifetime then redis.call('PEXPIRE', key, lifetime) end
end

-- A cluster line's tag is the set of attempts that created or replayed it,
-- 'token,token,...' (at most TAGS_MAX; a full set takes no more). An undo
-- (abort.lua) takes its own token out and deletes the line only when no token
-- is left: a line that any other attempt touched, one that committed the order
-- among them, stays. A transition that leaves a line RESERVED (extend.lua,
-- hold.lua's undo, resync.lua) only runs on a committed order: it writes the
-- element COMMITTED into the set, which no attempt owns, so no later attempt's
-- undo ever deletes the line (a hold's 'H<token>:<expiry>' element is no
-- attempt's either).
local TAGS_MAX = 8
local UNDO_HOLD = 'undo-hold'  -- the reason of abort.lua's events undoing a hold
local DEDUCT_HOLD = 'deduct-hold'  -- reason of a multi-group deduct's holds (formats.py)
local COMMITTED = '*'

local function has_tag(tags, tag)
  if not tags or tags == '' then return false end
  return string.find(',' .. tags .. ',', ',' .. tag .. ',', 1, true) ~= nil
end

local function add_tag(tags, tag)
  if not tags or tags == '' then return tag end
  if has_tag(tags, tag) then return tags end
  local _, commas = string.gsub(tags, ',', '')
  if commas + 1 >= TAGS_MAX then return tags end
  return tags .. ',' .. tag
end

local function drop_tag(tags, tag)
  local kept = {}
  for t in string.gmatch(tags, '[^,]+') do
    if t ~= tag then kept[#kept + 1] = t end
  end
  return table.concat(kept, ',')
end

-- The string of line p {state, qty, exp, customer} with tag (formats.line_value);
-- qty and exp may be numbers or their decimal text.
local function line_value(p, tag)
  local v = p.state .. '|' .. p.qty .. '|' .. p.exp
  if p.customer and p.customer ~= '' then return v .. '|' .. (tag or '') .. '|' .. p.customer end
  if tag and tag ~= '' then v = v .. '|' .. tag end
  return v
end

-- The per-customer limit of a new line: nil, or an error reply; appends the
-- line's {sku, limit, held} to over when it would pass the limit.
local function check_limit(call, it, c, over)
  if not c.limit then return nil end
  if call.customer == '' then return {'CUSTOMER_REQUIRED', it.sku} end
  -- a sharded SKU (lua/README.md "Sharded SKUs"): a customer's lines live in the
  -- customer's home shard, where their count is; elsewhere: REHOME
  if c.lmod > 0 and c.shard and bucket_of(call.customer, c.lmod) ~= c.shard then
    return {'REHOME', it.sku, bucket_of(call.customer, c.lmod)}
  end
  if c.held + it.qty > c.limit then
    over[#over + 1] = it.sku
    over[#over + 1] = c.limit
    over[#over + 1] = c.held
  end
  return nil
end

-- Plan every line with decide(item, line, counters, now, call), which returns
-- a plan {state, da, dr, ds, exp, tag, op, replay, restamp, delete, short}, or nil
-- and an error reply. Nothing is written unless every line of the call can go
-- ahead. Then apply the plans, one event per changed line (named p.op, else
-- the script's op); a replay with
-- restamp only writes the plan's tag (set) into the line.
local function run_lines(call, op, decide)
  if call.from_record then
    local refused = open_record(call)
    if refused then return refused end
  end
  local now = now_ms()
  local plans, short, over = {}, {}, {}
  for i, it in ipairs(call.items) do
    local c = read_sku(it.k_sku, call.customer)
    if c.fenced then return {'UNAVAILABLE', it.sku} end
    local line = read_line(it.k_line)
    local plan, err = decide(it, line, c, now, call)
    if err then return err end
    if not line and holds(plan.state) and not plan.replay then  -- a new hold or sale
      plan.customer = call.customer
      local refused = check_limit(call, it, c, over)
      if refused then return refused end
    elseif line then
      plan.customer = line.customer
    end
    plan.it, plan.c, plan.line = it, c, line
    local unplaced = loc.plan(call, plan)  -- a SKU with locations: where the units are
    if unplaced then return unplaced end
    if plan.short then
      short[#short + 1] = it.sku
      short[#short + 1] = plan.short_at or c.a  -- 'n@location' for a location's refusal
    end
    plans[i] = plan
  end
  if #short > 0 then
    table.insert(short, 1, 'INSUFFICIENT')
    return short
  end
  if #over > 0 then
    table.insert(over, 1, 'LIMIT')
    return over
  end
  local out, all_replay, latest = {'OK', 0}, true, 0
  for _, p in ipairs(plans) do
    local it, c = p.it, p.c
    local member = it.sku .. '|' .. call.order_id
    if p.replay and p.restamp then
      redis.call('SET', it.k_line, line_value(p, p.tag), 'KEEPTTL')
    elseif not p.replay then
      all_replay = false
      c.a, c.r, c.s = c.a + (p.da or 0), c.r + (p.dr or 0), c.s + (p.ds or 0)
      if p.delete then
        redis.call('DEL', it.k_line)
      elseif p.state == 'R' then
        redis.call('SET', it.k_line, line_value(p, p.tag))
        redis.call('ZADD', it.k_due, p.exp, member)
      else
        redis.call('SET', it.k_line, line_value(p, p.tag), 'PX', call.retention)
      end
      if p.line and p.line.state == 'R' and p.state ~= 'R' then
        redis.call('ZREM', it.k_due, member)
      end
      local was = p.line and holds(p.line.state) and 1 or 0
      local now_holds = (not p.delete and holds(p.state)) and 1 or 0
      count_customer(it.k_sku, p.customer or '', (now_holds - was) * p.qty)
      commit(it.k_sku, it.k_events,
        {op = p.op or op, sku = it.sku, order = call.order_id, qty = p.qty, exp = p.exp,
         reason = call.reason, customer = p.customer, loc = loc.apply(call, p), pin = p.pin},
        c, now)
    end
    if p.exp > latest then latest = p.exp end
    out[#out + 1] = it.sku
    out[#out + 1] = p.state
    out[#out + 1] = p.qty
    out[#out + 1] = p.exp
    out[#out + 1] = p.allocs_text or ''  -- 'location:qty,...' (DESIGN §13)
  end
  out[2] = latest
  if all_replay then out[1] = 'REPLAY' end
  if call.copy_key and call.copy ~= 'kept' then
    local lifetime = call.retention + (call.ttl or 0)
    if call.copy == 'none' then
      if not call.saw_line then
        redis.call('SET', call.copy_key, copy_value(call.kind, call.spec), 'PX', lifetime)
      end
    else
      keep_copy(call.copy_key, lifetime)
    end
  end
  if call.order_key then
    local lifetime = call.retention + (call.ttl or 0)
    if call.new_order then
      redis.call('SET', call.order_key, record_value(call.kind, 'done', '', call.spec),
        'PX', lifetime)
    else
      redis.call('PEXPIRE', call.order_key, lifetime)
    end
  end
  return out
end
