"""Unique tasks: at most one task per uniqueness key and queue, checked in Redis with the append.

A message carries its key in its headers (or, as Celery puts ``apply_async``'s
extra options, in its properties)::

    unique_key    the key (text): two messages with one key in one queue are duplicates
    unique_mode   'until_done' (the default), 'period' or 'debounce'
    unique_for    seconds: the period ('period'); how long the key is held while
                  its message waits ('until_done', 'debounce'; default
                  DEFAULT_HOLD), counted from the message's due time

The publisher sends such a message through the ``unique`` script (the check
and the append in one call, in the queue's slot: the key shares the queue's
hash tag, :meth:`Keys.unique <celery_streams.keys.Keys.unique>`); a message
without a key takes the hand-packed hot path as before. Held keys are
``mode|where|generation|task id`` with an expiry:

* ``until_done``: a duplicate is dropped while the standing task waits, is
  scheduled or is delivered. The key goes when the standing task is acked
  (after it ran: with early acks, once the worker finished it), rejected,
  dead-lettered, expired or drained; a nuke deletes it. While the message
  waits the key lives ``unique_for`` past its due time at most; once a
  worker holds the message, :class:`Holds` renews it to :func:`lease_ms`
  (``2 x visibility_timeout + 5 s``) on each liveness tick, so a killed
  worker's key outlives it until another worker took the message over and
  renews it, and never outlives a task lost some other way by more than that.
* ``period``: at most one message per key per ``unique_for`` seconds; the key
  is not released before its period ends.
* ``debounce``: a new message replaces the one the key names while that one
  is still in the schedule (a countdown or ETA): the last arguments win, and
  the replaced task never runs. Otherwise it acts as ``until_done`` for the
  key, and is never dropped.

A dropped (or replaced) task's id is answered to the publisher:
:func:`take_outcome` gives it to the helpers of :mod:`celery_streams.unique_tasks`,
and the current Celery app's result backend gets, for the dropped id, a
``FAILURE`` whose exception is :class:`DuplicateTask` naming the task that
stands: ``AsyncResult(dropped).get()`` raises it at once instead of waiting.
"""
from __future__ import annotations

import logging
import sys
import threading
import uuid
from collections import OrderedDict
from dataclasses import asdict, dataclass
from time import monotonic
from typing import NamedTuple

from .keys import Keys, glob_escape, origin_of
from .slots import node_client
from .wire import text
from .worker_state import running_delivery_tags

logger = logging.getLogger(__name__)

KEY, MODE, FOR = 'unique_key', 'unique_mode', 'unique_for'
UNTIL_DONE, PERIOD, DEBOUNCE = 'until_done', 'period', 'debounce'
MODES = (UNTIL_DONE, PERIOD, DEBOUNCE)
#: Seconds an ``until_done`` or ``debounce`` key is held while its message waits, when the
#: message gives no ``unique_for``: the most a key outlives a waiting message lost behind
#: the transport's back (a stream deleted by hand, an expired queue).
DEFAULT_HOLD = 3600.0
#: Outcomes remembered per process for :func:`take_outcome`.
OUTCOMES_KEPT = 10000


class DuplicateTask(Exception):
    """The task was not published: ``standing_id`` stands for its uniqueness key.

    Stored in the result backend for the dropped task's id, so its
    ``AsyncResult.get()`` raises this at once (``get(propagate=False)``
    returns it). A debounced task replaced by a later one gets it too,
    naming the later one.
    """

    def __init__(self, standing_id, key=None, outcome='dropped'):
        super().__init__(standing_id, key, outcome)
        self.standing_id, self.key, self.outcome = standing_id, key, outcome

    def __str__(self):
        return 'task %s of uniqueness key %r: %s stands for it' % (self.outcome, self.key,
                                                                     self.standing_id)


class Claim(NamedTuple):
    """What a message says of its uniqueness: its key, mode, hold (ms), task id and generation
    (Celery's ``retries``: a retry republishes the task under its id, and the ack of the
    message it retries must not release the retry's key)."""

    key: str
    mode: str
    hold_ms: int
    task_id: str
    generation: str = '0'

    @property
    def released_when_done(self) -> bool:
        return self.mode != PERIOD


