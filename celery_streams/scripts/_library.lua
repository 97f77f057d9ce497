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
--     bucket, stamp and payload of a schedule member (strings), or nil when it
--     does not parse (written by hand).

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
    local bucket, stamp, start = string.match(member, '^(%d+)|(%d+)|[^|]*|()')
    if not bucket then
        return nil
    end
    return bucket, stamp, string.sub(member, start)
end

