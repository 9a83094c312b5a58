-- release.lua: give held stock back (RESERVED -> RELEASED).
-- KEYS/ARGV: the line call layout of _lib.lua (qty in ARGV is ignored); on
-- standalone mode 'r' (the lines from the order record: NOORDER, CLOSED).
-- Per line: reserved -= qty, available += qty; the line leaves the expiry index.
-- EXPIRED -> RELEASED closes an expired line (the order was refunded or
-- abandoned; its stock is back already): no counter changes, and a later
-- confirm is refused (TCC, DESIGN §3).
-- Returns OK, REPLAY (all RELEASED already), TRANSITION (confirmed,
-- cancelled), NOTFOUND, UNAVAILABLE.
-- A RESERVED line of a deduct (ARGV[7] the order's kind; a cluster deduct holds its
-- lines before it confirms them) answers TRANSITION confirmed.
-- Events: op=release, one per changed line.
local call = parse_call()

local function decide(it, line)
  if not line then return nil, {'NOTFOUND', it.sku} end
  local plan = {state = 'X', qty = line.qty, exp = line.exp}
  if line.state == 'X' then
    plan.replay = true
  elseif line.state == 'R' and call.kind == 'deduct' then
    return nil, {'TRANSITION', it.sku, 'C'}  -- a cluster deduct's hold: being confirmed
  elseif line.state == 'R' then
    plan.dr, plan.da = -line.qty, line.qty
  elseif line.state ~= 'E' then
    return nil, {'TRANSITION', it.sku, line.state}
  end
  return plan
end

return run_lines(call, 'release', decide)
