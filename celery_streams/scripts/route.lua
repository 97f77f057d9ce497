-- Route one message through a direct or topic exchange and append it: one call.
--
-- KEYS[1] - the exchange's binding set
-- ARGV[1] - exchange type: 'direct' or 'topic'
-- ARGV[2] - routing key
-- ARGV[3] - payload
-- ARGV[4] - priority bucket of the message (0: the queue's main stream)
-- ARGV[5] - the separator inside binding members (routing key, pattern, queue)
-- ARGV[6] - due time of the message, ms since the epoch by the server's clock
--           (delayed delivery); 0: now
-- ARGV[7] - a random token for the schedule member (used when ARGV[6] > 0)
-- ARGV[8], ARGV[9] - head and tail of a queue's main stream key: the key of
--           queue Q is head .. Q .. tail (Keys.stream_affixes(0))
-- ARGV[10], ARGV[11] - head and tail of a queue's stream key of the bucket
--           ARGV[4] (Keys.stream_affixes(bucket))
-- ARGV[12], ARGV[13] - head and tail of a queue's schedule key
--           (Keys.scheduled_affixes())
-- ARGV[14], ARGV[15] - head and tail of a queue's ledger key
--           (Keys.ledger_affixes())
-- ARGV[16], ARGV[17], ... - pairs: a queue the publishing process declared,
--           and its x-expires in ms (0: none). Their streams are created when
--           missing (a publish after a nuke is kept). Other queues receive the
--           message only while their stream exists; otherwise their binding is
--           stale (the queue expired or was deleted) and is removed.
--
-- The queues are names found in the bindings, so their keys cannot be given
-- in KEYS: the script puts each name between the affixes it is given
-- (celery_streams.keys holds the layout).
-- Topic bindings match as kombu's do: '*' is one word, '#' any text.
-- A message due now is appended to the stream of its bucket in every
-- matching queue; one due later is added instead to each matching queue's
-- schedule (a sorted set scored by the due time), as schedule.lua does. The
-- consumers of the queue move it into the stream once due (promote.lua).
-- Each queue that gets the message counts it 'published' in its ledger
-- (appended or scheduled).
-- Returns how many queues got the message, or -1 when the exchange has no
-- bindings at all (the caller then restores them from its declarations).
local members = redis.call('SMEMBERS', KEYS[1])
if #members == 0 then
    return -1
end
local kind, routing_key, payload, bucket, sep = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local due = tonumber(ARGV[6])
local main, stream, schedule = {ARGV[8], ARGV[9]}, {ARGV[10], ARGV[11]}, {ARGV[12], ARGV[13]}
local ledger = {ARGV[14], ARGV[15]}
local scheduled   -- the schedule member, for a message due later
if due > 0 then
    scheduled = schedule_member(bucket, ARGV[7], payload)
end

local declared = {}
for i = 16, #ARGV, 2 do
    declared[ARGV[i]] = tonumber(ARGV[i + 1])
end

local function key(affixes, queue)
    return affixes[1] .. queue .. affixes[2]
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
        local expires = declared[queue]
        if expires ~= nil or redis.call('EXISTS', key(main, queue)) == 1 then
            if scheduled then
                redis.call('ZADD', key(schedule, queue), due, scheduled)
                redis.call('HINCRBY', key(ledger, queue), 'published', 1)
            else
                append_payload(key(stream, queue), payload, 0, expires or 0, key(ledger, queue), 'published')
            end
            delivered = delivered + 1
        else
            redis.call('SREM', KEYS[1], member)
        end
    end
end
return delivered
