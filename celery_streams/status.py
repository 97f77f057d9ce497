"""What ``celery streams status`` and the exporter see: each queue's counts, groups and consumers.

:func:`status` reads the :class:`~celery_streams.inventory.Inventory` (the
registry, one ``SCAN``), then each queue's streams, groups and consumers. Keys
vanish while it reads (auto-delete queues, ``x-expires``, ``queue_delete``,
``nuke``): a stream deleted since the scan is skipped, and so is a group
destroyed since ``XINFO GROUPS`` (``no such key``, ``NOGROUP``); a queue
whose streams were all the scan found of it (no registry entry, dead letters
or schedule) is left out once they are gone. The rest is reported: one queue
going never fails the whole collection.

A queue is ``internal`` when Celery made it for itself (:func:`is_internal`):
a worker's remote-control mailbox (``*.celery.pidbox``), a reply queue
(``*.reply.celery.pidbox``, a result backend's ``rpc://`` queue named by a
uuid) or an event receiver's queue (``celeryev.*``). A consumer is ``stale``
when it is still in its group but its liveness key expired (a dead worker:
the next reclaim hands its pending entries to a live one).
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Iterable, Mapping

import redis

from . import limits
from .inventory import Inventory, age_seconds, server_now_ms, stream_groups, stream_info
from .keys import FANOUT, Keys
from .slots import Client
from .wire import text

#: Celery's uuids: the names of ``rpc://`` result queues.
_UUID = re.compile(r'^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$')
#: What a server says of a stream deleted, or a group destroyed, since it was found.
_GONE = ('no such key', 'nogroup')


def is_internal(queue: str) -> bool:
    """Whether Celery made ``queue`` for itself: a mailbox, a reply or an event queue."""
    return queue.endswith('.pidbox') or queue.startswith('celeryev.') or bool(_UUID.match(queue))


def is_gone(error: BaseException) -> bool:
    """Whether ``error`` says the key or the group went away meanwhile."""
    message = str(error).lower()
    return isinstance(error, redis.ResponseError) and any(word in message for word in _GONE)


@dataclass
class ConsumerStatus:
    """One consumer of one group; ``alive`` is None on broadcast queues (they keep no key)."""

    name: str
    pending: int
    idle_ms: int
    alive: bool | None        # liveness key present; None on broadcast queues


@dataclass
class GroupStatus:
    """One consumer group of one stream: counts, consumers, age of its oldest pending entry."""

    name: str
    stream: str
    bucket: int
    consumers: list[ConsumerStatus]
    pending: int
    last_delivered_id: str
    entries_read: int | None   # None before Redis 7.0
    lag: int | None            # None before Redis 7.0, or when unknown
    oldest_pending_age: float | None


@dataclass
class QueueStatus:
    """One queue, summed over its priority buckets; ``waiting`` as the transport counts it."""

    name: str
    kind: str | None
    stream: str
    streams: list[str]
    exists: bool
    length: int
    waiting: int | None
    pending: int
    oldest_pending_age: float | None
    dead_letters: int
    groups: list[GroupStatus]
    entries_added: int | None = None   # ever added to its streams (None before Redis 7.0)
    #: Consumers with a liveness key on the queue: alive, whether or not they have read it yet
    #: (XINFO CONSUMERS lists a consumer only once it has read an entry).
    alive_consumers: list[str] = field(default_factory=list)
    scheduled: int = 0                 # messages waiting for their ETA (delayed delivery)
    #: Seconds (server clock) until the first scheduled message is due (negative: overdue,
    #: no worker moved it yet); None when none is scheduled.
    next_due_in: float | None = None
    internal: bool = False             # made by Celery for itself (see :func:`is_internal`)
    #: Live consumers: with a liveness key (task queues), in the group (broadcast queues).
    consumers: int = 0
    #: Consumers of the group whose liveness key expired: dead workers not yet forgotten.
    stale_consumers: list[str] = field(default_factory=list)
    #: A sharded queue (:mod:`celery_streams.shards`): each shard's counts (the queue's are
    #: their sums); empty for any other queue.
    shards: list[dict] = field(default_factory=list)


@dataclass
class Status:
    """What :func:`status` found; ``as_dict()`` is the ``status --json`` document (less ``broker``)."""

    server: dict
    global_keyprefix: str
    namespace: str
    consumer_group: str
    schema: int | None
    queues: list[QueueStatus]
    #: The global rate limits (:func:`celery_streams.limits.state`: limit, rate, burst, held,
    #: clear_in).
    rate_limits: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def status(client: Client, *, global_keyprefix: str = '', consumer_group: str = 'celery',
           queues: Iterable[str] | None = None) -> Status:
    """Describe the queues under the prefix (all of them, or those of ``queues``)."""
    inventory = Inventory(client, Keys(global_keyprefix))
    names = inventory.check_known(queues) if queues else inventory.all_queues()
    now_ms = server_now_ms(client)
    schema = client.get(inventory.keys.schema)
    keys = inventory.keys
    found = [fold_shards(queue, keys.stream(queue), [
                 queue_status(client, inventory, name, consumer_group, now_ms) for name in members])
             for queue, members in inventory.sharded(names).items()]
    return Status(server=server_version(client), global_keyprefix=global_keyprefix or '',
                  namespace=keys.prefix, consumer_group=consumer_group,
                  schema=int(schema) if schema is not None else None,
                  queues=[q for q in found if q is not None],
                  rate_limits=limits.state(client, keys, limits.read(client, keys).values(), now_ms))


def server_version(client: Client) -> dict:
    info = client.info('server')
    flavor = 'valkey' if 'valkey_version' in info else 'redis'
    return {'flavor': flavor, 'version': str(info.get('valkey_version') or info['redis_version'])}


@dataclass
class _Sums:
    """What :func:`queue_status` adds up over a queue's streams."""

    streams: list[str] = field(default_factory=list)
    groups: list[GroupStatus] = field(default_factory=list)
    length: int = 0
    pending: int = 0
    waiting: int | None = 0
    added: int | None = 0


