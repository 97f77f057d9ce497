-- Reserve start times under global rate limits (GCRA), for entries read in one batch.
--
-- KEYS[1] - the rate limits (Keys.limits: a hash, field -> 'interval_ms burst rate')
-- KEYS[2], KEYS[3], ... - the state of each limit named (Keys.limit_state): its
--           theoretical arrival time, the next free start in ms (server clock)
-- ARGV[1], ..., ARGV[#KEYS - 1] - the field of the limit whose state is KEYS[i + 1]
-- ARGV[#KEYS], ... - one per entry, in order: the indexes into KEYS of the limits
--           that hold it (e.g. '2' or '2,3': its task's limit and its queue's)
--
-- Each entry gets the first start its limits allow: now when every limit has a
-- start free within its burst, else the time the last of them has one. Either
-- way the start is reserved (each limit's next free start moves one interval
-- past it), so an entry held until then starts without asking again, and
-- entries keep the order they were read in. A limit no longer in KEYS[1]
-- (cleared since the worker looked) holds nothing.
-- The state of a limit expires once its reservations have passed and the
-- burst has refilled: an idle limit leaves nothing behind.
-- Returns, per entry, 0 (start now) or its reserved start, ms since the epoch.
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + tonumber(time[2]) / 1000
local nlimits = #KEYS - 1

local limits = {}   -- KEYS index -> {interval, burst, tat}
for i = 2, #KEYS do
    local spec = redis.call('HGET', KEYS[1], ARGV[i - 1])
    if spec then
        local interval, burst = string.match(spec, '^(%S+) (%d+)')
        interval, burst = tonumber(interval), tonumber(burst)
        if interval and interval > 0 and burst and burst > 0 then
            local tat = tonumber(redis.call('GET', KEYS[i]) or 0) or 0
            limits[i] = {interval = interval, burst = burst, tat = math.max(tat, now)}
        end
    end
end

local starts = {}
for e = nlimits + 1, #ARGV do
    local start = now
    local held = {}
    for index in string.gmatch(ARGV[e], '%d+') do
        local limit = limits[tonumber(index)]
        if limit then
            held[#held + 1] = limit
            start = math.max(start, limit.tat - (limit.burst - 1) * limit.interval)
        end
    end
    for _, limit in ipairs(held) do
        limit.tat = math.max(limit.tat, start) + limit.interval
    end
    starts[#starts + 1] = start > now and math.ceil(start) or 0
end

for i, limit in pairs(limits) do
    local ttl = math.ceil(limit.tat - now) + 1
    redis.call('SET', KEYS[i], string.format('%.3f', limit.tat), 'PX', ttl)
end
return starts
