-- reserve.lua: hold stock for an order's lines (none -> RESERVED).
-- KEYS/ARGV: the line call layout of _lib.lua; ARGV[3] ttl_ms > 0.
-- Per line: available -= qty, reserved += qty; the line is stored with
-- expires_ms = server time + ttl and indexed in the bucket's expiry zset.
-- All lines of the call, or none: any short line refuses the whole call.
-- On a cluster ARGV[8] tags each line with the attempt; a replay re-tags it,
-- so that another, failing attempt of the same order no longer undoes it.
-- Returns OK (new lines), REPLAY (every line already RESERVED with the same
-- qty), INSUFFICIENT (sku, available per short line), CONFLICT (the order
-- holds other items or is a deduction), TRANSITION (a line is past RESERVED),
-- UNAVAILABLE (fenced SKU).
-- Events: op=reserve, one per new line, with exp.
local call = parse_call()
local refused = open_order(call)
if refused then return refused end

local function decide(it, line, c, now)
  if line then
    if line.qty ~= it.qty then return nil, {'CONFLICT', 'reserve'} end
    if line.state == 'R' then
      return {replay = true, state = 'R', qty = line.qty, exp = line.exp, tag = call.tag,
              restamp = call.tag ~= '' and call.tag ~= line.tag}
    end
    return nil, {'TRANSITION', it.sku, line.state}
  end
  if not call.may_create then return nil, {'TRANSITION', it.sku, 'gone'} end
  local plan = {state = 'R', qty = it.qty, exp = now + call.ttl, da = -it.qty, dr = it.qty,
                tag = call.tag}
  if c.a < it.qty then plan.short = true end
  return plan
end

return run_lines(call, 'reserve', decide)
