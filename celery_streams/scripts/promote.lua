-- Move the due entries of a queue's schedule into its streams (delayed delivery).
--
-- KEYS[1] - the queue's schedule (sorted set: score = due time in ms,
--           member = 'bucket|stamp|token|payload', see schedule.lua)
-- KEYS[2], KEYS[3], ... - the queue's streams, one per priority bucket, the
--           main stream (bucket 0) first
-- ARGV[1] - the most entries one call moves
-- ARGV[2] - PEXPIRE of a stream written to (the queue's x-expires), ms; 0: none
-- ARGV[3], ARGV[4], ... - the priority bucket of KEYS[2], KEYS[3], ...
--
-- The entries due now by the server's clock (TIME) move in due order: each is
-- appended to the stream of its bucket with the field 'payload', as a publish
-- does (a bucket not among KEYS: the main stream), then removed from the
-- schedule. The script runs atomically: however many consumers call it at
-- once, each entry moves exactly once. An entry is removed right after its
-- XADD, so a call that fails midway (a full Redis refusing the first write)
-- leaves every entry either moved or still scheduled, never both.
-- A member that does not parse moves whole, as the payload, into the main
-- stream: the reader dead-letters it there.
--
-- Returns {entries moved, due time of the next entry in ms or false when the
-- schedule is empty}.
local limit, expires = tonumber(ARGV[1]), tonumber(ARGV[2])
local streams = {}
for i = 3, #ARGV do
    streams[ARGV[i]] = KEYS[i - 1]
end
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)

local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, limit)
local touched = {}
for _, member in ipairs(due) do
    local bucket, start = string.match(member, '^(%d+)|%d+|[^|]*|()')
    local stream, payload = KEYS[2], member
    if bucket then
        stream = streams[bucket] or KEYS[2]
        payload = string.sub(member, start)
    end
    redis.call('XADD', stream, '*', 'payload', payload)
    redis.call('ZREM', KEYS[1], member)
    touched[stream] = true
end
if expires > 0 then
    for stream in pairs(touched) do
        redis.call('PEXPIRE', stream, expires)
    end
end

local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if #first == 0 then
    return {#due, false}
end
return {#due, tonumber(first[2])}
