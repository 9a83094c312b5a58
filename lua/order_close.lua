-- order_close.lua: end a cluster attempt on its order record, if the attempt
-- still owns it (no later attempt of the same order took it over).
-- KEYS[1] the order record (a string, see read_record in _lib.lua)
-- ARGV[1] the attempt's token (the owner is 'token@lease'), ARGV[2] 'done' (every group went through: the
-- phase becomes 'done') or 'drop' (the attempt was refused and undone: the
-- record is deleted so that a retry starts afresh)
-- Returns 1 when applied, 0 when another attempt owns the record (it will
-- close it) or the record is gone.
-- No event.
local rec = read_record(KEYS[1])
if not rec or string.match(rec.owner, '^([^@]*)') ~= ARGV[1] then return 0 end
if ARGV[2] == 'drop' then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], record_value(rec.kind, 'done', '', rec.spec), 'KEEPTTL')
end
return 1
