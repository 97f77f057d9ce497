-- Move one dead letter back to a queue stream, without its delivery count.
--
-- KEYS[1] - the dead-letter stream of a queue
-- KEYS[2] - the stream of that queue to put it on (same queue: same hash tag)
-- KEYS[3] - optional: the queue's ledger (Keys.ledger); without it nothing is counted
-- ARGV[1] - the dead letter's entry id
--
-- The new entry gets the fields of the original entry (the dead letter's
-- `field:NAME` fields, as NAME) except `deliveries`: an operator decided to
-- retry, so max_deliveries counts afresh. Then the dead letter is deleted.
-- The ledger counts the message 'published' again (it left the queue as
-- 'dead_lettered') and 'revived'.
-- Returns {'requeued', new entry id}; {'gone'} when there is no such dead
-- letter (requeued or purged meanwhile); {'empty'} when it holds no field to
-- put back (it is left where it is).
local entry = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
if #entry == 0 then
    return {'gone'}
end
local fields, copy = entry[1][2], {}
for i = 1, #fields, 2 do
    local name = fields[i]
    if string.sub(name, 1, 6) == 'field:' and name ~= 'field:deliveries' then
        copy[#copy + 1] = string.sub(name, 7)
        copy[#copy + 1] = fields[i + 1]
    end
end
if #copy == 0 then
    return {'empty'}
end
local id = append(KEYS[2], copy, 0, 0, KEYS[3], 'published')
if KEYS[3] then redis.call('HINCRBY', KEYS[3], 'revived', 1) end
redis.call('XDEL', KEYS[1], ARGV[1])
return {'requeued', id}
