-- Put one delivered entry back at the tail of its stream, if it is still ours.
--
-- KEYS[1] - the queue stream
-- KEYS[2] - optional: the queue's ledger (Keys.ledger); without it nothing is counted
-- ARGV[1] - consumer group
-- ARGV[2] - consumer name that must still own the entry
-- ARGV[3] - entry id
-- ARGV[4] - '1' when this delivery counts (a reject with requeue: the
--           consumer tried and gave up), '0' when it does not (the message
--           was never started: restored at shutdown, or never handed over)
--
-- Returns the id of the new entry, or false when the entry is no longer
-- pending for this consumer (acked, drained, purged, claimed by another
-- consumer): such an entry must never come back.
-- The new entry's `deliveries` = the old value + the deliveries of this entry
-- (the group's counter: reads and reclaims), less this one when it does not
-- count, so max_deliveries sees every real attempt; `redelivered` = 1 says it
-- was delivered before either way (Celery reads delivery_info['redelivered']).
-- The ledger counts 'requeued' (ARGV[4] = '1') or 'restored' (the same message
-- goes back: not 'published' again, nor 'acked').
local ok, pending = pcall(redis.call, 'XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1, ARGV[2])
if not ok or #pending == 0 then
    return false
end
local entry = redis.call('XRANGE', KEYS[1], ARGV[3], ARGV[3])
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
redis.call('XDEL', KEYS[1], ARGV[3])
if #entry == 0 then
    return false
end
local fields, copy, deliveries = entry[1][2], {}, 0
for i = 1, #fields, 2 do
    if fields[i] == 'deliveries' then
        deliveries = tonumber(fields[i + 1]) or 0
    elseif fields[i] ~= 'redelivered' then
        copy[#copy + 1] = fields[i]
        copy[#copy + 1] = fields[i + 1]
    end
end
deliveries = deliveries + pending[1][4]
if ARGV[4] ~= '1' then
    deliveries = deliveries - 1
end
if deliveries > 0 then
    copy[#copy + 1] = 'deliveries'
    copy[#copy + 1] = tostring(deliveries)
end
copy[#copy + 1] = 'redelivered'
copy[#copy + 1] = '1'
return append(KEYS[1], copy, 0, 0, KEYS[2], ARGV[4] == '1' and 'requeued' or 'restored')
