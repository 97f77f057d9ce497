"""Global rate limits: one limit for every worker, process and pool, held in Redis.

A limit (:mod:`celery_streams.rates`) holds for a task name or a queue. It is
kept where the read happens, so it costs a waiting task nothing:

* **Reading** (:class:`Throttle`, asked by the inbox for each batch a read
  brought): the entries whose task or queue has a limit are given a start by
  the ``reserve`` script (GCRA: each limit's next free start moves one
  interval per start, with ``burst`` starts allowed at once after a quiet
  spell). An entry whose start is now is handed over; one whose start is
  ahead is moved by the ``hold`` script out of the stream into the queue's
  schedule, due at that start -- it holds no worker slot and no memory, and
  the other tasks of the queue are read at once. When it comes due, the
  scheduler moves it back marked ``paced`` (with its reserved start), and the
  consumer that reads it in time starts it without asking again; one read
  later than an interval (and :data:`LATE_MS`) past its start is asked again
  (its reservation is lost: the rate only drops). Waiting costs no polling:
  the scheduler's timer wakes the consumer at the due time.
* **Limits live in Redis** (:attr:`Keys.limits <celery_streams.keys.Keys.limits>`):
  the ``rate_limits`` transport option writes them when a worker starts
  consuming, ``celery streams limit`` sets and clears them live. A worker
  reads which limits exist when it starts consuming, then asks again every
  :data:`REFRESH` seconds while messages come in, on its pipe of acks (the
  answer comes back with later replies: no read waits for it; an idle
  worker asks nothing); the ``reserve`` script reads each limit's rate on
  every call, so a changed rate holds at once.
* **Changing or clearing** a limit lets go of what it holds back
  (:func:`release`): those messages come due now, unmarked, and are asked
  again -- paced anew under the new rate, or started at once without one.

Counted: ``throttled`` in the queue's ledger (:mod:`celery_streams.ledger`),
per hold. A reservation made for an entry whose consumer died before holding
it is not given back: a crash can only make the rate lower, never higher.
"""
from __future__ import annotations

import logging
from time import monotonic
from typing import Iterable

from . import errors, rates, worker_state
from .errors import one_line
from .keys import Keys, origin_of
from .rates import Limit
from .scheduler import parse_member
from .slots import Client, node_client

logger = logging.getLogger(__name__)

#: Seconds between two looks at which limits exist, while messages come in.
REFRESH = 1.0
#: Milliseconds a message held back may be read past its reserved start, on top of one
#: interval of its limit, and still start without asking again; one read later (its
#: consumer was killed, Redis failed over, every worker was busy) is asked again, so that
#: messages that came late do not start together.
LATE_MS = 50
#: Schedule members one ``unhold`` call lets go of.
RELEASE_STEP = 200


# -- the store --------------------------------------------------------------------------------

def read(client: Client, keys: Keys) -> dict[str, Limit]:
    """Every limit in Redis, by field (entries that do not parse are left out)."""
    found = {}
    for field, value in (client.hgetall(keys.limits) or {}).items():
        field, value = _text(field), _text(value)
        parsed = rates.parse_stored(field, value)
        if parsed is not None:
            found[field] = parsed
    return found


def write(client: Client, keys: Keys, limits: Iterable[Limit]) -> list[Limit]:
    """Set ``limits``; those whose rate or burst changed let go of what they held (:func:`release`).
    Returns the limits that changed."""
    limits = list(limits)
    if not limits:
        return []
    before = read(client, keys)
    changed = [new for new in limits if before.get(new.field) != new]
    if changed:
        client.hset(keys.limits, mapping={new.field: new.stored() for new in changed})
        for new in changed:
            if new.field in before:
                release(client, keys, new.field)
    return changed


def clear(client: Client, keys: Keys, field: str) -> int | None:
    """Remove a limit and let go of what it held; how many were let go, None if there was none."""
    if not client.hdel(keys.limits, field):
        return None
    return release(client, keys, field)


