-- Read up to a budget of new entries over several streams, in the order given.
--
-- KEYS    - the streams, in reading order (priority buckets first, queues rotated)
-- ARGV[1] - consumer group
-- ARGV[2] - consumer name
-- ARGV[3] - budget: the most entries returned in all
-- ARGV[4] - '1' to read with NOACK
-- ARGV[5] - one flag per key: '1' for an optional stream (a priority bucket),
--           '0' for a queue's main stream
--
-- One XREADGROUP ... COUNT over many streams takes COUNT from *each*; this
-- takes the budget in order instead, so a high-priority bucket is emptied
-- before a lower one and the prefetch window is never exceeded.
-- Streams are read until the budget is spent, and no further. A priority
-- bucket normally has its stream and group (made when consuming starts); one
-- that is missing (deleted meanwhile) is skipped, and one without the group
-- (a publisher re-created it) gets the group at id 0. A main stream without
-- its group fails the whole read with NOGROUP, which makes the reader heal it.
--
-- Returns {replies}, where replies has the shape of an XREADGROUP reply:
-- {{stream, {{id, {field, value, ...}}, ...}}, ...}.
local group, consumer, left, noack, optional = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5]

local function read(key, count)
    if noack == '1' then
        return redis.pcall('XREADGROUP', 'GROUP', group, consumer, 'COUNT', count, 'NOACK', 'STREAMS', key, '>')
    end
    return redis.pcall('XREADGROUP', 'GROUP', group, consumer, 'COUNT', count, 'STREAMS', key, '>')
end

local replies = {}
for i, key in ipairs(KEYS) do
    if left <= 0 then
        break
    end
    local reply = read(key, left)
    if type(reply) == 'table' and reply.err then
        local is_optional = string.sub(optional, i, i) == '1'
        if not is_optional or string.sub(reply.err, 1, 7) ~= 'NOGROUP' then
            return redis.error_reply(reply.err)
        end
        if redis.call('EXISTS', key) == 1 then
            redis.call('XGROUP', 'CREATE', key, group, '0')
            reply = read(key, left)
            if type(reply) == 'table' and reply.err then
                return redis.error_reply(reply.err)
            end
        else
            reply = false
        end
    end
    if reply then
        left = left - #reply[1][2]
        replies[#replies + 1] = reply[1]
    end
end
return {replies}