def claim_of(headers, properties, *, give_id: bool = False) -> Claim | None:
    """The claim of a message (its ``headers`` and ``properties``), or None when it has no key.

    A bad mode or ``unique_for`` raises ``ValueError`` (at publish: the
    caller's mistake). ``give_id``: a message without a task id (a plain
    kombu message) gets one, as its ``correlation_id``.
    """
    headers = headers if isinstance(headers, dict) else {}
    properties = properties if isinstance(properties, dict) else {}
    key = headers.get(KEY, properties.get(KEY))
    if key is None or key == '':
        return None
    mode = headers.get(MODE, properties.get(MODE)) or UNTIL_DONE
    if mode not in MODES:
        raise ValueError('unique_mode must be one of %s, not %r' % (', '.join(MODES), mode))
    seconds = headers.get(FOR, properties.get(FOR))
    if seconds is None:
        if mode == PERIOD:
            raise ValueError("unique_mode 'period' needs unique_for (seconds)")
        seconds = DEFAULT_HOLD
    seconds = float(seconds)
    if not seconds > 0:
        raise ValueError('unique_for must be more than 0 seconds, not %r' % (seconds,))
    task_id = headers.get('id') or properties.get('correlation_id')
    if not task_id and give_id:
        task_id = properties['correlation_id'] = uuid.uuid4().hex
    try:
        generation = '%d' % int(headers.get('retries') or 0)
    except (TypeError, ValueError):
        generation = '0'
    return Claim(str(key), mode, max(1, int(seconds * 1000)), str(task_id or ''), generation)


def lease_ms(visibility_ms: int) -> int:
    """How long a worker holding a message holds its key from each renewal: longer than a
    takeover takes (the liveness key lapses after ``visibility_timeout``, a reclaim runs
    every quarter of it, and the new holder renews within a second)."""
    return 2 * visibility_ms + 5000


# -- publishing -------------------------------------------------------------------------

def publish_command(scripts, keys: Keys, queue: str, claim: Claim, *, payload: str, bucket: int,
                    due: int | None, token: str, expires: int | None, ledger: bool) -> list:
    """The ``unique`` script call that checks ``claim`` and appends (or schedules) the message."""
    return scripts.command('unique', [keys.unique(queue, claim.key), keys.stream(queue, bucket),
                                      keys.scheduled(queue), *([keys.ledger(queue)] if ledger else [])],
                           [claim.mode, claim.task_id, claim.hold_ms, payload, due or 0, bucket,
                            token, expires or 0, claim.generation])


_outcomes: OrderedDict = OrderedDict()
_outcomes_lock = threading.Lock()
_storing = threading.local()


def published(claim: Claim, reply) -> str:
    """Note what the ``unique`` script answered for ``claim``; the outcome
    (``'published'``, ``'dropped'``, ``'replaced'``).

    A dropped task's id (or a debounced one's that was replaced) gets its
    :class:`DuplicateTask` in the result backend (:func:`store_duplicate`).
    """
    outcome, other = text(reply[0]), text(reply[1])
    with _outcomes_lock:
        _outcomes[claim.task_id] = (outcome, other)
        while len(_outcomes) > OUTCOMES_KEPT:
            _outcomes.popitem(last=False)
    if outcome == 'dropped':
        logger.debug('celery_streams: task %s dropped: %s holds uniqueness key %r',
                     claim.task_id, other, claim.key)
        if not getattr(_storing, 'app', None):
            store_duplicate(None, claim.task_id, other, claim.key)
    elif outcome == 'replaced':
        if not getattr(_storing, 'app', None):
            store_duplicate(None, other, claim.task_id, claim.key, 'replaced')
    return outcome


def take_outcome(task_id: str) -> tuple[str, str] | None:
    """``(outcome, other task id)`` of a publish of ``task_id`` in this process, once."""
    with _outcomes_lock:
        return _outcomes.pop(task_id, None)


