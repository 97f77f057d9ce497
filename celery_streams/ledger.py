"""The ledger: per-queue counters of what happened to its messages, and the audit that balances them.

Each queue has one hash, ``{P}celery-streams:q:{Q}:ledger``
(:meth:`~celery_streams.keys.Keys.ledger`, in the queue's hash tag: the slot
of its streams), whose counters are incremented by the very script or command
that does the work, in the same call:

=================  ==============================================================
counter            counted by
=================  ==============================================================
``published``      every append of a publish: the hot path's ``XADD`` (its
                   ``HINCRBY`` follows in the same write), ``append``, ``route``
                   and ``schedule`` (a scheduled message is published when it is
                   scheduled; ``promote`` counts nothing), ``requeue_dead`` (a
                   dead letter requeued by an operator comes back: published again)
``delivered``      entries read for a consumer (the reader's reads; counted by the
                   consumer, written with its next acks)
``redelivered``    entries taken over from a dead consumer (``reclaim``)
``acked``          the ``ack`` script: what its ``XACK`` acked (an entry acked
                   before, drained or taken over counts 0); no-ack consumers'
                   entries deleted when read
``rejected``       ``reject(requeue=False)``: acked, gone (the ``ack`` script)
``requeued``       ``reject(requeue=True)`` (``restore``, attempted): the same
                   message back at the tail -- not published again
``restored``       put back unstarted (``restore``: a warm shutdown, a cancel)
``dead_lettered``  moved to the dead letters (the dead-letter write's transaction)
``revived``        dead letters requeued by an operator (also in ``published``)
``dead_purged``    dead letters purged by an operator
``expired``        dropped when read: ``x-message-ttl``, a message ``expiration``
``drained``        removed by a drain or a purge (the ``drain`` and
                   ``drain_scheduled`` scripts)
``dropped``        trimmed away by ``MAXLEN`` (broadcast queues, ``fanout_maxlen``), or
                   a scheduled task a debounce replaced (``unique``)
``throttled``      held back by a rate limit (``hold``): out of the stream into the
                   schedule until its reserved start -- the same message, still
                   counted where it is (a flow counter, like ``delivered``)
=================  ==============================================================

The audit (:func:`audit`) reads every counter and where the queue's messages
are now, in one transaction per queue, and checks, for a task queue::

    published = acked + rejected + dead_lettered + expired + drained + dropped
                + waiting + pending + scheduled

``waiting``: entries in the queue's streams not delivered (``XLEN`` less the
pending ones); ``pending``: delivered, not acked (the group's PEL);
``scheduled``: in the queue's schedule. A message is counted ``published``
once however often it is redelivered, requeued or restored (those put the
same message back); a dead letter requeued by an operator is published again
(it left once, as ``dead_lettered``). ``unaccounted`` is the difference:
``published`` less everything found or counted out. Broadcast queues keep
their read entries in the stream until ``MAXLEN`` trims them, so their
counters are shown and not balanced.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Iterable

from .inventory import registered_queues, scan_keys
from .keys import FANOUT, Keys, origin_of
from .slots import Client, node_client
from .wire import text

#: Every counter of a ledger, in the order the audit shows them.
COUNTERS = ('published', 'delivered', 'redelivered', 'acked', 'rejected', 'requeued', 'restored',
            'dead_lettered', 'revived', 'dead_purged', 'expired', 'drained', 'dropped', 'throttled')
#: The counters of the messages that left the queue for good: terms of the balance.
GONE = ('acked', 'rejected', 'dead_lettered', 'expired', 'drained', 'dropped')

#: What can explain a difference, by its sign (more published than found, or fewer).
EXPLAIN_MISSING = (
    'entries deleted behind the transport\'s back (XDEL, XTRIM, DEL of a stream or schedule)',
    'a drain, purge or dead-letter write by a version without the ledger',
    'a queue stream that expired (x-expires) while its ledger lived on',
    'writes lost by Redis after a failover or a restart without AOF (the counter survived)',
    'acks or drains while Redis was full (maxmemory refuses the HINCRBY, not the ack)',
)
EXPLAIN_EXTRA = (
    'messages published before the ledger existed (an upgrade) or by a version without it',
    'a ledger deleted or reset (a nuke deletes it; DEL by hand) while messages stayed',
    'entries added by hand (XADD, ZADD)',
    'a publish between its XADD and its HINCRBY (the hot path writes both in one write): '
    'audit again',
    'a publish whose XADD filled Redis (maxmemory then refuses the HINCRBY behind it; the '
    'publish returns)',
)


@dataclass
class QueueAudit:
    """The ledger of one queue and where its messages are now."""

    queue: str
    kind: str | None
    counters: dict[str, int] = field(default_factory=dict)
    waiting: int = 0
    pending: int = 0
    scheduled: int = 0
    dead_letters: int = 0

    def count(self, name: str) -> int:
        return self.counters.get(name, 0)

    @property
    def balanced_kind(self) -> bool:
        """Whether the balance applies (a task queue; not a broadcast queue)."""
        return self.kind != FANOUT

    @property
    def accounted(self) -> int:
        """Messages counted out or found now."""
        return sum(self.count(name) for name in GONE) + self.waiting + self.pending + self.scheduled

    @property
    def unaccounted(self) -> int | None:
        """``published`` less :attr:`accounted` (None for a broadcast queue)."""
        return self.count('published') - self.accounted if self.balanced_kind else None

    @property
    def explanations(self) -> tuple[str, ...]:
        """What could explain :attr:`unaccounted`, when it is not 0."""
        if not self.unaccounted:
            return ()
        return EXPLAIN_MISSING if self.unaccounted > 0 else EXPLAIN_EXTRA

    def as_dict(self) -> dict:
        found = asdict(self)
        found['counters'] = {name: self.count(name) for name in COUNTERS}
        found.update(accounted=self.accounted, unaccounted=self.unaccounted,
                     explanations=list(self.explanations))
        return found


def queue_streams(client: Client, keys: Keys) -> dict[str, list[str]]:
    """Queue -> its streams, for every queue with a stream, schedule, dead letters or ledger
    under the prefix (one ``SCAN``)."""
    found: dict[str, list[str]] = {}
    for key in scan_keys(client, keys.match_queue_keys):
        info = keys.parse(key)
        if info is None or info.role not in ('stream', 'dead', 'scheduled', 'ledger'):
            continue
        streams = found.setdefault(info.queue, [])
        if info.role == 'stream':
            streams.append(key)
    return found


def read_queue(client: Client, keys: Keys, queue: str, streams: list[str], *,
               kind: str | None = None, consumer_group: str = 'celery') -> QueueAudit:
    """The ledger of ``queue`` and its state, read in one transaction (on the node that owns the
    queue's slot, on a Redis Cluster): the counters and what they count, at one instant."""
    node = node_client(client, keys.ledger(queue))
    with node.pipeline(transaction=True) as pipe:
        pipe.hgetall(keys.ledger(queue))
        pipe.zcard(keys.scheduled(queue))
        pipe.xlen(keys.dead_letters(queue))
        for stream in streams:
            pipe.xlen(stream)
            pipe.execute_command('XPENDING', stream, consumer_group)
        replies = pipe.execute(raise_on_error=False)
    counters, scheduled, dead = replies[:3]
    found = QueueAudit(queue, kind, {text(k): int(v) for k, v in counters.items()},
                       scheduled=scheduled, dead_letters=dead)
    for length, pending in zip(replies[3::2], replies[4::2]):
        held = 0 if isinstance(pending, Exception) else int(pending['pending'])
        found.pending += held
        found.waiting += length - held
    return found


def audit(client: Client, *, global_keyprefix: str = '', queues: Iterable[str] | None = None,
          consumer_group: str = 'celery') -> list[QueueAudit]:
    """The audit of every queue under the prefix (or of ``queues``), by name; a sharded
    queue's (:mod:`celery_streams.shards`) sums its shards'."""
    keys = Keys(global_keyprefix)
    found = queue_streams(client, keys)
    kinds = registered_queues(client, keys)
    every = sorted(set(found) | set(kinds))
    names = every if queues is None else list(queues)
    members: dict[str, list[str]] = {origin_of(name): [] for name in names}
    for name in dict.fromkeys([*names, *(n for n in every if origin_of(n) in members)]):
        members[origin_of(name)].append(name)
    return [_fold(queue, [read_queue(client, keys, name, found.get(name, []), kind=kinds.get(name),
                                     consumer_group=consumer_group) for name in parts])
            for queue, parts in members.items()]


def _fold(queue: str, parts: list[QueueAudit]) -> QueueAudit:
    """One queue's audit from its shards' (itself alone: its own)."""
    if len(parts) == 1:
        return parts[0]
    counters: dict[str, int] = {}
    for part in parts:
        for name, value in part.counters.items():
            counters[name] = counters.get(name, 0) + value
    return QueueAudit(queue, parts[0].kind, counters, sum(p.waiting for p in parts),
                      sum(p.pending for p in parts), sum(p.scheduled for p in parts),
                      sum(p.dead_letters for p in parts))
