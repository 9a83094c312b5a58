-- abort.lua: undo a reservation as if it never happened (compensation of a
-- multi-bucket reserve whose other group failed on a cluster).
-- KEYS/ARGV: the line call layout of _lib.lua (qty in ARGV is ignored).
-- ARGV[7] kind says what the failed call created: 'reserve' lines are
-- RESERVED (reserved -= qty, available += qty), 'deduct' lines are CONFIRMED
-- (sold -= qty, available += qty). The line is deleted so that a retry of the
-- same order starts afresh. An absent line is a replay.
-- Returns OK, REPLAY, TRANSITION (the line moved on), UNAVAILABLE.
-- Events: op=abort, one per removed line.
local call = parse_call()

local function decide(it, line)
  if not line then return {replay = true, state = '-', qty = 0, exp = 0} end
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