def store_duplicate(app, task_id: str, standing_id: str, key: str, outcome='dropped') -> None:
    """Store :class:`DuplicateTask` as the result of ``task_id`` in ``app``'s result backend
    (None: Celery's current app, when Celery is loaded), so that waiting for it ends.

    Nothing is stored without a backend (``get()`` then raises at once anyway).
    A backend that cannot store for another task (``rpc://``) is logged at debug.
    """
    if app is None:
        state = sys.modules.get('celery._state')
        if state is None:
            return
        app = state.get_current_app()
    try:
        backend = app.backend
        if type(backend).__name__ == 'DisabledBackend':
            return
        backend.store_result(task_id, DuplicateTask(standing_id, key, outcome), 'FAILURE')
    except Exception as exc:   # noqa: BLE001 - the publish itself went fine
        logger.debug('celery_streams: could not store the duplicate result of %s: %s', task_id, exc)


# -- the worker side ----------------------------------------------------------------------

class Holds:
    """The uniqueness keys of the messages one channel holds: renewed while held, released
    when done.

    The QoS tells it what was delivered (:meth:`delivered`) and settled
    (:meth:`done`, :meth:`put_back`); the renewal thread calls :meth:`tick`.
    A message acked while Celery still runs it (early acks) keeps its key
    until the task is no longer running.
    """

    def __init__(self, *, keys: Keys, scripts, visibility_ms: int, renew_every: float):
        self.keys = keys
        self.scripts = scripts
        self.lease = lease_ms(visibility_ms)
        self.renew_every = renew_every
        self._lock = threading.Lock()
        self._held: dict = {}        # delivery tag -> (queue, claim)
        self._running: dict = {}     # tag acked while its task runs -> (queue, claim)
        self._next_renew = 0.0

    def __bool__(self) -> bool:
        return bool(self._held or self._running)

    def delivered(self, tag: str, message) -> None:
        """The message of delivery ``tag`` was handed to a consumer (two lookups when it
        carries no key)."""
        headers, properties = message.headers, message.properties
        if not ((headers and KEY in headers) or (properties and KEY in properties)):
            return
        try:
            claim = claim_of(headers, properties)
        except ValueError:
            return
        if claim is not None and claim.released_when_done:
            queue = tag.split('/', 3)[3]   # the delivery tag's queue (qos.make_tag)
            with self._lock:
                self._held[tag] = (queue, claim)
            self._next_renew = 0.0   # its key: leased at the next tick

    def done(self, tag: str) -> list:
        """The message of ``tag`` was acked, rejected or dropped: the commands releasing its
        key, to send with the ack (none while its task still runs: :meth:`tick` does)."""
        if tag not in self._held:   # a message without a key: one lookup
            return []
        with self._lock:
            held = self._held.pop(tag, None)
            if held is None:
                return []
            if tag in running_delivery_tags():
                self._running[tag] = held
                return []
        queue, claim = held
        return [self.command(queue, claim, 0)]

    def put_back(self, tags) -> list:
        """The messages of ``tags`` went back to their queue: they wait again, with their
        key held for its whole ``unique_for``; the commands that say so."""
        commands = []
        with self._lock:
            for tag in tags:
                held = self._held.pop(tag, None)
                if held is not None:
                    commands.append(self.command(held[0], held[1], held[1].hold_ms))
        return commands

    def command(self, queue: str, claim: Claim, ms: int) -> list:
        return self.scripts.command('unique_hold', [self.keys.unique(queue, claim.key)],
                                    [claim.task_id, ms, claim.generation])

    def tick(self) -> None:
        """From the renewal thread: release the keys of the tasks that finished after an early
        ack; every ``renew_every`` (and after a delivery), renew the keys held."""
        if not self:
            return
        running = running_delivery_tags() if self._running else set()
        with self._lock:
            finished = [tag for tag in self._running if tag not in running]
            calls = [(*self._running.pop(tag), 0) for tag in finished]
            if monotonic() >= self._next_renew:
                self._next_renew = monotonic() + self.renew_every
                calls += [(queue, claim, self.lease)
                          for queue, claim in [*self._held.values(), *self._running.values()]]
        for queue, claim, ms in calls:   # one key a call: on a Redis Cluster, each on its master
            try:
                self.scripts.unique_hold(keys=[self.keys.unique(queue, claim.key)],
                                         args=[claim.task_id, ms, claim.generation])
            except Exception as exc:   # noqa: BLE001 - Redis away: renewed at the next tick
                logger.debug('celery_streams: uniqueness key %r not renewed: %s', claim.key, exc)