def queue_status(client: Client, inventory: Inventory, queue: str, consumer_group: str,
                 now_ms: int) -> QueueStatus | None:
    """``queue``'s status; None when it vanished: not in the registry, and its streams, all
    the scan found of it, deleted since."""
    kind = inventory.kind(queue)
    found = inventory.queue_keys(queue)
    alive = None if kind == FANOUT else set(found.alive)
    sums = _Sums()
    for bucket in sorted(found.streams):
        add_stream(client, sums, found.streams[bucket], bucket, kind, consumer_group, alive, now_ms)
    scheduled, next_due_in = schedule_of(client, found.scheduled, now_ms)
    dead = client.xlen(found.dead_letters) if found.dead_letters else 0
    if kind is None and not (sums.streams or found.dead_letters or found.scheduled):
        return None   # its streams were all it had, and they are gone
    own = [c for g in sums.groups if g.name == consumer_group for c in g.consumers]
    ages = [g.oldest_pending_age for g in sums.groups if g.oldest_pending_age is not None]
    return QueueStatus(
        name=queue, kind=kind, stream=inventory.keys.stream(queue), streams=sums.streams,
        exists=bool(sums.streams), length=sums.length, waiting=sums.waiting, pending=sums.pending,
        oldest_pending_age=max(ages) if ages else None, dead_letters=dead, groups=sums.groups,
        entries_added=sums.added, alive_consumers=sorted(found.alive), scheduled=scheduled,
        next_due_in=next_due_in, internal=is_internal(queue),
        consumers=len({c.name for c in own}) if alive is None else len(alive),
        stale_consumers=sorted({c.name for c in own if c.alive is False}))


