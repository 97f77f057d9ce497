-- Publish one message that carries a uniqueness key: the check and the append in one call.
--
-- KEYS[1] - the uniqueness key (Keys.unique: in the queue's hash tag, so in
--           the slot of every other key here)
-- KEYS[2] - the queue stream of the message's priority bucket
-- KEYS[3] - the queue's schedule (delayed delivery)
-- KEYS[4] - optional: the queue's ledger (Keys.ledger); without it nothing is counted
-- ARGV[1] - mode: 'until_done', 'period' or 'debounce'
-- ARGV[2] - the message's task id
-- ARGV[3] - ms the key is held while its message waits (for 'period': the period)
-- ARGV[4] - the payload
-- ARGV[5] - due time, ms since the epoch by the server's clock; 0: now
-- ARGV[6] - priority bucket (for the schedule member)
-- ARGV[7] - a random token (for the schedule member)
-- ARGV[8] - PEXPIRE of the stream (the queue's x-expires), ms; 0: none
-- ARGV[9] - the message's generation (Celery's retries count)
--
-- A held key stops the publish ('until_done', 'period': the message is
-- dropped, nothing is written or counted), unless it names this task in
-- another generation (a retry of the task that holds it), or for 'debounce': a new
-- message replaces the one the key names while that one is still in the
-- schedule (removed, counted 'dropped' in the ledger), and takes the key.
-- Otherwise the message is appended (append_payload) or scheduled (as
-- schedule.lua does), counted 'published', and the key is set to
-- 'mode|where|generation|task id' for ARGV[3] ms plus the time until it is due.
-- Returns {outcome, task id}: {'published', ARGV[2]}, {'dropped', the task
-- id the key names}, or {'replaced', the task id of the message removed}.
local key, stream, schedule, ledger = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local mode, id, hold, payload = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local due, bucket, token = tonumber(ARGV[5]), ARGV[6], ARGV[7]

local outcome = 'published'
local held = redis.call('GET', key)
local held_generation, held_task, held_due, held_token
if held then held_generation, held_task, held_due, held_token = unique_held(held) end
if held and not (held_task == id and held_generation ~= ARGV[9]) then
    if mode ~= 'debounce' then
        return {'dropped', held_task}
    end
    if held_due then   -- the standing message was scheduled: remove it if it is still there
        for _, member in ipairs(redis.call('ZRANGEBYSCORE', schedule, held_due, held_due)) do
            local _, _, _, member_token = parse_member(member)
            if member_token == held_token then
                redis.call('ZREM', schedule, member)
                if ledger then redis.pcall('HINCRBY', ledger, 'dropped', 1) end
                outcome = 'replaced'
                id = held_task
            end
        end
    end
end

local ttl = hold
if due > 0 then
    local now = redis.call('TIME')
    local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
    redis.call('ZADD', schedule, due, schedule_member(bucket, token, payload))
    if ledger then redis.call('HINCRBY', ledger, 'published', 1) end
    ttl = hold + math.max(0, due - now_ms)
else
    append_payload(stream, payload, 0, ARGV[8], ledger, 'published')
end
redis.call('SET', key, unique_value(mode, due > 0 and due or nil, token, ARGV[9], ARGV[2]),
           'PX', math.max(1, math.floor(ttl)))
return {outcome, id}