def release_of(keys: Keys, queue: str, payload: dict) -> tuple[str, str, int, str] | None:
    """The arguments of the ``unique_hold`` script (key, task id, 0, generation) releasing
    the key of message ``payload`` (kombu's envelope) of ``queue``, gone for good; None: it
    has no key, or one held for a period."""
    try:
        claim = claim_of(payload.get('headers'), payload.get('properties'))
    except ValueError:
        return None
    if claim is None or not claim.released_when_done:
        return None
    return keys.unique(queue, claim.key), claim.task_id, 0, claim.generation


def release_expired(inbox, queue: str, payload) -> None:
    """The inbox dropped ``payload`` of ``queue`` unread (expired): release its key (a
    failure is logged: the key then lapses after its hold)."""
    released = release_of(inbox.keys, queue, payload)
    if released is not None:
        key, *args = released
        [reply] = inbox.scripts.run(inbox.dispatcher,
                                    [inbox.scripts.command('unique_hold', [key], args)])
        if isinstance(reply, Exception):
            logger.warning('celery_streams: uniqueness key %r not released: %s', key, reply)


# -- the operator's view -------------------------------------------------------------------

@dataclass
class HeldKey:
    """One held uniqueness key, as ``celery streams unique`` shows it."""

    queue: str
    key: str
    mode: str
    task_id: str
    ttl: float | None     # seconds left; None: no expiry
    scheduled: bool       # its message waits in the schedule (a countdown or ETA)

    def as_dict(self) -> dict:
        return asdict(self)


def held_keys(client, keys: Keys, queues=None) -> list[HeldKey]:
    """Every held uniqueness key under the prefix (of ``queues`` only, when given), by queue
    and key (one ``SCAN``; on a Redis Cluster, of every master); a shard's under its sharded
    queue (:mod:`celery_streams.shards`)."""
    found = sorted({text(k) for k in client.scan_iter(match=keys.match_unique, count=1000)})
    wanted = set(queues) if queues else None
    held = []
    for key in found:
        info = keys.parse(key)
        if info is None or info.role != 'unique' or (
                wanted is not None and origin_of(info.queue) not in wanted):   # a shard: its queue
            continue
        with client.pipeline(transaction=False) as pipe:   # one key a pipeline: one node each
            pipe.get(key)
            pipe.pttl(key)
            value, ttl = pipe.execute()
        if value is None:
            continue   # released meanwhile
        mode, where, _, task_id = text(value).split('|', 3)
        held.append(HeldKey(origin_of(info.queue), info.detail, mode, task_id,
                            None if ttl is None or ttl < 0 else round(ttl / 1000, 3), bool(where)))
    return sorted(held, key=lambda h: (h.queue, h.key))


def queues_with_keys(client, keys: Keys) -> set:
    """The queues that hold uniqueness keys now (a drain releases theirs)."""
    return {info.queue for info in (keys.parse(text(k)) for k in
                                    client.scan_iter(match=keys.match_unique, count=1000))
            if info is not None and info.role == 'unique'}


def held_prefix(client, keys: Keys, queue: str) -> str | None:
    """``Keys.unique_prefix`` of ``queue`` when it holds uniqueness keys now (a purge then
    releases those of what it removes), else None (one ``SCAN`` of its node)."""
    prefix = keys.unique_prefix(queue)
    node = node_client(client, prefix)
    return prefix if next(node.scan_iter(match=glob_escape(prefix) + '*', count=1000), None) else None
