-- The library: functions shared by the scripts, put in front of every script's
-- text when it is loaded (source() in scripts/__init__.py), so a script's SHA
-- covers them. It reads no KEYS or ARGV: a script passes what a function needs.
--
-- append(stream, fields, maxlen, expires)
--     Append a message to a queue stream: XADD of an entry with `fields` (a
--     list: name, value, name, value...), trimmed to about `maxlen` entries
--     (MAXLEN ~) when maxlen > 0, then PEXPIRE `expires` ms on the stream (the
--     queue's x-expires) when expires > 0. Returns the new entry id.
--     Every script that appends a message to a queue does it here; the one
--     other writer is the publish hot path, packed in Python (publisher._xadd).
-- append_payload(stream, payload, maxlen, expires)
--     append() of a message as published: the one field 'payload'.
-- schedule_member(bucket, token, payload)
--     The member of a queue's schedule that holds a message:
--     'bucket|stamp|token|payload', stamp being the server's TIME in µs (16
--     digits) now (the format: celery_streams.keys; read in Python by
--     scheduler.parse_member).
-- parse_member(member)
--     bucket, stamp and payload of a schedule member (strings), or nil when it
--     does not parse (written by hand).

local function append(stream, fields, maxlen, expires)
    local id
    if tonumber(maxlen) > 0 then
        id = redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', unpack(fields))
    else
        id = redis.call('XADD', stream, '*', unpack(fields))
    end
    if tonumber(expires) > 0 then
        redis.call('PEXPIRE', stream, expires)
    end
    return id
end

local function append_payload(stream, payload, maxlen, expires)
    return append(stream, {'payload', payload}, maxlen, expires)
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

