-- hold.lua: first step of a confirm on a cluster, where an order's lines live
-- on several nodes: make sure every line of this bucket group still holds its
-- stock, so that the confirm that follows cannot fail half-way for lack of it.
-- KEYS/ARGV: the line call layout of _lib.lua; ARGV[3] ttl_ms = how long the
-- hold lasts (enough for the confirm to follow), ARGV[8] the attempt's token.
-- Per line: RESERVED expiring within ttl_ms: expiry moved to now + ttl_ms
--             (event op=extend);
--           RESERVED with time left: unchanged;
--           EXPIRED: re-acquired if available >= qty (available -= qty,
--             reserved += qty, RESERVED until now + ttl_ms, tagged 'E'..token
--             so that abort.lua can put it back; event op=reserve);
--           CONFIRMED: left as it is (a replayed confirm).
-- All lines of the group or none. Returns OK, REPLAY (nothing to change),
-- EXPIRED (sku, available), TRANSITION (released/cancelled), NOTFOUND,
-- UNAVAILABLE.
local call = parse_call()

local function decide(it, line, c, now)
  if not line then return nil, {'NOTFOUND', it.sku} end
  local until_ms = now + call.ttl
  if line.state == 'C' then
    return {replay = true, state = 'C', qty = line.qty, exp = line.exp}
  elseif line.state == 'R' then
    if line.exp >= until_ms then
      return {replay = true, state = 'R', qty = line.qty, exp = line.exp}
    end
    return {state = 'R', qty = line.qty, exp = until_ms, tag = line.tag, op = 'extend'}
  elseif line.state == 'E' then
    if c.a < line.qty then return nil, {'EXPIRED', it.sku, c.a} end
    return {state = 'R', qty = line.qty, exp = until_ms, tag = 'E' .. call.tag,
            da = -line.qty, dr = line.qty, op = 'reserve'}
  end
  return nil, {'TRANSITION', it.sku, line.state}
end

return run_lines(call, 'hold', decide)
