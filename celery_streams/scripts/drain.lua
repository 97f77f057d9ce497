-- Empty a stream and keep its consumer groups.
--
-- KEYS[1] - the stream
--
-- Trims the stream to length 0 (DEL would destroy its groups) and acks every
-- entry pending in every group, so nothing drained can be restored or
-- reclaimed afterwards. The key and its groups stay.
-- Returns {entries removed, pending entries cleared}.
if redis.call('EXISTS', KEYS[1]) == 0 then
    return {0, 0}
end
local removed = redis.call('XTRIM', KEYS[1], 'MAXLEN', 0)
local cleared = 0
for _, group in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
    local name
    for i = 1, #group, 2 do
        if group[i] == 'name' then name = group[i + 1] end
    end
    while true do
        local pending = redis.call('XPENDING', KEYS[1], name, '-', '+', 1000)
        if #pending == 0 then break end
        local ids = {}
        for i, item in ipairs(pending) do ids[i] = item[1] end
        cleared = cleared + redis.call('XACK', KEYS[1], name, unpack(ids))
    end
end
return {removed, cleared}
