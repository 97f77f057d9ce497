-- Append a message to a queue stream, only if that queue still exists.
--
-- KEYS[1] - the queue stream
-- KEYS[2] - optional: the queue's ledger (Keys.ledger); without it nothing is counted
-- ARGV[1] - MAXLEN the stream is trimmed to (approximately); 0: no trimming
-- ARGV[2] - the payload
-- ARGV[3] - PEXPIRE to set on the stream (the queue's x-expires), ms; 0: none
--
-- For copies to queues found through bindings that another process wrote
-- (broadcasts, replies): a queue that expired or was deleted has left a stale
-- binding behind, and must not be re-created by a publish.
-- Counts 'published' in the queue's ledger (and 'dropped': what the trim removed).
-- Returns the new entry id, or false when the stream is gone.
if redis.call('EXISTS', KEYS[1]) == 0 then
    return false
end
return append_payload(KEYS[1], ARGV[2], ARGV[1], ARGV[3], KEYS[2], 'published')
