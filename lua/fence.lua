-- fence.lua: take, renew or lift one resync's fences on SKUs of one bucket.
-- KEYS: the SKUs' counters hashes (one bucket, so one slot)
-- ARGV[1] mode 'take', 'renew' or 'lift'; ARGV[2] the resync's token;
-- ARGV[3] ttl_ms (take, renew); ARGV[4..] the SKUs, in KEYS order (for replies)
-- A fence is the hash field fenced = 'token@until_ms' (server time). Until then
-- every script refuses the SKU (UNAVAILABLE) and the reaper passes its lines by;
-- after it, or with any other value, the SKU is not fenced (read_sku).
-- take: every SKU must be unfenced or hold this token's fence; then each gets
--   'token@(now + ttl)'. Else nothing changes: {'BUSY', sku, fence} (the first
--   SKU another resync holds).
-- renew: every SKU must hold this token's live fence; then each gets
--   'token@(now + ttl)'. Else nothing changes: {'LOST', sku}.
-- lift: the fence is removed from each SKU that holds this token's fence, live
--   or run out; another token's fence stays. Returns {'OK', lifted}.
-- Returns {'OK', n}. No event: a fence changes no stock.
local mode, token = ARGV[1], ARGV[2]
local mine = token .. '@'
local fences = {}
for i, key in ipairs(KEYS) do
  fences[i] = redis.call('HGET', key, 'fenced')
end
local function owned(v) return v and string.sub(v, 1, #mine) == mine end

if mode == 'lift' then
  local lifted = 0
  for i, key in ipairs(KEYS) do
    if owned(fences[i]) then
      redis.call('HDEL', key, 'fenced')
      lifted = lifted + 1
    end
  end
  return {'OK', lifted}
end

for i = 1, #KEYS do
  local live = fence_until(fences[i]) > 0
  if mode == 'take' and live and not owned(fences[i]) then
    return {'BUSY', ARGV[3 + i], fences[i]}
  end
  if mode == 'renew' and not (live and owned(fences[i])) then
    return {'LOST', ARGV[3 + i]}
  end
end
local value = mine .. (now_ms() + tonumber(ARGV[3]))
for _, key in ipairs(KEYS) do
  redis.call('HSET', key, 'fenced', value)
end
return {'OK', #KEYS}
