-- Hand the pending entries of dead consumers to this one; forget dead consumers.
--
-- KEYS    - the streams to look at, in order (one queue's priority buckets...)
-- ARGV[1] - consumer group
-- ARGV[2] - this consumer
-- ARGV[3] - visibility timeout, ms: only entries idle that long are taken
-- ARGV[4] - the most entries to take in all (the reader's prefetch budget)
-- ARGV[4 + i] - the liveness key prefix of the queue of KEYS[i]: a consumer is
--           alive while the key <prefix><consumer> exists (its worker renews it)
--
-- A consumer's entries are taken only when its liveness key is gone, so a live
-- worker keeps a message however long it holds it (ETA tasks, long tasks).
-- Entries deleted meanwhile (drained, trimmed) are acked away, never handed on:
-- Redis 6.2 keeps them in the PEL, 7.0+ drops them in XCLAIM.
-- Consumers with nothing pending, no liveness key and idle for the visibility
-- timeout are deleted from the group (never one with pending entries: its
-- entries could no longer be claimed).
--
-- Returns a flat list: stream, id, times delivered (PEL count after the claim),
-- fields, then the next entry...
local group, me = ARGV[1], ARGV[2]
local min_idle, left = tonumber(ARGV[3]), tonumber(ARGV[4])

local function alive_in(prefix)
    local living = {}
    return function(consumer)
        if living[consumer] == nil then
            living[consumer] = consumer == me or redis.call('EXISTS', prefix .. consumer) == 1
        end
        return living[consumer]
    end
end

local function forget_dead_consumers(key, is_alive)
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
end

local claimed = {}
for k, key in ipairs(KEYS) do
    if redis.call('EXISTS', key) == 1 then
        local is_alive = alive_in(ARGV[4 + k])
        local ok, pending = pcall(redis.call, 'XPENDING', key, group, 'IDLE', min_idle, '-', '+',
                                  math.max(left, 1) * 10)
        if ok then
            for _, entry in ipairs(pending) do
                if left <= 0 then break end
                local id, owner, count = entry[1], entry[2], entry[4]
                if not is_alive(owner) then
                    local got = redis.call('XCLAIM', key, group, me, min_idle, id)
                    if #got > 0 and got[1] and got[1][2] then
                        left = left - 1
                        claimed[#claimed + 1] = key
                        claimed[#claimed + 1] = id
                        claimed[#claimed + 1] = count + 1
                        claimed[#claimed + 1] = got[1][2]
                    else
                        redis.call('XACK', key, group, id)
                    end
                end
            end
            forget_dead_consumers(key, is_alive)
        end
    end
end
return claimed
