-- cancel.lua: refund or return of a sale (CONFIRMED -> CANCELLED).
-- KEYS/ARGV: the line call layout of _lib.lua (qty in ARGV is ignored); on
-- standalone mode 'r' (the lines from the order record: NOORDER, CLOSED).
-- Per line: sold -= qty, available += qty.
-- Returns OK, REPLAY (all CANCELLED already), TRANSITION (not confirmed),
-- NOTFOUND, UNAVAILABLE.
-- Events: op=cancel, one per changed line.
local call = parse_call()

local function decide(it, line)
  if not line then return nil, {'NOTFOUND', it.sku} end
  local plan = {state = 'N', qty = line.qty, exp = line.exp}
  if line.state == 'N' then
    plan.replay = true
  elseif line.state == 'C' then
    plan.ds, plan.da = -line.qty, line.qty
  else
    return nil, {'TRANSITION', it.sku, line.state}
  end
  return plan
end

return run_lines(call, 'cancel', decide)
