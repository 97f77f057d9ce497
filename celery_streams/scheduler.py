"""Delayed delivery: a task waits for its ETA in Redis, not in a worker's memory.

* **Publishing** (:mod:`celery_streams.publisher`): a Celery task whose ETA
  (protocol 2: ``headers['eta']``, ISO 8601, naive meaning UTC; set by
  ``countdown``, ``eta`` and a retry's countdown) is more than
  ``delayed_delivery_threshold`` seconds ahead, by the server's clock, goes
  into the schedule of each queue it is routed to (:meth:`Keys.scheduled
  <celery_streams.keys.Keys.scheduled>`, a sorted set scored by the due time
  in ms) instead of its stream: the ``schedule`` script through the default
  exchange, the ``route`` script through a direct or topic exchange. A member
  keeps the priority bucket, the server time it was added, a random token and
  the payload (:func:`parse_member`). Broadcasts (fanout) are never scheduled.
* **Moving** (:class:`Scheduler`, run by the reader before it sends a read):
  the consumers of a queue move its due entries into the stream of their
  bucket with the ``promote`` script -- atomic, at most :data:`PROMOTE_STEP`
  per call, exactly once however many workers race. A consumer looks at a
  schedule when the next due time it knows of has come, and at least every
  ``polling_interval`` (another process may have scheduled something
  sooner). Its blocking read waits no longer than until the nearest due time,
  and since Redis ends a ``BLOCK`` only on its own timer (up to ~100 ms late),
  the consume loop also wakes itself then (:mod:`celery_streams.poller`) and
  moves the entries on the publish connection, whose ``XADD`` wakes the
  blocked read: an idle worker receives a task a few milliseconds after its
  ETA. Publishers move nothing: with every worker down, entries wait in the
  sorted set.

Celery then receives a task whose ETA has come and runs it at once. What
Celery checks on receipt still holds: ``expires`` (a task past it ends
``REVOKED``) and the revoked set (a revoked scheduled task never runs).
Consumers without acks (Celery's remote control, events and replies) and
broadcast queues are not looked at: tasks are consumed with acks.

:func:`scheduled_messages` lists a schedule for ``celery streams scheduled``.
"""
from __future__ import annotations

import logging
import math
import secrets
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from time import monotonic
from typing import NamedTuple

import redis
from kombu.utils.json import loads

from . import errors
from .keys import Keys, ledger_of
from .slots import Client

logger = logging.getLogger(__name__)

#: The most entries one ``promote`` call moves: an entry costs about 4.5 µs of server time
#: (an XADD and a ZREM; measured: 0.87 ms a call of 200 entries of 600 bytes, Redis 7.0 on a
#: 2-core VM), so no other client waits much longer than a millisecond for one call.
PROMOTE_STEP = 200
#: Milliseconds a blocking read waits past the nearest due time, so that the entry is due
#: by the server's clock when the ``promote`` script runs (the local estimate of that
#: clock is measured to about half a round trip).
DUE_MARGIN_MS = 2
#: Seconds between two looks at one schedule that found something due. Tasks coming due
#: every millisecond would otherwise cost a ``promote`` call each, in every consuming
#: worker (1.3-1.8 calls per task were measured at 1,000 due a second): at most 10 ms
#: later, they are moved several at a time.
PROMOTE_GAP = 0.010
#: The member separator (see :func:`parse_member`).
SEP = '|'


# -- publishing -----------------------------------------------------------------------

def eta_ms(message) -> float | None:
    """The ETA of a kombu message (Celery's ``headers['eta']``), in ms since the epoch, or None."""
    headers = message.get('headers') if isinstance(message, dict) else None
    eta = headers.get('eta') if isinstance(headers, dict) else None
    if not eta or not isinstance(eta, str):
        return None
    try:
        when = datetime.fromisoformat(eta[:-1] + '+00:00' if eta.endswith('Z') else eta)
    except ValueError:
        return None
    if when.tzinfo is None:   # naive: UTC, as Celery means it
        when = when.replace(tzinfo=timezone.utc)
    return when.timestamp() * 1000


def due_ms(message, now_ms: float, options) -> int | None:
    """When ``message`` is due (ms, server clock) if it is to be scheduled, else None.

    Scheduled: delayed delivery is on, the message is a Celery task (its
    headers name a ``task`` and an ``id``: Celery honours the ETA on receipt,
    so a task received when due means the same) and its ETA is more than
    ``delayed_delivery_threshold`` ahead of ``now_ms``. Other kombu messages
    are never delayed, whatever their headers.
    """
    if not options.delayed_delivery:
        return None
    headers = message.get('headers')
    if not isinstance(headers, dict) or 'task' not in headers or 'id' not in headers:
        return None
    eta = eta_ms(message)
    if eta is None or eta - now_ms <= options.delayed_delivery_threshold * 1000:
        return None
    return int(math.ceil(eta))


