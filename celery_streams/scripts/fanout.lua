-- Append a broadcast copy to a queue stream, only if that queue still exists.
--
-- KEYS[1] - the queue stream
-- ARGV[1] - MAXLEN the stream is trimmed to (approximately)
-- ARGV[2] - the payload
--
-- Returns the new entry id, or false when the stream is gone (the queue
-- expired or was deleted): its binding is stale and no stream is re-created.
if redis.call('EXISTS', KEYS[1]) == 0 then
    return false
end
return redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'payload', ARGV[2])
