-- reserve.lua: hold stock for an order's lines (none -> RESERVED).
-- KEYS/ARGV: the line call layout of _lib.lua; ARGV[3] ttl_ms > 0.
-- Per line: available -= qty, reserved += qty; the line is stored with
-- expires_ms = server time + ttl and indexed in the bucket's expiry zset.
-- All lines of the call, or none: any short line refuses the whole call.
-- On a cluster (mode 'b') the bucket's copy of the order decides conflict and
-- replay (open_copy), and ARGV[8] (the attempt's token) joins each line's tag
-- set (add_tag), new or replayed, so that another, failing attempt of the same
-- order never undoes a line this one holds. With ARGV[7] kind 'deduct' this is the first step of a cluster
-- deduct: the lines are held (RESERVED, ttl = the hold; a hold of an earlier
-- attempt is joined and held anew, event op=extend), a hold that ran out before the
-- settle (EXPIRED: a committed deduct's retry) is re-acquired if the stock allows
-- (event op=reserve; else INSUFFICIENT), and a line already CONFIRMED by this
-- deduct is a replay.
-- Returns OK (new lines), REPLAY (every line already RESERVED, or CONFIRMED
-- for a deduct, with the same qty), INSUFFICIENT (sku, available per short
-- line), CONFLICT (the order holds other items or is of the other kind),
-- TRANSITION (a line is past RESERVED), UNAVAILABLE (fenced SKU).
-- Events: op=reserve, one per new line, with exp.
local call = parse_call()
local refused = open_order(call) or open_copy(call)
if refused then return refused end
local done_state = call.kind == 'deduct' and 'C' or 'R'
-- a cluster deduct's holds say so in their events' reason: PostgreSQL then knows the
-- line's order kind (the writer reads it; stock resync restores the order as a deduct)
if call.kind == 'deduct' and call.copy_key then call.reason = DEDUCT_HOLD end

local function decide(it, line, c, now)
  if line then
    if line.qty ~= it.qty then return nil, {'CONFLICT', call.kind} end
    call.saw_line = true
    local tags = line.tag
    if (line.state == 'R' or line.state == 'E') and call.tag ~= '' and call.copy == 'same' then
      tags = add_tag(line.tag, call.tag)
    end
    if line.state == 'R' and call.kind == 'deduct' and call.copy == 'same' then
      -- a deduct's hold joined by a retry: held anew for the retry's settle
      return {state = 'R', qty = line.qty, exp = math.max(line.exp, now + call.ttl),
              tag = tags, op = 'extend'}
    elseif line.state == 'E' and call.kind == 'deduct' and call.copy == 'same' then
      -- a committed deduct's hold that ran out before its settle: re-acquired if the
      -- stock allows (else the retry is refused short and undoes the order)
      return {state = 'R', qty = line.qty, exp = now + call.ttl, tag = tags, op = 'reserve',
              da = -line.qty, dr = line.qty, short = c.a < line.qty}
    elseif line.state == 'R' or line.state == done_state then
      return {replay = true, state = line.state, qty = line.qty, exp = line.exp, tag = tags,
              restamp = tags ~= line.tag}
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