def new_token() -> str:
    """A random token: equal messages scheduled at the same time stay distinct members."""
    return secrets.token_hex(6)


class Member(NamedTuple):
    """One entry of a schedule: ``bucket|stamp|token|payload``."""

    bucket: int
    stamp: int        # server TIME in µs when it was added
    token: str
    payload: str


def parse_member(member) -> Member | None:
    """The parts of a schedule member, or None when it does not parse (written by hand).

    The format is :mod:`celery_streams.keys`'s; the scripts write it
    (``schedule_member`` in ``scripts/_library.lua``).
    """
    if isinstance(member, bytes):
        member = member.decode(errors='replace')
    parts = member.split(SEP, 3)
    if len(parts) != 4 or not parts[0].isdigit() or not parts[1].isdigit():
        return None
    return Member(int(parts[0]), int(parts[1]), parts[2], parts[3])


# -- moving due entries -----------------------------------------------------------------

class Scheduler:
    """Moves the due entries of the schedules of the queues one channel consumes.

    Used by the reader (:class:`celery_streams.reader.Reader`): :meth:`promote_due`
    before it sends a read, :meth:`block_ms` for the ``BLOCK`` of a blocking read.
    """

    def __init__(self, *, keys: Keys, queues, scripts, dispatcher, clock, options):
        self.keys = keys
        self.queues = queues            # the queue table: which queues are served, their expiry
        self.scripts = scripts
        self.dispatcher = dispatcher    # the channel's hot commands (one write for all schedules)
        self.clock = clock              # now, in ms by the server's clock
        self.check_every = options.polling_interval
        self._due: dict[str, int | None] = {}    # queue -> next due time (server ms); None: empty
        self._looked: dict[str, float] = {}      # queue -> monotonic time of the last look
        self._failed: str | None = None          # the last promote error logged

    def watched(self, queues) -> list[str]:
        """The queues whose schedules this channel serves: consumed with acks, not broadcast."""
        table = self.queues
        watched = []
        for queue in dict.fromkeys(queues):
            record = table.get(queue)
            if record is None or not (record.deleted or record.no_ack or record.is_broadcast):
                watched.append(queue)
        return watched

    def promote_due(self, queues) -> int:
        """Move the due entries of the schedules of ``queues`` into their streams; how many.

        A schedule is looked at when the next due time known of it has come, or
        when it was not looked at for ``polling_interval``. One round trip for
        all of them (a pipeline of ``promote`` calls), none when nothing is due.
        A Redis error other than a lost connection (a full Redis, an ACL) is
        logged once; the entries stay scheduled and are tried again after
        ``polling_interval``.
        """
        watched = self.watched(queues)
        if not watched:
            return 0
        now_ms, now = self.clock(), monotonic()
        due = [queue for queue in watched
               if now - self._looked.get(queue, -math.inf) >= self.check_every
               or (self._due.get(queue) is not None and self._due[queue] <= now_ms
                   and now - self._looked.get(queue, -math.inf) >= PROMOTE_GAP)]
        if not due:
            return 0
        results = self.scripts.run(self.dispatcher, [
            self.scripts.command('promote', [self.keys.scheduled(queue), *self.keys.streams(queue)],
                                    [PROMOTE_STEP, self.queues.expires(queue) or 0,
                                     *self.keys.priority_steps])
            for queue in due])
        moved = 0
        for queue, result in zip(due, results):
            self._looked[queue] = now
            if isinstance(result, Exception):
                self._due[queue] = None
                self._report(queue, result)
                continue
            count, next_due = result
            moved += int(count)
            self._due[queue] = None if next_due is None else int(next_due)
        if moved:
            logger.debug('celery_streams: %d scheduled message(s) came due', moved)
        return moved

    def expect(self, queue: str, due_ms: int) -> None:
        """``queue``'s schedule has an entry due at ``due_ms`` (a rate limit held one back):
        look at it then."""
        known = self._due.get(queue)
        if known is None or due_ms < known:
            self._due[queue] = due_ms

    def next_due_in(self, queues) -> float | None:
        """Seconds (server clock) until the nearest scheduled entry known of ``queues`` is due,
        plus :data:`DUE_MARGIN_MS`, and no sooner than :data:`PROMOTE_GAP` after the last
        look at its schedule; may be negative. None when none is known."""
        now_ms, now = self.clock(), monotonic()
        dues = [max(due + DUE_MARGIN_MS - now_ms,
                    (self._looked.get(queue, -math.inf) + PROMOTE_GAP - now) * 1000)
                for queue, due in ((q, self._due.get(q)) for q in self.watched(queues))
                if due is not None]
        return min(dues) / 1000 if dues else None

    def block_ms(self, block_ms: int, queues) -> int:
        """The ``BLOCK`` of a blocking read over ``queues``: ``block_ms``, or shorter so the
        read returns when the nearest scheduled entry known of is due (at least 1: never 0).

        Redis ends a ``BLOCK`` on its own timer (``hz``: within about 100 ms), so the
        consume loop also wakes at the due time and moves the entries through the
        publish connection: the ``XADD`` wakes the blocked read at once.
        """
        due_in = self.next_due_in(queues)
        if due_in is None:
            return block_ms
        return max(1, min(block_ms, int(math.ceil(due_in * 1000))))

    def _report(self, queue, error) -> None:
        line = errors.one_line(error)
        if line != self._failed:
            self._failed = line
            logger.warning('celery_streams: could not move the due messages of queue %r '
                           '(they stay scheduled; tried again every polling_interval): %s',
                           queue, line)


