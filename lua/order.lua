-- order.lua: an order's directory on a cluster (the record that confirm,
-- release, extend, cancel and get_order read to find the order's items from
-- its id). The lines live in their buckets' slots; the directory is written
-- after every bucket group went through (commit), never before.
-- KEYS[1] the directory (a string, see read_record in _lib.lua)
-- ARGV[1] 'commit', 'open', 'drop', 'read' or 'tomb'
-- commit: ARGV[2] kind, ARGV[3] items_spec, ARGV[4] lifetime in ms, ARGV[5]
--   deadline in ms of server time (0 = none). What is there decides first:
--   the same kind and items: {'DONE'} (committed by this or another attempt of
--   the same request: a replay); another kind or items: {'CONFLICT', kind}; a
--   TCC tombstone: {'TOMBSTONE', state}. Nothing there: past the deadline
--   {'LATE'} (the caller stalled: it undoes its groups), else 'kind|done||items'
--   is set for lifetime, {'NEW'}.
-- open (a single-group deduct, before its one atomic script): ARGV[2] kind,
--   ARGV[3] items_spec, ARGV[4] lifetime in ms, ARGV[5] the attempt's token.
--   What is there decides as for commit; the same order: the token joins the
--   record's owner set ('token,token', see add_tag), {'DONE'}; nothing: set
--   'kind|done|token|items', {'NEW'}. So no unit is sold before its directory.
-- drop: ARGV[2] the token: an opened deduct that its script refused leaves
--   the owner set; the record goes when no owner is left (an owner whose
--   script went through, or whose reply was lost, never drops), returns 1.
-- read: ARGV[2] lifetime in ms: the record's lifetime is extended to it when
--   shorter (never shortened); returns {value} or {}.
-- tomb (TCC, standalone and cluster: a release or cancel of an order this key
--   does not know): ARGV[2] 'released' or 'cancelled', ARGV[3] lifetime in ms.
--   A committed order: {'EXISTS'} (the caller runs the transition); a
--   tombstone: {'TOMBSTONE', state}; nothing: 'reserve|<state>||' is set,
--   {'NEW'}, and any later reserve or deduct of the id is refused.
-- No event: the directory is routing data, not stock.
local now = now_ms()
if ARGV[1] == 'read' then
  local v = redis.call('GET', KEYS[1])
  if not v then return {} end
  local left, lifetime = redis.call('PTTL', KEYS[1]), tonumber(ARGV[2])
  if left >= 0 and left < lifetime then redis.call('PEXPIRE', KEYS[1], lifetime) end
  return {v}
end
if ARGV[1] == 'tomb' then
  local rec = read_record(KEYS[1])
  if rec and rec.phase == DONE then return {'EXISTS'} end
  if rec then return {'TOMBSTONE', rec.phase} end
  redis.call('SET', KEYS[1], record_value('reserve', ARGV[2], '', ''), 'PX', ARGV[3])
  return {'NEW'}
end
if ARGV[1] == 'drop' then
  local rec = read_record(KEYS[1])
  if not rec or rec.phase ~= DONE or not has_tag(rec.owner, ARGV[2]) then return 0 end
  local owners = drop_tag(rec.owner, ARGV[2])
  if owners == '' then
    redis.call('DEL', KEYS[1])
  else
    redis.call('SET', KEYS[1], record_value(rec.kind, DONE, owners, rec.spec), 'KEEPTTL')
  end
  return 1
end
local kind, spec, lifetime, deadline = ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5]) or 0
local opening = ARGV[1] == 'open'
local rec = read_record(KEYS[1])
if rec then
  if rec.phase ~= DONE then return {'TOMBSTONE', rec.phase} end
  if rec.kind == kind and rec.spec == spec then
    if opening and rec.owner ~= '' and not has_tag(rec.owner, ARGV[5]) then
      local owners = add_tag(rec.owner, ARGV[5])
      redis.call('SET', KEYS[1], record_value(rec.kind, DONE, owners, rec.spec), 'KEEPTTL')
    end
    return {'DONE'}
  end
  return {'CONFLICT', rec.kind}
end
if opening then
  redis.call('SET', KEYS[1], record_value(kind, DONE, ARGV[5], spec), 'PX', lifetime)
  return {'NEW'}
end
if deadline > 0 and now > deadline then return {'LATE'} end
redis.call('SET', KEYS[1], record_value(kind, DONE, '', spec), 'PX', lifetime)
return {'NEW'}
