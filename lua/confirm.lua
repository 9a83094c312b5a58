-- confirm.lua: turn held stock into a sale (RESERVED -> CONFIRMED), or a late
-- payment on an EXPIRED line (EXPIRED -> CONFIRMED while available >= qty).
-- KEYS/ARGV: the line call layout of _lib.lua; on standalone mode 'r' (the
-- lines from the order record: NOORDER, CLOSED). qty in ARGV is ignored: the
-- line's own qty counts). A RESERVED line past its expiry that the reaper has
-- not reached yet still holds its stock, so it confirms normally.
-- Per line: RESERVED: reserved -= qty, sold += qty;
--           EXPIRED: available -= qty, sold += qty.
-- Returns OK, REPLAY (all CONFIRMED already), EXPIRED (sku, available for each
-- line of a late confirm that cannot re-acquire its stock), TRANSITION (released/cancelled),
-- NOTFOUND (no such line), UNAVAILABLE (fenced).
-- Events: op=confirm, one per changed line.
local call = parse_call()

local function decide(it, line, c)
  if not line then return nil, {'NOTFOUND', it.sku} end
  local plan = {state = 'C', qty = line.qty, exp = line.exp}
  if line.state == 'C' then
    plan.replay = true
  elseif line.state == 'R' then
    plan.dr, plan.ds = -line.qty, line.qty
  elseif line.state == 'E' then
    if c.a < line.qty then plan.short = true end  -- named with every other short one
    plan.da, plan.ds = -line.qty, line.qty
  else
    return nil, {'TRANSITION', it.sku, line.state}
  end
  return plan
end

-- run_lines refuses the call when any plan is short, naming each short SKU and its
-- available: here that is a late confirm that cannot re-acquire its stock.
local reply = run_lines(call, 'confirm', decide)
if reply[1] == 'INSUFFICIENT' then reply[1] = 'EXPIRED' end
return reply
