-- Move the due entries of a queue's schedule into its streams (delayed delivery).
--
-- KEYS[1] - the queue's schedule (sorted set: score = due time in ms,
--           member = 'bucket|stamp|token|payload', see _library.lua)
-- KEYS[2], KEYS[3], ... - the queue's streams, one per priority bucket, the
--           main stream (bucket 0) first
-- ARGV[1] - the most entries one call moves
-- ARGV[2] - PEXPIRE of a stream written to (the queue's x-expires), ms; 0: none
-- ARGV[3], ARGV[4], ... - the priority bucket of KEYS[2], KEYS[3], ...
--
-- The entries due now by the server's clock (TIME) move in due order: each is
-- appended to the stream of its bucket with the field 'payload', as a publish
-- does (a bucket not among KEYS: the main stream), then removed from the
-- schedule; a stream's expiry is renewed with the first entry a call appends
-- to it. The script runs atomically: however many consumers call it at once,
-- each entry moves exactly once. An entry is removed right after its XADD, so
-- a call that fails midway (a full Redis refusing the first write) leaves
-- every entry either moved or still scheduled, never both.
-- A member that does not parse moves whole, as the payload, into the main
-- stream: the reader dead-letters it there. One a rate limit held back
-- (hold.lua) is appended marked 'paced' with its reserved start.
--
-- The ledger counts nothing: the message was counted 'published' when it was
-- scheduled, and is the same message.
-- Returns {entries moved, due time of the next entry in ms or false when the
-- schedule is empty}.
local limit, expires = tonumber(ARGV[1]), tonumber(ARGV[2])

-- The fields of a due message: a rate limit's held one (token
-- 'p<deliveries>.<start>.<id>', hold.lua) is marked 'paced' with its reserved
-- start, and keeps its delivery count.
local function paced_fields(payload, token)
    local deliveries, start = string.match(token, '^p(%d+)%.(%d+)%.')
    if not deliveries then
        return {'payload', payload}
    end
    if deliveries == '0' then
        return {'payload', payload, 'paced', start}
    end
    return {'payload', payload, 'paced', start, 'deliveries', deliveries}
end
local streams = {}
for i = 3, #ARGV do
    streams[ARGV[i]] = KEYS[i - 1]
end
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)

local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, limit)
local renewed = {}   -- streams whose expiry this call renewed
for _, member in ipairs(due) do
    local bucket, _, payload, token = parse_member(member)
    local stream, fields = KEYS[2], nil
    if bucket then
        stream = streams[bucket] or KEYS[2]
        fields = paced_fields(payload, token)
    else
        fields = {'payload', member}
    end
    append(stream, fields, 0, renewed[stream] and 0 or expires)
    redis.call('ZREM', KEYS[1], member)
    renewed[stream] = true
end

local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if #first == 0 then
    return {#due, false}
end
return {#due, tonumber(first[2])}
