-- Route one message through a direct or topic exchange and append it: one call.
--
-- KEYS[1] - the exchange's binding set
-- ARGV[1] - exchange type: 'direct' or 'topic'
-- ARGV[2] - routing key
-- ARGV[3] - payload
-- ARGV[4] - head of the queue stream keys ('<prefix>celery-streams:q:{')
-- ARGV[5] - priority bucket of the message (0: the queue's main stream)
-- ARGV[6] - the separator inside binding members (routing key, pattern, queue)
-- ARGV[7], ARGV[8], ... - pairs: a queue the publishing process declared, and
--           its x-expires in ms (0: none). Their streams are created when
--           missing (a publish after a nuke is kept). Other queues receive the
--           message only while their stream exists; otherwise their binding is
--           stale (the queue expired or was deleted) and is removed.
--
-- Topic bindings match as kombu's do: '*' is one word, '#' any text.
-- Returns how many queues got the message, or -1 when the exchange has no
-- bindings at all (the caller then restores them from its declarations).
local members = redis.call('SMEMBERS', KEYS[1])
if #members == 0 then
    return -1
end
local kind, routing_key, payload, head, bucket, sep =
    ARGV[1], ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5]), ARGV[6]

local declared = {}
for i = 7, #ARGV, 2 do
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
            redis.call('XADD', key, '*', 'payload', payload)
            if expires ~= nil and expires > 0 then
                redis.call('PEXPIRE', key, expires)
            end
            delivered = delivered + 1
        else
            redis.call('SREM', KEYS[1], member)
        end
    end
end
return delivered
