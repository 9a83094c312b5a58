-- deduct.lua: buy now, reserve and confirm in one step (none -> CONFIRMED).
-- KEYS/ARGV: the line call layout of _lib.lua (ttl_ms unused).
-- Per line: available -= qty, sold += qty. All lines of the call, or none.
-- On a cluster (mode 'b') a single-group deduct runs here after its directory
-- was opened (order.lua open): the bucket's copy of the order decides conflict
-- and replay as in reserve.lua, and new lines are tagged with ARGV[8].
-- Returns OK, REPLAY (every line already CONFIRMED with the same qty),
-- INSUFFICIENT, CONFLICT, TRANSITION, UNAVAILABLE as in reserve.lua.
-- Events: op=deduct, one per new line.
local call = parse_call()
local refused = open_order(call) or open_copy(call)
if refused then return refused end

local function decide(it, line, c)
  if line then
    if line.qty ~= it.qty then return nil, {'CONFLICT', 'deduct'} end
    call.saw_line = true
    if line.state == 'C' then
      return {replay = true, state = 'C', qty = line.qty, exp = line.exp}
    end
    return nil, {'TRANSITION', it.sku, line.state}
  end
  if not call.may_create then return nil, {'TRANSITION', it.sku, 'gone'} end
  local plan = {state = 'C', qty = it.qty, exp = 0, da = -it.qty, ds = it.qty, tag = call.tag}
  if c.a < it.qty then plan.short = true end
  return plan
end

return run_lines(call, 'deduct', decide)
