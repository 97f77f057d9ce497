"""Operator functions over a redis client: drain, nuke and status (dead letters: see below).

They back the ``celery streams`` command (:mod:`celery_streams.cli`) and work
from Python as well::

    from celery_streams import admin

    client = admin.client_from_url('redis-streams://localhost:6379/0')
    admin.status(client, global_keyprefix='proj:')
    plan = admin.drain(client, global_keyprefix='proj:', queues=['celery'], dry_run=True)
    admin.apply_drain(client, plan, global_keyprefix='proj:')
    admin.dead_letters(client, global_keyprefix='proj:', limit=10)
    admin.requeue_dead_letters(client, global_keyprefix='proj:', ids=['celery/1700000000000-0'])

Every destructive function plans first: with ``dry_run=True`` it returns what
it would do, counted the same way, with nothing changed; ``apply_*`` then does
exactly that plan and nothing found since (a queue declared, a stream or a
message added after the plan is left alone). Only keys under
``<global_keyprefix>celery-streams:`` are ever read or written (see
:mod:`celery_streams.keys`), found with ``SCAN MATCH``, never ``KEYS``.

* :func:`drain` empties queue streams with the ``drain`` script (``XACK`` of
  the entries pending up to the last entry planned, then ``XTRIM`` up to it):
  the keys and every consumer group stay, so running workers read on (``DEL``
  would destroy the groups). It empties the queues' schedules (delayed
  delivery) too, unless ``keep_scheduled``: exactly the members added up to
  the plan (see :func:`plan_drain_queue`). The messages it removes release the
  uniqueness keys they hold (:mod:`celery_streams.unique`).
* :func:`nuke` destroys every consumer group (``XGROUP DESTROY``: a worker blocked
  on it is woken with ``NOGROUP``), then deletes every key of the prefix (the
  held uniqueness keys too).
* :func:`status` describes each queue (:class:`Status`): kind, lengths, groups,
  consumers, the age of the oldest pending entry, the dead-letter count and
  the scheduled messages; ``as_dict()`` gives the JSON document of ``status --json``.
* :func:`scheduled` lists the next scheduled messages of queues (delayed
  delivery: tasks waiting for their ETA in Redis).
* :func:`unique_keys` lists the held uniqueness keys (unique tasks).
* The dead letters (:func:`dead_letters`, :func:`requeue_dead_letters`,
  :func:`purge_dead_letters`) live in :mod:`celery_streams.deadletters` and
  are importable from here.

Drain, nuke and the dead-letter purge work in bounded steps, whatever the size
of the streams: each ``drain`` script call acks and trims at most
:data:`~celery_streams.scripts.DRAIN_STEP` entries (about a millisecond of
server time), so other clients wait at most that long for one step; nuke
drains each stream that way before ``XGROUP DESTROY`` (then O(1): its PEL is
empty) and ``UNLINK``. Their ``progress`` argument, a callable, is given the
number of entries each step removed or cleared (the CLI draws a progress bar
with it on a terminal).

Clients may be made with ``decode_responses`` on or off (RESP2). Every
function also takes a redis-py ``RedisCluster`` (``client_from_url`` gives one
for a ``redis-streams+cluster://`` URL): ``SCAN`` covers every primary and
each queue's commands go to the node owning its slot (see
:mod:`celery_streams.slots`).
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Mapping

from .slots import Client, node_client
from .connection import client_from_url, first_url, safe_url  # noqa: F401  (public here)
from . import deadletters
from .deadletters import (AmbiguousDeadLetter, DeadLetter, DeadLetterQueue,  # noqa: F401
                          PurgedDeadLetters, RequeuedDeadLetter, UnknownDeadLetter, apply_purge,
                          apply_requeue, purge_dead_letters, requeue_dead_letters)
from .deadletter_detail import DeadLetterDetail, raw_field, show_dead_letter  # noqa: F401
from .inventory import (BroadcastQueue, Inventory, QueueKeys, UnknownQueue,  # noqa: F401
                        age_seconds, last_entry_id, scan_keys, scan_queue_keys,
                        server_now_ms, stream_groups, stream_info)
from .keys import Keys
from .scheduler import ScheduledMessage, drain_schedule, plan_stamp, scheduled_messages
from .scripts import DRAIN_STEP, Scripts  # noqa: F401  (DRAIN_STEP: documented here)
from .unique import HeldKey, held_keys, queues_with_keys
from .status import (ConsumerStatus, GroupStatus, QueueStatus, Status,  # noqa: F401
                     consumer_status, group_status, queue_status, server_version, status)
from .wire import text

logger = logging.getLogger(__name__)

#: ``admin.dead_letters(client, ...)`` lists dead letters (:func:`celery_streams.deadletters.dead_letters`).
dead_letters = deadletters.dead_letters

#: Every command these functions send (the drain script's included), for a Redis ACL.
COMMANDS = (
    'scan', 'type', 'exists', 'get', 'hgetall', 'del', 'time', 'info', 'client|setname',
    'xlen', 'xinfo|groups', 'xinfo|consumers', 'xinfo|stream', 'xpending', 'xtrim', 'xack',
    'xgroup|destroy', 'unlink', 'eval', 'evalsha', 'script|load', 'script|exists',
    'xrange', 'xadd', 'xdel', 'multi', 'exec',   # dead letters: list, requeue, purge
    'zcard', 'zrange', 'zscan', 'zrem',          # schedules: status, scheduled, drain
    'hincrby', 'pttl',                           # the ledger's counters (in the scripts)
)


def acl_rules(global_keyprefix: str = '') -> list[str]:
    """``ACL SETUSER`` rules for an operator: these commands, on the keys of the prefix only."""
    return ['~' + Keys(global_keyprefix).match_all, '-@all', *('+' + c for c in COMMANDS)]


#: ``progress(n)``: ``n`` more entries removed or cleared by one bounded step.
Progress = Callable[[int], None]


# -- drain --------------------------------------------------------------------

@dataclass
class DrainedQueue:
    """What draining one queue removed (or, in a dry run, would remove)."""

    queue: str
    kind: str | None              # 'task', 'fanout', or None when not in the registry
    removed: int                  # stream entries trimmed
    pending_cleared: int          # PEL entries acked, summed over the groups
    groups_kept: list[str] = field(default_factory=list)
    streams: list[str] = field(default_factory=list)   # bucket 0 first, then priority buckets
    dead_letters_removed: int | None = None   # None: dead letters left alone
    #: stream -> the last entry id the plan covers ('+': all); entries added later stay.
    until: dict[str, str] = field(default_factory=dict)
    scheduled_removed: int | None = None   # scheduled messages; None: the schedule left alone
    #: The server time (µs) of the plan: scheduled messages added up to it go, later ones stay.
    scheduled_until: int | None = None
    #: A sharded queue (:mod:`celery_streams.shards`): what each shard's drain covers (this
    #: queue's own first); the counts above are their sums.
    shards: list[DrainedQueue] = field(default_factory=list)


def drain(client: Client, *, global_keyprefix: str = '', queues: Iterable[str] | None = None,
          include_broadcast: bool = False, dead_letters: bool = False,
          keep_scheduled: bool = False, dry_run: bool = False,
          progress: Progress | None = None) -> list[DrainedQueue]:
    """Empty queues (every priority bucket), their PELs and their schedules, keeping every
    consumer group.

    ``queues`` defaults to every task queue of the registry (see
    :meth:`Inventory.select`); all names are checked before anything changes.
    ``dead_letters`` empties the queues' dead-letter streams too;
    ``keep_scheduled`` leaves their scheduled messages (delayed delivery) alone.
    ``progress``: see :func:`apply_drain`.
    """
    inventory = Inventory(client, Keys(global_keyprefix))
    plan = [fold_drained([plan_drain_queue(client, inventory.keys, name, kind=inventory.kind(name),
                                           streams=inventory.streams(name), dead_letters=dead_letters,
                                           scheduled=not keep_scheduled) for name in members])
            for members in inventory.sharded(inventory.select(queues, include_broadcast)).values()]
    return plan if dry_run else apply_drain(client, plan, global_keyprefix=global_keyprefix,
                                            progress=progress)


def plan_drain_queue(client: Client, keys: Keys, queue: str, *, kind: str | None = None,
                     streams: list[str] | None = None, dead_letters: bool = False,
                     scheduled: bool = True) -> DrainedQueue:
    """What draining the ``streams`` of one queue (default: every bucket) would remove now.

    With ``scheduled``, the queue's schedule too: its ``ZCARD`` and the server's
    time, read in one transaction. The apply removes the members added up to
    that time (each member carries the server time it was added), so exactly
    the members counted, less those that came due and moved to the stream in
    between (those are not drained: they arrive after the last entry planned).
    """
    streams = streams or keys.streams(queue)
    targets = streams + ([keys.dead_letters(queue)] if dead_letters else [])
    until = {stream: last_entry_id(client, stream) for stream in targets}   # first: counts cover it
    groups = {s: stream_groups(client, s) for s in streams}
    planned = DrainedQueue(queue, kind, sum(client.xlen(s) for s in streams),
                           sum(g['pending'] for gs in groups.values() for g in gs),
                           _names(groups), streams, until=until)
    if dead_letters:
        planned.dead_letters_removed = client.xlen(keys.dead_letters(queue))
    if scheduled:
        schedule = keys.scheduled(queue)   # MULTI with TIME: on the node of the schedule
        planned.scheduled_removed, planned.scheduled_until = plan_stamp(node_client(client, schedule),
                                                                        schedule)
    return planned


def apply_drain(client: Client, plan: list[DrainedQueue], *, global_keyprefix: str = '',
                progress: Progress | None = None) -> list[DrainedQueue]:
    """Drain exactly what ``plan`` (a dry run's result) covers; returns what was removed.

    Each stream is drained in bounded steps (:meth:`Scripts.drain_stream`: at
    most :data:`DRAIN_STEP` entries acked and trimmed per script call), up to
    the last entry the plan saw: entries added since stay. ``progress(n)`` is
    called after each step with the entries it removed or cleared; the total
    is about ``removed + pending_cleared (+ dead_letters_removed, scheduled_removed)``
    of the plan. The schedule is drained of the members added up to the plan's
    time (``scheduled_until``; a plan made by hand without it: up to now).
    """
    keys, scripts = Keys(global_keyprefix), Scripts(client)
    # The messages of these release their uniqueness keys as they go (their dead letters
    # released theirs when dead-lettered). A key of a planned message exists now.
    holding = queues_with_keys(client, keys)
    done = [fold_drained([_apply_drain_queue(client, keys, scripts, holding, part, progress)
                          for part in planned.shards or [planned]]) for planned in plan]
    for result in done:
        logger.info('celery_streams: drained queue %r: %s entries removed, %s pending cleared',
                    result.queue, result.removed, result.pending_cleared)
    return done


def fold_drained(parts: list[DrainedQueue]) -> DrainedQueue:
    """One sharded queue's drain from its shards' (the queue's own first); one part: itself."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]

    def total(counts):
        counts = [c for c in counts if c is not None]
        return sum(counts) if counts else None

    return DrainedQueue(first.queue, first.kind, sum(p.removed for p in parts),
                        sum(p.pending_cleared for p in parts),
                        sorted({g for p in parts for g in p.groups_kept}),
                        [s for p in parts for s in p.streams],
                        total(p.dead_letters_removed for p in parts),
                        {s: u for p in parts for s, u in p.until.items()},
                        total(p.scheduled_removed for p in parts), first.scheduled_until,
                        shards=list(parts))


def _apply_drain_queue(client: Client, keys: Keys, scripts, holding, planned: DrainedQueue,
                       progress: Progress | None) -> DrainedQueue:
    """Drain one queue (or shard) as ``planned``."""
    dead = keys.dead_letters(planned.queue)
    targets = list(planned.until) or planned.streams
    unique = keys.unique_prefix(planned.queue) if planned.queue in holding else None
    counts = {}
    for stream in targets:
        until = planned.until.get(stream, '+')
        if until == '+':   # a plan made by hand: what is there now, not what comes later
            until = last_entry_id(client, stream)
        counts[stream] = scripts.drain_stream(stream, until, progress=progress,
                                              unique_prefix=None if stream == dead else unique)
    drained = [counts[s] for s in planned.streams if s in counts]
    result = DrainedQueue(planned.queue, planned.kind, sum(c[0] for c in drained),
                          sum(c[1] for c in drained),
                          _names({s: stream_groups(client, s) for s in planned.streams}),
                          planned.streams, until=planned.until)
    if dead in counts:
        result.dead_letters_removed = counts[dead][0]
    if planned.scheduled_removed is not None:
        key = keys.scheduled(planned.queue)
        stamp = planned.scheduled_until or plan_stamp(node_client(client, key), key)[1]
        result.scheduled_removed = drain_schedule(scripts, key, stamp, progress=progress,
                                                  unique_prefix=unique)
        result.scheduled_until = stamp
    return result


def _names(groups: Mapping[str, list[dict]]) -> list[str]:
    return sorted({g['name'] for gs in groups.values() for g in gs})


# -- nuke ---------------------------------------------------------------------

@dataclass
class NukeResult:
    """What :func:`nuke` destroyed (or, in a dry run, would destroy)."""

    groups: list[tuple[str, str]] = field(default_factory=list)   # (stream key, group)
    streams: list[str] = field(default_factory=list)
    other_keys: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)                  # dead-letter streams kept
    messages: int = 0   # entries in ``streams`` when planned
    pending: int = 0    # entries pending in ``groups`` when planned
    scheduled: int = 0  # scheduled messages in the schedules (``other_keys``) when planned

    @property
    def deleted_keys(self) -> list[str]:
        return self.streams + self.other_keys


def nuke(client: Client, *, global_keyprefix: str = '', keep_dead_letters: bool = False,
         dry_run: bool = False, progress: Progress | None = None) -> NukeResult:
    """Destroy every consumer group, then delete every key under the prefix.

    Groups go first, with ``XGROUP DESTROY`` (once their PELs are acked in
    bounded steps), so a worker blocked on one gets ``NOGROUP`` at once.
    Workers still running re-create their groups, registry entries and
    bindings on their next read: stop them first for a clean slate.
    ``progress``: see :func:`apply_nuke`.
    """
    keys = Keys(global_keyprefix)
    plan = NukeResult()
    found = scan_keys(client, keys.match_all)
    with client.pipeline(transaction=False) as pipe:
        for key in found:
            pipe.type(key)
        types = [text(t) for t in pipe.execute()]
    for key, kind in zip(found, types):
        info = keys.parse(key)
        if kind == 'none':
            continue
        if kind != 'stream':
            plan.other_keys.append(key)
            if kind == 'zset' and info is not None and info.role == 'scheduled':
                plan.scheduled += client.zcard(key)
        elif keep_dead_letters and info is not None and info.role == 'dead':
            plan.kept.append(key)
        else:
            groups = stream_groups(client, key)
            plan.streams.append(key)
            plan.groups += [(key, g['name']) for g in groups]
            plan.messages += client.xlen(key)
            plan.pending += sum(g['pending'] for g in groups)
    return plan if dry_run else apply_nuke(client, plan, global_keyprefix=global_keyprefix,
                                           progress=progress)


def apply_nuke(client: Client, plan: NukeResult, *, global_keyprefix: str = '',
               progress: Progress | None = None) -> NukeResult:
    """Destroy exactly the groups and delete exactly the keys of ``plan``.

    In bounded steps: each stream is drained first like :func:`apply_drain`
    does (its PELs acked, then its entries trimmed, :data:`DRAIN_STEP` a
    call), so the ``XGROUP DESTROY`` that follows frees no PEL and ``UNLINK``
    deletes small keys. ``progress(n)``: as for :func:`apply_drain` (the total is about
    ``messages + pending`` of the plan).
    """
    scripts = Scripts(client)
    for stream in plan.streams:
        scripts.drain_stream(stream, last_entry_id(client, stream), progress=progress)
    with client.pipeline(transaction=False) as pipe:
        for stream, group in plan.groups:
            pipe.xgroup_destroy(stream, group)
        pipe.execute(raise_on_error=False)   # a group gone meanwhile is fine
    with client.pipeline(transaction=False) as pipe:
        for key in plan.deleted_keys:   # UNLINK: a big key is freed in the background
            pipe.unlink(key)
        pipe.execute()
    logger.info('celery_streams: nuked prefix %r: %s groups, %s streams, %s other keys',
                Keys(global_keyprefix).prefix, len(plan.groups), len(plan.streams),
                len(plan.other_keys))
    return plan


# -- status -------------------------------------------------------------------
# In celery_streams.status (the CLI's and the exporter's collection), public here.

# -- scheduled messages ---------------------------------------------------------------

@dataclass
class ScheduledQueue:
    """The schedule of one queue: how many messages wait for their ETA, and the next ones."""

    queue: str
    key: str
    scheduled: int
    messages: list[ScheduledMessage]

    def as_dict(self) -> dict:
        return asdict(self)


def scheduled(client: Client, *, global_keyprefix: str = '', queues: Iterable[str] | None = None,
              limit: int | None = 10) -> list[ScheduledQueue]:
    """The next ``limit`` scheduled messages (all: None or 0) of each queue, in due order.

    ``queues`` defaults to every queue with a schedule; all names are checked
    first (:class:`UnknownQueue`). Due times are by the server's clock.
    """
    inventory = Inventory(client, Keys(global_keyprefix))
    names = inventory.check_known(queues) if queues else sorted(
        q for q, found in inventory.found.items() if found.scheduled)
    now_ms = server_now_ms(client)
    found = []
    for queue, members in inventory.sharded(names).items():   # a sharded queue: its shards'
        parts = [scheduled_messages(client, inventory.keys, name, limit, now_ms) for name in members]
        messages = sorted((m for _, listed in parts for m in listed), key=lambda m: m.due)
        found.append(ScheduledQueue(queue, inventory.keys.scheduled(queue), sum(n for n, _ in parts),
                                    messages[:limit] if limit else messages))
    return found


# -- held uniqueness keys ------------------------------------------------------------------

def unique_keys(client: Client, *, global_keyprefix: str = '',
                queues: Iterable[str] | None = None) -> list[HeldKey]:
    """Every held uniqueness key (of ``queues``, when given): queue, key, mode, the task id
    that stands for it and the seconds it has left (:mod:`celery_streams.unique`)."""
    return held_keys(client, Keys(global_keyprefix), list(queues) if queues else None)