def release(client: Client, keys: Keys, field: str) -> int:
    """Let go of the messages limit ``field`` holds back in every queue's schedule (the ``unhold``
    script, in steps of :data:`RELEASE_STEP`), and forget its reservations."""
    from .scripts import Scripts
    client.delete(keys.limit_state(field))
    scripts = Scripts(client)
    released = 0
    for queue in _queues(client, keys):
        schedule = keys.scheduled(queue)
        node = node_client(client, schedule)
        # In due order: they keep their order when they all come due now.
        held = [member for member, _ in sorted(node.zscan_iter(schedule, count=500),
                                               key=lambda found: found[1])
                if _held_by(member, field, queue)]
        for i in range(0, len(held), RELEASE_STEP):
            released += scripts.unhold(keys=[schedule], args=held[i:i + RELEASE_STEP], client=node)
    return released


def state(client: Client, keys: Keys, limits: Iterable[Limit], now_ms: float) -> list[dict]:
    """Each limit as ``status`` shows it: its rate, burst, and the starts it has reserved ahead
    (``held``: messages waiting in schedules for their turn) and until when."""
    limits = list(limits)
    nexts = [client.get(keys.limit_state(limit.field)) for limit in limits]
    shown = []
    for limit, stored in zip(limits, nexts):
        ahead = max(0.0, float(stored) - now_ms) if stored else 0.0
        held = max(0, int(-(-ahead // limit.interval_ms)) - limit.burst)
        shown.append({'limit': limit.name, 'rate': limit.rate, 'burst': limit.burst,
                      'held': held, 'clear_in': round(ahead / 1000, 3)})
    return shown


def _held_by(member, field: str, queue: str) -> bool:
    parsed = parse_member(member)
    if parsed is None or not parsed.token.startswith('p'):
        return False
    if field == rates.QUEUE + origin_of(queue):   # a shard's: its queue's limit
        return True
    return field.startswith(rates.TASK) and task_of(parsed.payload) == field[len(rates.TASK):]


def _queues(client: Client, keys: Keys) -> list[str]:
    from .inventory import registered_queues
    return sorted(registered_queues(client, keys))


def task_of(payload) -> str | None:
    """The Celery task name of a kombu payload (text or dict), or None."""
    if isinstance(payload, (str, bytes)):
        from kombu.utils.json import loads
        try:
            payload = loads(payload)
        except Exception:
            return None
    headers = payload.get('headers') if isinstance(payload, dict) else None
    task = headers.get('task') if isinstance(headers, dict) else None
    return task if isinstance(task, str) else None


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else value


# -- the read side ------------------------------------------------------------------------------

class Throttle:
    """Holds the entries a read brought back until their limits let them start.

    Its collaborators: the ``keys``, the ``options`` (the consumer group,
    whether to count in the ledger, the ``rate_limits`` to write), the
    ``client`` (the limits are read with it at first), the ``pipe`` (the
    channel's, of acks: asked again there), the ``scripts`` and
    ``dispatcher`` (``reserve`` and ``hold`` go out through :meth:`Scripts.run
    <celery_streams.scripts.Scripts.run>`: ``NOSCRIPT`` reloads, cluster
    slots), ``on_held(queue, start_ms)``
    (the scheduler: a queue has a message due then) and ``clock()`` (now, in ms by the
    server's clock).
    """

    def __init__(self, *, keys: Keys, options, client, pipe, scripts, dispatcher, on_held, clock):
        self.keys = keys
        self.client = client
        self.pipe = pipe   # the channel's pipe (acks): the limits are asked there
        self.scripts = scripts
        self.dispatcher = dispatcher
        self.group = options.consumer_group
        self.ledger = options.ledger
        self.configured = options.rate_limits   # the rate_limits option (Limits)
        self.on_held = on_held
        self.clock = clock   # now, in ms by the server's clock
        self.limits: dict[str, Limit] = {}
        self._looked = -REFRESH
        self._looked_ever = False
        self._configured_written = False
        self._failed: str | None = None

    def configure(self) -> None:
        """Write the limits of the ``rate_limits`` option and, with ``global_task_rate_limits``,
        the worker's tasks' own (the option's win): once, when consuming starts. Then read
        which limits exist, before the first read."""
        wanted = {limit.field: limit for limit in (*worker_state.task_rate_limits(), *self.configured)}
        if wanted and not self._configured_written:
            self._configured_written = True
            write(self.client, self.keys, wanted.values())
        self.limits, self._looked, self._looked_ever = read(self.client, self.keys), monotonic(), True

    def look(self) -> bool:
        """Whether any limit exists. What exists is asked again every :data:`REFRESH` seconds,
        on the channel's pipe: the answer comes with the replies of later acks, and a read
        never waits for it (on a slow network, a round trip per read would be seconds)."""
        now = monotonic()
        if now - self._looked >= REFRESH:
            self._looked = now
            if self._looked_ever and self.pipe is not None:
                try:
                    self.pipe.write([('HGETALL', self.keys.limits)], on_replies=self._learn, retry=False)
                except errors.connection_errors as exc:   # the read that follows will say
                    logger.debug('celery_streams: rate limits not asked: %s', exc)
            else:
                self.limits = read(self.client, self.keys)
            self._looked_ever = True
        return bool(self.limits)

    def _learn(self, replies) -> None:
        [found] = replies
        if isinstance(found, Exception):
            return
        pairs = found.items() if isinstance(found, dict) else zip(found[::2], found[1::2])
        limits = {}
        for field, value in pairs:
            parsed = rates.parse_stored(_text(field), _text(value))
            if parsed is not None:
                limits[parsed.field] = parsed
        self.limits = limits

    def limits_of(self, queue: str, payload: dict, paced_at: int | None) -> tuple:
        """The fields of the limits that hold this entry: none for one held before and read in
        time for the start reserved for it (``paced_at``, ms)."""
        headers = payload.get('headers') or {}
        held = tuple(field for field in (rates.TASK + str(headers.get('task')),
                                         rates.QUEUE + origin_of(queue))   # a shard: its queue's
                     if field in self.limits)
        if held and paced_at is not None:
            late = self.clock() - paced_at
            if late <= min(self.limits[field].interval_ms for field in held) + LATE_MS:
                return ()
        return held

    def admit(self, entries: list) -> list:
        """Of ``entries`` (``(queue, bucket, entry_id, payload, limit fields)``), the
        ``(queue, payload)`` that may start now; the others are held until their start."""
        fields = sorted({field for *_, held in entries for field in held})
        index = {field: i + 2 for i, field in enumerate(fields)}
        command = self.scripts.command(
            'reserve', [self.keys.limits, *(self.keys.limit_state(f) for f in fields)],
            [*fields, *(','.join(str(index[f]) for f in held) for *_, held in entries)])
        [starts] = self.scripts.run(self.dispatcher, [command])
        if isinstance(starts, Exception):   # a full Redis refuses the reservation: let them run
            self._report(starts)
            return [(queue, payload) for queue, _, _, payload, _ in entries]
        admitted: list = []
        held_back: dict = {}
        for (queue, bucket, entry_id, payload, _), start in zip(entries, starts):
            if int(start) == 0:
                admitted.append((queue, payload))
            else:
                held_back.setdefault((queue, bucket), []).append((entry_id, int(start), payload))
        for queue, held in self._hold(held_back):   # not held (a full Redis): they run now
            admitted.extend((queue, payload) for _, _, payload in held)
        return admitted

    def _hold(self, held_back: dict) -> list:
        """Hold the entries of ``held_back`` (``(queue, bucket) -> [(id, start, payload)]``);
        the ``(queue, entries)`` Redis refused to move."""
        if not held_back:
            return []
        keys = self.keys
        commands = [self.scripts.command(
            'hold', [keys.stream(queue, bucket), keys.scheduled(queue),
                     *([keys.ledger(queue)] if self.ledger else [])],
            [self.group, bucket, *(x for entry_id, start, _ in held for x in (entry_id, start))])
            for (queue, bucket), held in held_back.items()]
        refused = []
        for ((queue, _), held), reply in zip(held_back.items(),
                                             self.scripts.run(self.dispatcher, commands)):
            if isinstance(reply, Exception):
                self._report(reply)
                refused.append((queue, held))
            else:
                self.on_held(queue, min(start for _, start, _ in held))
        return refused

    def _report(self, error) -> None:
        line = one_line(error)
        if line != self._failed:
            self._failed = line
            logger.warning('celery_streams: a rate limit could not be applied: %s', line)
