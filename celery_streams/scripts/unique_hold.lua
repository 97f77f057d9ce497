-- Renew or release one uniqueness key, only while it names a given task.
--
-- KEYS[1] - the uniqueness key (Keys.unique)
-- ARGV[1] - the task id it must name (the value's last part, _library.lua)
-- ARGV[2] - ms: > 0 to hold the key that long from now (PEXPIRE: a worker
--           holding the message renews it), 0 to release it (DEL: the task
--           is done, dead-lettered or expired)
-- ARGV[3] - the generation it must name (Celery's retries count of the message)
--
-- Compare-and-delete: a key a later publish took (the task's own key was
-- released, or lapsed, and another task holds it now) is left alone.
-- Returns 1 when the key named the task (renewed or released), else 0.
local held = redis.call('GET', KEYS[1])
if not held then return 0 end
local generation, task = unique_held(held)
if task ~= ARGV[1] or generation ~= ARGV[3] then
    return 0
end
if tonumber(ARGV[2]) > 0 then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
else
    redis.call('DEL', KEYS[1])
end
return 1