def fold_shards(queue: str, stream: str, parts: list[QueueStatus | None]) -> QueueStatus | None:
    """The status of ``queue`` from those of its shards (``parts``, the queue itself first):
    their counts summed, their groups and streams listed, each shard's counts in ``shards``."""
    found = [part for part in parts if part is not None]
    if len(parts) == 1 or not found:
        return parts[0]
    ages = [p.oldest_pending_age for p in found if p.oldest_pending_age is not None]
    dues = [p.next_due_in for p in found if p.next_due_in is not None]
    alive = sorted({c for p in found for c in p.alive_consumers})
    return QueueStatus(
        name=queue, kind=found[0].kind, stream=stream, streams=[s for p in found for s in p.streams],
        exists=any(p.exists for p in found), length=sum(p.length for p in found),
        waiting=_sum_or_none(p.waiting for p in found), pending=sum(p.pending for p in found),
        oldest_pending_age=max(ages) if ages else None,
        dead_letters=sum(p.dead_letters for p in found), groups=[g for p in found for g in p.groups],
        entries_added=_sum_or_none(p.entries_added for p in found), alive_consumers=alive,
        scheduled=sum(p.scheduled for p in found), next_due_in=min(dues) if dues else None,
        internal=is_internal(queue), consumers=len(alive) or max(p.consumers for p in found),
        stale_consumers=sorted({c for p in found for c in p.stale_consumers}),
        shards=[{'name': p.name, 'stream': p.stream, 'length': p.length, 'waiting': p.waiting,
                 'pending': p.pending, 'scheduled': p.scheduled, 'dead_letters': p.dead_letters,
                 'consumers': p.consumers} for p in found])


def _sum_or_none(values: Iterable[int | None]) -> int | None:
    values = list(values)
    return None if any(v is None for v in values) else sum(v for v in values if v is not None)


def add_stream(client: Client, sums: _Sums, stream: str, bucket: int, kind: str | None,
               consumer_group: str, alive: set | None, now_ms: int) -> None:
    """Add one stream of a queue to ``sums``; nothing when it was deleted since the scan."""
    info = stream_info(client, stream)
    if not info:
        return
    length, ever = info['length'], info.get('entries-added')
    described = [g for g in (group_status(client, stream, bucket, g, alive, now_ms)
                             for g in stream_groups(client, stream)) if g is not None]
    own = next((g for g in described if g.name == consumer_group), None)
    own_pending = own.pending if own else 0
    if kind == FANOUT:   # read entries stay until trimmed: what the group has not read yet
        lag = own.lag if own else None
        sums.waiting = None if lag is None or sums.waiting is None else sums.waiting + min(lag, length)
    else:
        sums.waiting = (sums.waiting or 0) + max(length - own_pending, 0)
    sums.added = None if ever is None or sums.added is None else sums.added + ever
    sums.streams.append(stream)
    sums.groups += described
    sums.length += length
    sums.pending += own_pending


def schedule_of(client: Client, key: str | None, now_ms: int) -> tuple[int, float | None]:
    """``(scheduled messages, seconds until the first is due)`` of a schedule (0, None: none)."""
    if not key:
        return 0, None
    with client.pipeline(transaction=False) as pipe:
        pipe.zcard(key)
        pipe.zrange(key, 0, 0, withscores=True)
        scheduled, first = pipe.execute()
    return scheduled, round((first[0][1] - now_ms) / 1000, 3) if first else None


def group_status(client: Client, stream: str, bucket: int, group: Mapping,
                 alive: set | None, now_ms: int) -> GroupStatus | None:
    """``alive``: the consumers with a liveness key, None where consumers keep none (broadcast).
    None when the stream or the group went away since ``XINFO GROUPS``."""
    name = group['name']
    with client.pipeline(transaction=False) as pipe:
        pipe.xinfo_consumers(stream, name)
        pipe.xpending(stream, name)
        replies = pipe.execute(raise_on_error=False)
    for reply in replies:
        if isinstance(reply, Exception):
            if is_gone(reply):
                return None
            raise reply
    consumers, summary = replies
    oldest = summary.get('min') if summary.get('pending') else None
    return GroupStatus(
        name=name, stream=stream, bucket=bucket,
        consumers=[consumer_status(c, alive) for c in consumers],
        pending=group['pending'], last_delivered_id=text(group['last-delivered-id']),
        entries_read=group.get('entries-read'), lag=group.get('lag'),
        oldest_pending_age=age_seconds(text(oldest), now_ms) if oldest else None)


def consumer_status(consumer: Mapping, alive: set | None) -> ConsumerStatus:
    name = text(consumer['name'])
    return ConsumerStatus(name=name, pending=consumer['pending'], idle_ms=consumer['idle'],
                          alive=None if alive is None else name in alive)
