-- extend.lua: keep a reservation longer (RESERVED -> RESERVED, later expiry).
-- KEYS/ARGV: the line call layout of _lib.lua (on standalone mode 'r': the
-- lines from the order record: NOORDER, CLOSED); ARGV[3] ttl_ms > 0 counts from
-- now (server time), and never shortens: a line that already expires later
-- keeps its expiry (the event says so). A RESERVED line past its expiry that the reaper has
-- not reached still holds its stock and may be extended.
-- Counters unchanged; the expiry index is re-scored.
-- Returns OK, TRANSITION (not RESERVED), NOTFOUND, UNAVAILABLE.
-- A RESERVED line of a deduct answers TRANSITION confirmed (see release.lua).
-- Events: op=extend, one per line, with the new exp.
local call = parse_call()

local function decide(it, line, c, now)
  if not line then return nil, {'NOTFOUND', it.sku} end
  if line.state ~= 'R' then return nil, {'TRANSITION', it.sku, line.state} end
  if call.kind == 'deduct' then return nil, {'TRANSITION', it.sku, 'C'} end  -- (release.lua)
  local exp = now + call.ttl
  if line.exp > exp then exp = line.exp end  -- never shorter than it was
  -- a committed order's line: no attempt's undo deletes it (COMMITTED, _lib.lua)
  return {state = 'R', qty = line.qty, exp = exp, tag = COMMITTED}
end

return run_lines(call, 'extend', decide)
