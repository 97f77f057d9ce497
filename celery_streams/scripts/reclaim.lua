-- Hand the pending entries of dead consumers to this one; forget dead consumers.
--
-- KEYS[1] - the queue stream
-- ARGV[1] - consumer group
-- ARGV[2] - this consumer
-- ARGV[3] - visibility timeout, ms: only entries idle that long are taken
-- ARGV[4] - the most entries to take (the reader's prefetch budget)
-- ARGV[5] - liveness key prefix of this queue: a consumer is alive while the
--           key ARGV[5] .. <consumer> exists (its worker renews it)
--
-- A consumer's entries are taken only when its liveness key is gone, so a live
-- worker keeps a message however long it holds it (ETA tasks, long tasks).
-- Entries deleted meanwhile (drained, trimmed) are acked away, never handed on:
-- Redis 6.2 keeps them in the PEL, 7.0+ drops them in XCLAIM.
-- Consumers with nothing pending, no liveness key and idle for the visibility
-- timeout are deleted from the group (never one with pending entries: its
-- entries could no longer be claimed).
--
-- Returns a flat list: id, times delivered (PEL count after the claim), fields...
local key, group, me = KEYS[1], ARGV[1], ARGV[2]
local min_idle, limit, alive = tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]

if redis.call('EXISTS', key) == 0 then
    return {}
end
local ok, pending = pcall(redis.call, 'XPENDING', key, group, 'IDLE', min_idle, '-', '+', limit * 10)
if not ok then
    return {}
end

local living = {}
local function is_alive(consumer)
    if living[consumer] == nil then
        living[consumer] = consumer == me or redis.call('EXISTS', alive .. consumer) == 1
    end
    return living[consumer]
end

local claimed, taken = {}, 0
for _, entry in ipairs(pending) do
    if taken >= limit then break end
    local id, owner, count = entry[1], entry[2], entry[4]
    if not is_alive(owner) then
        local got = redis.call('XCLAIM', key, group, me, min_idle, id)
        if #got > 0 and got[1] and got[1][2] then
            taken = taken + 1
            claimed[#claimed + 1] = id
            claimed[#claimed + 1] = count + 1
            claimed[#claimed + 1] = got[1][2]
        else
            redis.call('XACK', key, group, id)
        end
    end
end

for _, consumer in ipairs(redis.call('XINFO', 'CONSUMERS', key, group)) do
    local name, owned, idle
    for i = 1, #consumer, 2 do
        if consumer[i] == 'name' then name = consumer[i + 1]
        elseif consumer[i] == 'pending' then owned = consumer[i + 1]
        elseif consumer[i] == 'idle' then idle = consumer[i + 1] end
    end
    if owned == 0 and idle >= min_idle and not is_alive(name) then
        redis.call('XGROUP', 'DELCONSUMER', key, group, name)
    end
end
return claimed
