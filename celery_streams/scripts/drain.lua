-- Empty a stream up to an entry id and keep its consumer groups, at once or in bounded steps.
--
-- KEYS[1] - the stream
-- KEYS[2] - optional: the ledger of its queue (Keys.ledger); without it nothing is counted
-- ARGV[1] - the last entry id to remove, inclusive ('+': every entry). An
--           operator confirmed a drain of what was there when it was planned;
--           entries added since stay.
-- ARGV[2] - '1' to delete the key once it is empty and has no consumer group
--           (a dead-letter stream); otherwise the key stays.
-- ARGV[3] - optional, the step N. Without it one call does everything, in a
--           time that grows with the stream and its PELs (`celery purge`).
--           With it one call acks and trims at most N entries in all, and the
--           caller calls again while the reply says more is left: it acks
--           entries pending up to ARGV[1] (over every group); only once none is
--           pending does it trim, with what is left of N: whole stream nodes
--           (XTRIM MINID ~ ... LIMIT, no per-entry work), or, when no whole
--           node can go (the node holding the last id, or nodes larger than N),
--           at most 100 entries exactly (XRANGE ... COUNT, XTRIM MINID).
--           The admin functions resolve '+' to an id first: with '+' the end
--           moves while entries are added.
-- ARGV[4] - optional (with ARGV[3]), the ledger counter of what is removed:
--           'drained' (a queue's stream or schedule, the default) or
--           'dead_purged' (a dead-letter stream)
-- ARGV[5] - optional (with ARGV[3]), the prefix of the queue's uniqueness keys
--           (Keys.unique_prefix): the messages removed release the keys they
--           hold (release_unique, _library.lua). The trim then reads what it
--           removes (XRANGE, at most the step's budget) and trims exactly.
--
-- Trims the stream (DEL would destroy its groups) and acks the entries up to
-- that id pending in every group, so nothing drained can be restored or
-- reclaimed afterwards: restore.lua puts back only an entry still pending for
-- its consumer and still in the stream, reclaim.lua acks an entry it finds
-- gone. Between two steps every entry a step acked is pending nowhere, every
-- entry it trimmed is gone: neither can come back. Acks go first so that
-- the entries a worker could still put back (as new entries, after the plan:
-- they stay) are cleared soonest. An entry a worker reads during the drain
-- (one it had not read yet) becomes pending: a later step acks it.
-- The key and its groups stay.
--
-- The entries removed count in the queue's ledger (KEYS[2]), as ARGV[4] says, when
-- it exists (a nuke deletes it: its drains do not make it again), and not on a
-- full Redis, which refuses HINCRBY (a drain must free memory there).
-- Returns {entries removed, pending entries cleared} without ARGV[3];
-- {removed, cleared, more} with it, more = 1 while an entry up to that id is
-- left in the stream or pending in a group.
local stream, last, step, unique = KEYS[1], ARGV[1], tonumber(ARGV[3]), ARGV[5]
local EXACT = 100   -- entries an exact trim step reads (XRANGE) at most

if redis.call('EXISTS', stream) == 0 then
    if step then return {0, 0, 0} end
    return {0, 0}
end

-- The smallest id after `id` (MINID keeps it and everything later).
local function after(id)
    local ms, seq = string.match(id, '^(%d+)-(%d+)$')
    return ms .. '-' .. string.format('%d', tonumber(seq) + 1)
end

local groups = {}
for _, group in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
    for i = 1, #group, 2 do
        if group[i] == 'name' then groups[#groups + 1] = group[i + 1] end
    end
end

local budget = step or math.huge
local removed, cleared = 0, 0
for _, name in ipairs(groups) do
    while budget > 0 do
        local pending = redis.call('XPENDING', stream, name, '-', last, math.min(budget, 1000))
        if #pending == 0 then break end
        local ids = {}
        for i, item in ipairs(pending) do ids[i] = item[1] end
        cleared = cleared + redis.call('XACK', stream, name, unpack(ids))
        budget = budget - #pending
    end
end

if budget > 0 then   -- nothing up to `last` is pending any more: trim
    if not step then
        if last == '+' then
            removed = redis.call('XTRIM', stream, 'MAXLEN', 0)
        else
            removed = redis.call('XTRIM', stream, 'MINID', after(last))
        end
    elseif unique then   -- read what goes, so that its uniqueness keys are released
        local batch = redis.call('XRANGE', stream, '-', last, 'COUNT', budget)
        for _, entry in ipairs(batch) do
            local fields = entry[2]
            for i = 1, #fields, 2 do
                if fields[i] == 'payload' then release_unique(unique, fields[i + 1]) end
            end
        end
        if #batch > 0 then
            removed = redis.call('XTRIM', stream, 'MINID', after(batch[#batch][1]))
        end
    else
        if last == '+' then
            removed = redis.call('XTRIM', stream, 'MAXLEN', '~', 0, 'LIMIT', budget)
        else
            removed = redis.call('XTRIM', stream, 'MINID', '~', after(last), 'LIMIT', budget)
        end
        if removed == 0 then
            local batch = redis.call('XRANGE', stream, '-', last, 'COUNT', math.min(budget, EXACT))
            if #batch > 0 then
                removed = redis.call('XTRIM', stream, 'MINID', after(batch[#batch][1]))
            end
        end
    end
end

if KEYS[2] and removed > 0 and redis.call('EXISTS', KEYS[2]) == 1 then
    redis.pcall('HINCRBY', KEYS[2], ARGV[4] or 'drained', removed)   -- full Redis: uncounted
end

local more = 0
if step then
    if #redis.call('XRANGE', stream, '-', last, 'COUNT', 1) > 0 then
        more = 1
    else
        for _, name in ipairs(groups) do
            if #redis.call('XPENDING', stream, name, '-', last, 1) > 0 then
                more = 1
                break
            end
        end
    end
end
if ARGV[2] == '1' and more == 0 and #groups == 0 and redis.call('XLEN', stream) == 0 then
    redis.call('DEL', stream)
end
if step then return {removed, cleared, more} end
return {removed, cleared}
