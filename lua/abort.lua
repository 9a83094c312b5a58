-- abort.lua: undo what a failed cluster attempt did in one bucket group: its
-- reserve or deduct hold as if it never happened, or the holds of a failed
-- multi-node confirm/release/extend (hold.lua).
-- KEYS/ARGV: the line call layout of _lib.lua (qty in ARGV is ignored); mode
-- 'b' for a reserve/deduct (KEYS[1] the bucket's copy of the order).
-- ARGV[7] says what is undone (the slot that other line calls use for the
-- order's kind):
-- the order's kind, 'reserve' or 'deduct' (call.kind): an attempt's lines.
--   This attempt's token (ARGV[8]) leaves each RESERVED line's tag set; a line
--   no other attempt holds is deleted (reserved -= qty, available += qty), so
--   that a retry of the same order starts afresh; the bucket's copy of the
--   order goes with the group's last line. A line held by another attempt too
--   (which may have committed the order), a CONFIRMED line (a settled deduct)
--   and a line without this token are left alone.
-- 'hold' (undo_holds; mode '0'): a hold's changes (hold.lua; ARGV[8] the
--   hold's token). Lines tagged 'E'..token go back to EXPIRED (reserved -= qty,
--   available += qty; event op=expire); lines tagged 'H'..token..':'..expiry
--   get their previous expiry back (event op=extend). Their events carry the
--   reason 'undo-hold' (UNDO_HOLD in _lib.lua, persist/webhooks.py: no second
--   reservation.expired for a line that expired before the hold).
-- Returns OK, REPLAY, TRANSITION (the line moved on), UNAVAILABLE.
-- Events: op=abort, one per removed line.
local call = parse_call()
local undo_holds = call.kind == 'hold'  -- ARGV[7]: else the order's kind
if undo_holds then
  call.kind = nil
  -- the reason UNDO_HOLD marks these events: a line put back to EXPIRED was reported
  -- expired once already (the webhooks offer no second reservation.expired for it)
  call.reason = UNDO_HOLD
end

local function decide(it, line)
  if undo_holds then
    -- (an attempt's token may have joined the hold's element since: a late replay)
    if line and line.state == 'R' and has_tag(line.tag, 'E' .. call.tag) then
      return {state = 'E', qty = line.qty, exp = line.exp, dr = -line.qty, da = line.qty,
              op = 'expire'}
    end
    local before = line and line.state == 'R'
      and string.match(',' .. line.tag .. ',', ',H' .. call.tag .. ':(%d+),')
    if before then  -- a committed order's line: it stays one (COMMITTED)
      return {state = 'R', qty = line.qty, exp = tonumber(before), op = 'extend',
              tag = COMMITTED}
    end
    return {replay = true, state = line and line.state or '-', qty = 0, exp = 0}
  end
  if not line or line.state == 'C' or not has_tag(line.tag, call.tag) then
    return {replay = true, state = '-', qty = 0, exp = 0}
  end
  if line.state ~= 'R' then return nil, {'TRANSITION', it.sku, line.state} end
  local others = drop_tag(line.tag, call.tag)
  if others ~= '' then  -- another attempt holds it too: only this attempt lets go
    return {replay = true, restamp = true, state = 'R', qty = line.qty, exp = line.exp,
            tag = others}
  end
  return {state = '-', qty = line.qty, exp = line.exp, delete = true, da = line.qty,
          dr = -line.qty}
end

call.copy = 'kept'  -- run_lines only extends the copy; it is dropped below
local out = run_lines(call, 'abort', decide)
if call.copy_key and out[1] ~= 'TRANSITION' and out[1] ~= 'UNAVAILABLE' then
  for _, it in ipairs(call.items) do
    if redis.call('EXISTS', it.k_line) == 1 then return out end
  end
  if redis.call('GET', call.copy_key) == copy_value(call.kind, call.spec) then
    redis.call('DEL', call.copy_key)
  end
end
return out
