-- Forget registered queues whose stream is gone (an x-expires fired).
--
-- KEYS[1] - the queue registry (hash: queue -> kind)
-- ARGV[1], ARGV[2] - head and tail of a queue's main stream key: the key of
--           queue Q is head .. Q .. tail (Keys.stream_affixes(0))
--
-- A queue declared again is registered again, and a worker whose queue
-- vanished re-registers it when it heals, so only dead entries go.
-- Returns how many entries were removed.
local removed = 0
for _, queue in ipairs(redis.call('HKEYS', KEYS[1])) do
    if redis.call('EXISTS', ARGV[1] .. queue .. ARGV[2]) == 0 then
        redis.call('HDEL', KEYS[1], queue)
        removed = removed + 1
    end
end
return removed