# -- the operator's view ------------------------------------------------------------------

@dataclass
class ScheduledMessage:
    """One scheduled message, as ``celery streams scheduled`` shows it."""

    due: float                # seconds since the epoch (server clock)
    due_in: float             # seconds from now (server clock); negative: overdue
    task: str | None          # Celery's task name, or None for another message
    task_id: str | None
    priority: int | None
    bucket: int | None        # None: a member that does not parse
    size: int                 # bytes of the payload

    def as_dict(self) -> dict:
        return asdict(self)


def scheduled_messages(client: Client, keys: Keys, queue: str, limit: int | None,
                       now_ms: int) -> tuple[int, list[ScheduledMessage]]:
    """``(how many are scheduled, the next `limit` in due order)`` of ``queue``'s schedule.

    ``limit`` None or 0: all of them.
    """
    key = keys.scheduled(queue)
    with client.pipeline(transaction=False) as pipe:
        pipe.zcard(key)
        pipe.zrange(key, 0, (limit - 1) if limit else -1, withscores=True)
        total, found = pipe.execute()
    return total, [describe(member, score, now_ms) for member, score in found]


def describe(member, score: float, now_ms: int) -> ScheduledMessage:
    parsed = parse_member(member)
    task = task_id = priority = None
    payload = parsed.payload if parsed else (
        member.decode(errors='replace') if isinstance(member, bytes) else member)
    try:
        message = loads(payload)
        headers = message.get('headers') or {}
        task, task_id = headers.get('task'), headers.get('id')
        priority = (message.get('properties') or {}).get('priority')
    except Exception:   # not a kombu message: shown with what is known
        pass
    return ScheduledMessage(due=round(score / 1000, 3), due_in=round((score - now_ms) / 1000, 3),
                            task=task, task_id=task_id, priority=priority,
                            bucket=parsed.bucket if parsed else None,
                            size=len(payload.encode()))


# -- draining -------------------------------------------------------------------------------

#: About how many members one ``drain_scheduled`` call looks at (its ``ZSCAN COUNT``): about
#: 3 µs of server time each (1.6 ms for 500 members of 600 bytes, measured as above).
DRAIN_SCHEDULED_STEP = 300


def plan_stamp(client: redis.Redis, key: str) -> tuple[int, int]:
    """``(members now, server time in µs)`` of a schedule, in one transaction: a drain of
    the members stamped up to that time removes exactly those counted (less any moved
    to the stream meanwhile)."""
    with client.pipeline(transaction=True) as pipe:
        pipe.zcard(key)
        pipe.time()
        count, (seconds, micros) = pipe.execute()
    return int(count), int(seconds) * 1_000_000 + int(micros)


def drain_schedule(scripts, key: str, stamp: int, *, step: int = DRAIN_SCHEDULED_STEP,
                   progress=None, unique_prefix: str | None = None) -> int:
    """Remove the members of schedule ``key`` added up to ``stamp`` (µs, server clock), in
    bounded steps (the ``drain_scheduled`` script, ``ZSCAN`` over about ``step`` members a
    call); ``progress(n)`` after each step that removed ``n``. ``unique_prefix``
    (``Keys.unique_prefix`` of the queue): the messages removed release their uniqueness
    keys (:mod:`celery_streams.unique`). Returns how many went."""
    removed, cursor = 0, '0'
    unique = [unique_prefix] if unique_prefix else []
    while True:
        cursor, count = scripts.drain_scheduled(keys=[key, ledger_of(key)],
                                                args=[stamp, cursor, step, *unique])
        cursor = cursor.decode() if isinstance(cursor, bytes) else str(cursor)
        removed += count
        if progress is not None and count:
            progress(count)
        if cursor == '0':
            return removed
