-- Remove from a queue's schedule the members added up to a time, in bounded steps.
--
-- KEYS[1] - the queue's schedule (see schedule.lua)
-- KEYS[2] - optional: the queue's ledger (Keys.ledger); counted in while it exists
-- ARGV[1] - a stamp (server TIME in µs): the members whose stamp is at most
--           this are removed; those added later stay. A drain plan takes its
--           stamp in the same transaction as its ZCARD, so the members removed
--           are those it counted that are still scheduled (not moved to the
--           stream meanwhile), to the microsecond.
-- ARGV[2] - ZSCAN cursor: '0' for the first call, then the one returned
-- ARGV[3] - ZSCAN COUNT: about how many members one call looks at
-- ARGV[4] - optional: the prefix of the queue's uniqueness keys
--           (Keys.unique_prefix): the members removed release the keys their
--           messages hold (release_unique, _library.lua)
--
-- ZSCAN returns every member present from the first call to the last at
-- least once, whatever is added or removed meanwhile. A member that does not
-- parse (written by hand) is removed.
-- The members removed count 'drained' in the queue's ledger.
-- Returns {next cursor ('0': done), members removed}.
local limit = tonumber(ARGV[1])
local reply = redis.call('ZSCAN', KEYS[1], ARGV[2], 'COUNT', tonumber(ARGV[3]))
local found, gone = reply[2], {}
for i = 1, #found, 2 do
    local _, stamp = parse_member(found[i])
    if not stamp or tonumber(stamp) <= limit then
        gone[#gone + 1] = found[i]
    end
end
if ARGV[4] then
    for _, member in ipairs(gone) do
        local _, _, payload = parse_member(member)
        if payload then release_unique(ARGV[4], payload) end
    end
end
local removed = 0
for i = 1, #gone, 500 do
    removed = removed + redis.call('ZREM', KEYS[1], unpack(gone, i, math.min(i + 499, #gone)))
end
if KEYS[2] and removed > 0 and redis.call('EXISTS', KEYS[2]) == 1 then
    redis.pcall('HINCRBY', KEYS[2], 'drained', removed)   -- refused on a full Redis: uncounted
end
return {reply[1], removed}
