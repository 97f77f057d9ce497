-- Hand the pending entries of dead consumers to this one; forget dead consumers.
--
-- KEYS    - the streams to look at, in order (one queue's priority buckets...)
-- ARGV[1] - consumer group
-- ARGV[2] - this consumer
-- ARGV[3] - visibility timeout, ms: only entries idle that long are taken
-- ARGV[4] - the most entries to take in all (the reader's prefetch budget)
-- ARGV[4 + #KEYS + i] - the ledger of the queue of KEYS[i] (Keys.ledger)
-- ARGV[4 + i] - the liveness key prefix of the queue of KEYS[i]: a consumer is
--           alive while the key <prefix><consumer> exists (its worker renews it).
--           Liveness keys are named from data (consumer names): they share the
--           queue's hash tag, so they live in the slot of KEYS[i].
--
-- A consumer's entries are taken only when its liveness key is gone, so a live
-- worker keeps a message however long it holds it (ETA tasks, long tasks).
-- Entries are looked up per dead consumer (XPENDING ... <consumer>), so however
-- many old entries live consumers hold, a dead one's are found at once.
-- Entries deleted meanwhile (drained, trimmed) are acked away, never handed on:
-- Redis 6.2 keeps them in the PEL, 7.0+ drops them in XCLAIM.
-- Consumers with nothing pending, no liveness key and idle for the visibility
-- timeout are deleted from the group (never one with pending entries: its
-- entries could no longer be claimed).
--
-- The entries taken count 'redelivered' in their queue's ledger.
-- Returns a flat list: stream, id, times delivered (PEL count after the claim),
-- fields, then the next entry...
local group, me = ARGV[1], ARGV[2]
local min_idle, left = tonumber(ARGV[3]), tonumber(ARGV[4])

local function field_of(consumer, wanted)
    for i = 1, #consumer, 2 do
        if consumer[i] == wanted then return consumer[i + 1] end
    end
end

local claimed = {}
for k, key in ipairs(KEYS) do
    if redis.call('EXISTS', key) == 1 then
        local prefix = ARGV[4 + k]
        local ok, consumers = pcall(redis.call, 'XINFO', 'CONSUMERS', key, group)
        if ok then
            for _, consumer in ipairs(consumers) do
                local name = field_of(consumer, 'name')
                local owned, idle = field_of(consumer, 'pending'), field_of(consumer, 'idle')
                local dead = name ~= me and redis.call('EXISTS', prefix .. name) == 0
                if dead and owned > 0 and left > 0 then
                    local pending = redis.call('XPENDING', key, group, 'IDLE', min_idle, '-', '+', left, name)
                    local taken = 0
                    for _, entry in ipairs(pending) do
                        local id, count = entry[1], entry[4]
                        local got = redis.call('XCLAIM', key, group, me, min_idle, id)
                        if #got > 0 and got[1] and got[1][2] then
                            left = left - 1
                            taken = taken + 1
                            claimed[#claimed + 1] = key
                            claimed[#claimed + 1] = id
                            claimed[#claimed + 1] = count + 1
                            claimed[#claimed + 1] = got[1][2]
                        else
                            redis.call('XACK', key, group, id)
                        end
                    end
                    if taken > 0 then
                        redis.pcall('HINCRBY', ARGV[4 + #KEYS + k], 'redelivered', taken)   -- full Redis: uncounted
                    end
                elseif dead and owned == 0 and idle >= min_idle then
                    redis.call('XGROUP', 'DELCONSUMER', key, group, name)
                end
            end
        end
    end
end
return claimed
