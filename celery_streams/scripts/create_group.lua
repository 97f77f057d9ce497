-- Create the consumer group of a queue stream, or find it there; after a loss, mark what was there.
--
-- KEYS[1] - the queue stream
-- KEYS[2] - its healed mark (Keys.healed): the last entry id the stream held
--           when a lost group was re-created
-- ARGV[1] - consumer group
-- ARGV[2] - start id: '0' (task queues: nothing published meanwhile is skipped)
--           or '$' (broadcast queues: old broadcasts are not replayed)
-- ARGV[3] - '1' when healing (the group was lost), '0' when a consumer starts
-- ARGV[4] - how long the mark is kept, ms (the visibility timeout)
--
-- A group re-created at '0' hands out again entries that were in flight when
-- it was lost (delivered, not yet acked): no PEL says so any more. The mark
-- lets every reader flag the entries up to it as redelivered.
-- Returns {1 if the group was created else 0, the mark or false}.
local reply = redis.pcall('XGROUP', 'CREATE', KEYS[1], ARGV[1], ARGV[2], 'MKSTREAM')
local created = 0
if type(reply) == 'table' and reply.err then
    if string.sub(reply.err, 1, 9) ~= 'BUSYGROUP' then
        return redis.error_reply(reply.err)
    end
else
    created = 1
    if ARGV[3] == '1' and ARGV[2] == '0' and redis.call('XLEN', KEYS[1]) > 0 then
        local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
        redis.call('SET', KEYS[2], last[1][1], 'PX', ARGV[4])
    end
end
return {created, redis.call('GET', KEYS[2])}
