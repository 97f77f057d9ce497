-- Hold entries back until their reserved start: out of the stream, into the queue's schedule.
--
-- KEYS[1] - a stream of the queue (the bucket the entries were read from)
-- KEYS[2] - the queue's schedule (sorted set: score = due time in ms)
-- KEYS[3] - optional: the queue's ledger (Keys.ledger); without it nothing is counted
-- ARGV[1] - consumer group
-- ARGV[2] - the priority bucket of KEYS[1]
-- ARGV[3], ARGV[4], ... - pairs: entry id, its reserved start (ms, server clock)
--
-- An entry read by a consumer of the group and over its rate limit
-- (reserve.lua gave it a start ahead) is acked, deleted and scheduled at its
-- start with a paced token ('p<deliveries>.<start>.<entry id>': schedule_member,
-- _library.lua): promote.lua moves it back into the stream marked 'paced' with
-- its start, and the consumer that reads it in time starts it without asking
-- the limits again (celery_streams.limits: one read late is asked again).
-- It holds no worker slot and no memory while it waits, and the entries
-- behind it in the stream are read at once.
-- Only an entry still pending in the group moves (one acked or taken over
-- meanwhile stays where it is), in one atomic step: never lost, never twice.
-- Counts 'throttled' in the ledger (a flow counter: the message is still the
-- one published, now scheduled).
-- Returns how many entries were held.
local stream, schedule, ledger, group, bucket = KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2]
local held = 0
for i = 3, #ARGV, 2 do
    local id, start = ARGV[i], ARGV[i + 1]
    local found = redis.call('XRANGE', stream, id, id)[1]
    local payload, deliveries = nil, '0'
    for f = 1, found and #found[2] or 0, 2 do
        if found[2][f] == 'payload' then payload = found[2][f + 1] end
        if found[2][f] == 'deliveries' then deliveries = found[2][f + 1] end
    end
    if payload and redis.call('XACK', stream, group, id) == 1 then
        redis.call('XDEL', stream, id)
        redis.call('ZADD', schedule, start, schedule_member(bucket, 'p' .. deliveries .. '.' .. start .. '.' .. id, payload))
        held = held + 1
    end
end
if held > 0 and ledger then redis.pcall('HINCRBY', ledger, 'throttled', held) end
return held
