-- Let go of messages a rate limit holds back: due now, to be read and asked again.
--
-- KEYS[1] - a queue's schedule
-- ARGV[1], ARGV[2], ... - members of it that hold.lua added (token 'p<deliveries>.<start>.<id>')
--
-- For a limit changed or cleared (celery_streams.limits.release): each member
-- still in the schedule is replaced by one due now (score: the server's time)
-- whose token no longer marks it paced, so the consumer that reads it asks the
-- limits again: under a changed limit it is paced anew, without one it starts
-- at once. A member promote.lua moved meanwhile is left alone.
-- Returns how many were let go.
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local n = 0
for i = 1, #ARGV do
    local bucket, _, payload, token = parse_member(ARGV[i])
    if bucket and redis.call('ZREM', KEYS[1], ARGV[i]) == 1 then
        redis.call('ZADD', KEYS[1], now, schedule_member(bucket, 'r' .. string.sub(token, 2), payload))
        n = n + 1
    end
end
return n
