-- The library: functions shared by the scripts, put in front of every script's
-- text when it is loaded (source() in scripts/__init__.py), so a script's SHA
-- covers them. It reads no KEYS or ARGV: a script passes what a function needs.
--
-- append(stream, fields, maxlen, expires, ledger, counter)
--     Append a message to a queue stream: XADD of an entry with `fields` (a
--     list: name, value, name, value...), trimmed to about `maxlen` entries
--     (MAXLEN ~) when maxlen > 0, then PEXPIRE `expires` ms on the stream (the
--     queue's x-expires) when expires > 0. With `ledger` (the queue's ledger,
--     Keys.ledger: a hash of counters, celery_streams.ledger) it counts 1 in
--     `counter` there ('published' for a publish; nil: nothing), and in
--     'dropped' the entries the trim removed, and gives the ledger the
--     stream's expiry (`expires`; or, when the counter is new, the one the
--     stream has). Returns the new entry id.
--     Every script that appends a message to a queue does it here; the one
--     other writer is the publish hot path, packed in Python (publisher._xadd).
-- append_payload(stream, payload, maxlen, expires, ledger, counter)
--     append() of a message as published: the one field 'payload'.
-- schedule_member(bucket, token, payload)
--     The member of a queue's schedule that holds a message:
--     'bucket|stamp|token|payload', stamp being the server's TIME in µs (16
--     digits) now (the format: celery_streams.keys; read in Python by
--     scheduler.parse_member).
-- parse_member(member)
--     bucket, stamp, payload and token of a schedule member (strings), or nil
--     when it does not parse (written by hand). A token
--     'p<deliveries>.<start>.<id>' marks a message held back by a rate limit
--     (hold.lua): its start is reserved.

local function append(stream, fields, maxlen, expires, ledger, counter)
    local id, dropped = nil, 0
    if tonumber(maxlen) > 0 then
        local before = ledger and redis.call('XLEN', stream)
        id = redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', unpack(fields))
        dropped = ledger and before + 1 - redis.call('XLEN', stream) or 0
    else
        id = redis.call('XADD', stream, '*', unpack(fields))
    end
    local made = false   -- the counter was made now
    if ledger then
        if counter then made = redis.call('HINCRBY', ledger, counter, 1) == 1 end
        if dropped > 0 then redis.call('HINCRBY', ledger, 'dropped', dropped) end
    end
    if tonumber(expires) > 0 then
        redis.call('PEXPIRE', stream, expires)
        if ledger then redis.call('PEXPIRE', ledger, expires) end
    elseif made then   -- a queue another process declared with x-expires: its ledger too
        local ttl = redis.call('PTTL', stream)
        if ttl > 0 then redis.call('PEXPIRE', ledger, ttl) end
    end
    return id
end

local function append_payload(stream, payload, maxlen, expires, ledger, counter)
    return append(stream, {'payload', payload}, maxlen, expires, ledger, counter)
end

local function schedule_member(bucket, token, payload)
    local now = redis.call('TIME')
    return bucket .. '|' .. now[1] .. string.format('%06d', tonumber(now[2])) .. '|' .. token .. '|' .. payload
end

local function parse_member(member)
    local bucket, stamp, token, start = string.match(member, '^(%d+)|(%d+)|([^|]*)|()')
    if not bucket then
        return nil
    end
    return bucket, stamp, string.sub(member, start), token
end


-- Uniqueness keys (celery_streams.unique): a held key's value is
-- 'mode|where|generation|task id' ('where': '' for a message in a stream,
-- 'due:token' for one in a schedule; 'generation': Celery's retries count of
-- the message, so a retry's key is not released by the ack of the message it
-- retries), the task id last: it may hold any character.
--
-- unique_value(mode, due, token, generation, task)
--     The value of a held key (due and token nil: the message is in a stream).
-- unique_held(held)
--     generation, task id, due and token (nil, nil: in a stream) of a value.
-- unique_field(message, name)
--     Field `name` of a decoded kombu message: its header, else its property
--     (Celery puts apply_async's extra options in the properties).
-- release_unique(prefix, payload)
--     The message `payload` (kombu's JSON) is gone for good (drained): delete
--     its uniqueness key, prefix .. unique_key (Keys.unique_prefix of its
--     queue), if it is held for this very task and generation, and not for a
--     period (a throttle's key lives its period out). Returns 1 when it
--     deleted one.

local function unique_value(mode, due, token, generation, task)
    local where = due and (string.format('%d', due) .. ':' .. token) or ''
    return mode .. '|' .. where .. '|' .. generation .. '|' .. task
end

local function unique_held(held)
    local where, generation, task = string.match(held, '^[^|]*|([^|]*)|([^|]*)|(.*)$')
    local due, token = string.match(where or '', '^(%d+):(.*)$')
    return generation, task, due, token
end

local function unique_field(message, name)
    for _, part in ipairs({message['headers'], message['properties']}) do
        if type(part) == 'table' and type(part[name]) == 'string' then
            return part[name]
        end
    end
end

local function release_unique(prefix, payload)
    local ok, message = pcall(cjson.decode, payload)
    if not ok or type(message) ~= 'table' then return 0 end
    local key = unique_field(message, 'unique_key')
    if not key or unique_field(message, 'unique_mode') == 'period' then return 0 end
    local id = unique_field(message, 'id') or unique_field(message, 'correlation_id')
    local retries = type(message['headers']) == 'table' and tonumber(message['headers']['retries'])
    local held = redis.call('GET', prefix .. key)
    if not held or not id then return 0 end
    local generation, task = unique_held(held)
    if task == id and generation == string.format('%d', retries or 0) then
        redis.call('DEL', prefix .. key)
        return 1
    end
    return 0
end
