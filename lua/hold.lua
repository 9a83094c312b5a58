-- hold.lua: first step of a confirm, release or extend on a cluster, where an
-- order's lines live on several nodes: make sure every line of this bucket
-- group still holds its stock and will until the step that follows, so that
-- it cannot fail half-way (for lack of stock, or because the reaper expired
-- some lines in between).
-- KEYS/ARGV: the line call layout of _lib.lua, mode '0'; ARGV[3] ttl_ms = how
-- long the hold lasts (enough for the step to follow), ARGV[7] hold_for: the
-- step this hold prepares ('confirm', 'release' or 'extend'; in other line
-- calls the slot of the order's kind), ARGV[8] the hold's token.
-- Per line: RESERVED expiring within ttl_ms: expiry moved to now + ttl_ms,
--             tagged 'H'..token..':'..previous expiry so that abort.lua can
--             put the expiry back when another group refuses (event op=extend);
--           RESERVED with time left: unchanged;
--           EXPIRED, for a confirm: re-acquired if available >= qty (available -= qty,
--             reserved += qty, RESERVED until now + ttl_ms, tagged 'E'..token
--             so that abort.lua can put it back; event op=reserve);
--           CONFIRMED before a confirm, RELEASED before a release: left as
--             it is (a replay).
-- All lines of the group or none. Returns OK, REPLAY (nothing to change),
-- EXPIRED (sku, available for each short line), TRANSITION (released/cancelled), NOTFOUND,
-- UNAVAILABLE.
local call = parse_call()
local hold_for = call.kind  -- ARGV[7]: the step this hold prepares, not an order kind
call.kind = nil

local function decide(it, line, c, now)
  if not line then return nil, {'NOTFOUND', it.sku} end
  local until_ms = now + call.ttl
  if (line.state == 'C' and hold_for == 'confirm') or (line.state == 'X' and hold_for == 'release')
      or (line.state == 'E' and hold_for == 'release') then  -- release closes it (no hold)
    return {replay = true, state = line.state, qty = line.qty, exp = line.exp}
  elseif line.state == 'R' then
    if line.exp >= until_ms then
      return {replay = true, state = 'R', qty = line.qty, exp = line.exp}
    end
    return {state = 'R', qty = line.qty, exp = until_ms, tag = 'H' .. call.tag .. ':' .. line.exp,
            op = 'extend'}
  elseif line.state == 'E' and hold_for == 'confirm' then
    local short = c.a < line.qty  -- named with every other short SKU (below)
    return {state = 'R', qty = line.qty, exp = until_ms, tag = 'E' .. call.tag,
            da = -line.qty, dr = line.qty, op = 'reserve', short = short}
  end
  return nil, {'TRANSITION', it.sku, line.state}
end

-- run_lines refuses the call when any plan is short, naming each short SKU and its
-- available: here that is a late confirm that cannot re-acquire its stock.
local reply = run_lines(call, 'hold', decide)
if reply[1] == 'INSUFFICIENT' then reply[1] = 'EXPIRED' end
return reply
