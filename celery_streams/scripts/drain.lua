-- Empty a stream up to an entry id and keep its consumer groups.
--
-- KEYS[1] - the stream
-- ARGV[1] - the last entry id to remove, inclusive ('+': every entry). An
--           operator confirmed a drain of what was there when it was planned;
--           entries added since stay.
-- ARGV[2] - '1' to delete the key once it is empty and has no consumer group
--           (a dead-letter stream); otherwise the key stays.
--
-- Trims the stream (DEL would destroy its groups) and acks the entries up to
-- that id pending in every group, so nothing drained can be restored or
-- reclaimed afterwards. The key and its groups stay.
-- Returns {entries removed, pending entries cleared}.
if redis.call('EXISTS', KEYS[1]) == 0 then
    return {0, 0}
end
local last = ARGV[1]
local removed
if last == '+' then
    removed = redis.call('XTRIM', KEYS[1], 'MAXLEN', 0)
else
    local ms, seq = string.match(last, '^(%d+)-(%d+)$')
    removed = redis.call('XTRIM', KEYS[1], 'MINID', ms .. '-' .. string.format('%d', tonumber(seq) + 1))
end
local cleared = 0
local groups = redis.call('XINFO', 'GROUPS', KEYS[1])
if ARGV[2] == '1' and #groups == 0 and redis.call('XLEN', KEYS[1]) == 0 then
    redis.call('DEL', KEYS[1])
end
for _, group in ipairs(groups) do
    local name
    for i = 1, #group, 2 do
        if group[i] == 'name' then name = group[i + 1] end
    end
    while true do
        local pending = redis.call('XPENDING', KEYS[1], name, '-', last, 1000)
        if #pending == 0 then break end
        local ids = {}
        for i, item in ipairs(pending) do ids[i] = item[1] end
        cleared = cleared + redis.call('XACK', KEYS[1], name, unpack(ids))
    end
end
return {removed, cleared}
