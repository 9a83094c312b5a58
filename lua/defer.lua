-- defer.lua: payment-aware expiry (DESIGN §9). Instead of expiring its due
-- lines, the reaper claims them for a payment probe: each due RESERVED line's
-- index entry is pushed to now + ARGV[1] ms, so that no other reaper probes
-- it meanwhile and it comes due again for the next try. The line itself is
-- untouched: it keeps its stock and its own expiry.
-- KEYS[1] the bucket's expiry zset, then one line string key per candidate.
-- ARGV[1], ARGV[2] the shortest and longest deferral (ms), ARGV[3] the grace
-- (ms past the line's expiry: a deferral never goes beyond it), ARGV[4..] the
-- candidates' members 'sku|order_id'.
-- A candidate is claimed only if its line is RESERVED and its index entry is
-- still due (a racing reaper claimed it otherwise); a member whose line is no
-- longer RESERVED is dropped from the index.
-- Returns {now_ms, member, expires_ms, member, expires_ms, ...} of the claimed lines.
-- No event: stock does not change.
local now = now_ms()
local shortest, longest, grace = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local out, stale = {now}, {}
for i = 4, #ARGV do
  local member = ARGV[i]
  local line = read_line(KEYS[i - 2])
  if not line or line.state ~= 'R' then
    stale[#stale + 1] = member
  else
    local due = tonumber(redis.call('ZSCORE', KEYS[1], member))
    if due and due <= now then
      local wait = math.max(shortest, math.min(longest, math.floor((now - line.exp) / 2)))
      redis.call('ZADD', KEYS[1], math.min(now + wait, math.max(now, line.exp + grace)), member)
      out[#out + 1] = member
      out[#out + 1] = line.exp
    end
  end
end
for first = 1, #stale, 500 do
  redis.call('ZREM', KEYS[1], unpack(stale, first, math.min(first + 499, #stale)))
end
return out
