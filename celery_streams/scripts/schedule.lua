-- Put one message in a queue's schedule (delayed delivery) instead of its stream.
--
-- KEYS[1] - the queue's schedule (sorted set: score = due time in ms)
-- KEYS[2] - the queue's main stream
-- KEYS[3] - optional: the queue's ledger (Keys.ledger); without it nothing is counted
-- ARGV[1] - due time, ms since the epoch by the server's clock: the score
-- ARGV[2] - priority bucket of the message (0: the queue's main stream)
-- ARGV[3] - a random token, so that equal messages stay distinct members
-- ARGV[4] - the payload
-- ARGV[5] - '1': only while the queue's main stream exists (a queue known
--           only from bindings another process wrote: a stale binding must not
--           bring an expired or deleted queue back); '0': always
--
-- The member is schedule_member()'s (_library.lua): 'bucket|stamp|token|payload',
-- stamp being the server's TIME in µs when the member was added: a drain
-- removes exactly the members added up to its plan (drain_scheduled.lua). The
-- consumers of the queue move the member into the stream of its bucket once
-- due (promote.lua).
-- The schedule has no expiry, even for a queue with x-expires.
-- Counts 'published' in the queue's ledger (a scheduled message is published:
-- promote.lua counts nothing when it moves it).
-- Returns 1, or false when ARGV[5] is '1' and the queue's stream is gone.
if ARGV[5] == '1' and redis.call('EXISTS', KEYS[2]) == 0 then
    return false
end
redis.call('ZADD', KEYS[1], ARGV[1], schedule_member(ARGV[2], ARGV[3], ARGV[4]))
if KEYS[3] then redis.call('HINCRBY', KEYS[3], 'published', 1) end
return 1
