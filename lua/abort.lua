-- abort.lua: undo what a failed cluster attempt did in one bucket group (its
-- other groups were refused): a reserve or deduct as if it never happened, or
-- the re-acquisition of expired lines by hold.lua.
-- KEYS/ARGV: the line call layout of _lib.lua (qty in ARGV is ignored).
-- ARGV[7] kind says what the failed call created: 'reserve' lines are
-- RESERVED (reserved -= qty, available += qty), 'deduct' lines are CONFIRMED
-- (sold -= qty, available += qty). The line is deleted so that a retry of the
-- same order starts afresh. 'hold': lines tagged 'E'..token go back to
-- EXPIRED (reserved -= qty, available += qty; event op=expire).
-- An absent line, or one tagged by another attempt
-- (ARGV[8]) that took the order over, is left alone (a replay).
-- Returns OK, REPLAY, TRANSITION (the line moved on), UNAVAILABLE.
-- Events: op=abort, one per removed line.
local call = parse_call()

local function decide(it, line)
  if call.kind == 'hold' then
    if line and line.state == 'R' and line.tag == 'E' .. call.tag then
      return {state = 'E', qty = line.qty, exp = line.exp, dr = -line.qty, da = line.qty,
              op = 'expire'}
    end
    return {replay = true, state = line and line.state or '-', qty = 0, exp = 0}
  end
  if not line or line.tag ~= call.tag then
    return {replay = true, state = '-', qty = 0, exp = 0}
  end
  local plan = {state = '-', qty = line.qty, exp = line.exp, delete = true, da = line.qty}
  if call.kind == 'reserve' and line.state == 'R' then
    plan.dr = -line.qty
  elseif call.kind == 'deduct' and line.state == 'C' then
    plan.ds = -line.qty
  else
    return nil, {'TRANSITION', it.sku, line.state}
  end
  return plan
end

return run_lines(call, 'abort', decide)
