-- Settle delivered entries of one stream: XACK and XDEL them, counting in the ledger.
--
-- KEYS[1] - the queue stream
-- KEYS[2] - optional: the queue's ledger (Keys.ledger); without it nothing is counted
-- ARGV[1] - consumer group; '' for entries read with NOACK (nothing to ack)
-- ARGV[2] - the ledger counter: 'acked', 'rejected' (reject without requeue)
--           or 'expired' (dropped unread: x-message-ttl, a deadline)
-- ARGV[3] - '1' to XDEL the entries (task queues); '0' to keep them (a
--           broadcast queue's entries stay until trimmed)
-- ARGV[4], ARGV[5], ... - the entry ids
--
-- Counts only what this call settled: the XACK's reply (an entry acked
-- before, drained or taken over and acked elsewhere counts 0), or, for
-- entries read with NOACK, the XDEL's.
-- Sent again after a lost connection, it counts nothing twice. On a full Redis
-- (maxmemory) the acks go on, uncounted: HINCRBY is refused there, XACK and XDEL
-- (which free memory) are not.
-- A counter this call made gets its ledger the stream's expiry (a queue with x-expires: a
-- reply queue must leave nothing behind).
-- Returns how many entries were counted.
local stream, group = KEYS[1], ARGV[1]
local n = 0
if group ~= '' then
    n = redis.call('XACK', stream, group, unpack(ARGV, 4))
end
if ARGV[3] == '1' then
    local deleted = redis.call('XDEL', stream, unpack(ARGV, 4))
    if group == '' then n = deleted end
end
if n > 0 and KEYS[2] then
    -- refused on a full Redis (an error reply, not a number): the ack goes on
    if redis.pcall('HINCRBY', KEYS[2], ARGV[2], n) == n then   -- the counter was made now
        local ttl = redis.call('PTTL', stream)   -- expire with the stream (x-expires)
        if ttl > 0 then redis.call('PEXPIRE', KEYS[2], ttl) end
    end
end
return n
