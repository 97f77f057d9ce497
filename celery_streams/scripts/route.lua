-- Route one message through a direct or topic exchange and append it: one call.
--
-- KEYS[1] - the exchange's binding set
-- ARGV[1] - exchange type: 'direct' or 'topic'
-- ARGV[2] - routing key
-- ARGV[3] - payload
-- ARGV[4] - head of the queue keys ('<prefix>celery-streams:q:{')
-- ARGV[5] - priority bucket of the message (0: the queue's main stream)
-- ARGV[6] - the separator inside binding members (routing key, pattern, queue)
-- ARGV[7] - due time of the message, ms since the epoch by the server's clock
--           (delayed delivery); 0: now
-- ARGV[8] - a random token for the schedule member (used when ARGV[7] > 0)
-- ARGV[9], ARGV[10], ... - pairs: a queue the publishing process declared, and
--           its x-expires in ms (0: none). Their streams are created when
--           missing (a publish after a nuke is kept). Other queues receive the
--           message only while their stream exists; otherwise their binding is
--           stale (the queue expired or was deleted) and is removed.
--
-- Topic bindings match as kombu's do: '*' is one word, '#' any text.
-- A message due now is appended (XADD) to the stream of its bucket in every
-- matching queue; one due later is added instead to each matching queue's
-- schedule ('<head><queue>}:scheduled', a sorted set scored by the due time),
-- as schedule.lua does: member 'bucket|stamp|token|payload', stamp = the
-- server's TIME in µs. The consumers of the queue move it into the stream
-- once due (promote.lua). These keys are built from ARGV[4], as the streams are.
-- Returns how many queues got the message, or -1 when the exchange has no
-- bindings at all (the caller then restores them from its declarations).
local members = redis.call('SMEMBERS', KEYS[1])
if #members == 0 then
    return -1
end
local kind, routing_key, payload, head, bucket, sep =
    ARGV[1], ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5]), ARGV[6]
local due = tonumber(ARGV[7])
local scheduled   -- the schedule member, for a message due later
if due > 0 then
    local now = redis.call('TIME')
    scheduled = bucket .. '|' .. now[1] .. string.format('%06d', tonumber(now[2])) .. '|'
        .. ARGV[8] .. '|' .. payload
end

local declared = {}
for i = 9, #ARGV, 2 do
    declared[ARGV[i]] = tonumber(ARGV[i + 1])
end

local function topic_pattern(binding_key)
    local words = {}
    for word in (binding_key .. '.'):gmatch('(.-)%.') do
        if word == '*' then
            words[#words + 1] = '[^%.]+'
        elseif word == '#' then
            words[#words + 1] = '.-'
        else
            words[#words + 1] = word:gsub('[%^%$%(%)%%%.%[%]%*%+%-%?]', '%%%0')
        end
    end
    return '^' .. table.concat(words, '%.') .. '$'
end

local function matches(binding_key)
    if kind == 'direct' then
        return binding_key == routing_key
    end
    return string.find(routing_key, topic_pattern(binding_key)) ~= nil
end

local delivered, seen = 0, {}
for _, member in ipairs(members) do
    local first = string.find(member, sep, 1, true)
    local second = string.find(member, sep, first + #sep, true)
    local binding_key = string.sub(member, 1, first - 1)
    local queue = string.sub(member, second + #sep)
    if not seen[queue] and matches(binding_key) then
        seen[queue] = true
        local main = head .. queue .. '}'
        local key = main
        if bucket > 0 then
            key = main .. ':p' .. bucket
        end
        local expires = declared[queue]
        if expires ~= nil or redis.call('EXISTS', main) == 1 then
            if scheduled then
                redis.call('ZADD', head .. queue .. '}:scheduled', due, scheduled)
            else
                redis.call('XADD', key, '*', 'payload', payload)
                if expires ~= nil and expires > 0 then
                    redis.call('PEXPIRE', key, expires)
                end
            end
            delivered = delivered + 1
        else
            redis.call('SREM', KEYS[1], member)
        end
    end
end
return delivered
