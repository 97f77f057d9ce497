-- Remove a consumer from a stream's group, unless it still owns pending entries.
--
-- KEYS[1] - the stream
-- ARGV[1] - consumer group
-- ARGV[2] - consumer name
--
-- XGROUP DELCONSUMER on a consumer with pending entries would make them
-- unclaimable, so such a consumer stays until reclaim empties it.
-- Returns 1 when the consumer was removed, else 0.
if redis.call('EXISTS', KEYS[1]) == 0 then
    return 0
end
local ok, pending = pcall(redis.call, 'XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2])
if not ok or #pending > 0 then
    return 0
end
redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
return 1
