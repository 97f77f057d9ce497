"""The key schema: every Redis key the transport owns, in one place.

All keys start with ``<global_keyprefix>celery-streams:``, so they never collide
with kombu's list transport (both can share one Redis during a migration) and
one ``SCAN MATCH <prefix>celery-streams:*`` finds every key the transport owns.

======================================  ======  =========================================
key                                     type    holds
======================================  ======  =========================================
``{P}celery-streams:schema``            string  schema version of the keys below (``1``)
``{P}celery-streams:queues``            hash    queue name -> kind (``task`` / ``fanout``)
``{P}celery-streams:bind:{E}``          set     bindings of exchange E:
                                                ``routing_key SEP pattern SEP queue``
``{P}celery-streams:q:{Q}``             stream  messages of queue Q, one consumer group
                                                (``consumer_group``) shared by all workers
``{P}celery-streams:q:{Q}:p{N}``        stream  messages of queue Q in priority bucket N
                                                (N in ``priority_steps`` but 0), made
                                                when first used
``{P}celery-streams:q:{Q}:dead``        stream  dead letters of queue Q
``{P}celery-streams:q:{Q}:scheduled``   zset    messages of queue Q waiting for their ETA
                                                (delayed delivery): score = due time in ms
                                                (server clock), member =
                                                ``bucket|stamp|token|payload``
``{P}celery-streams:q:{Q}:ledger``      hash    the ledger of queue Q: counters of what
                                                happened to its messages (``published``,
                                                ``acked``...: :mod:`celery_streams.ledger`),
                                                each counted by the script or command
                                                that did it
``{P}celery-streams:{limits}``          hash    global rate limits: ``task:NAME`` or
                                                ``queue:NAME`` -> ``interval_ms burst rate``
                                                (:mod:`celery_streams.limits`)
``{P}celery-streams:{limits}:tat:{F}``  string  rate limit F's next free start, ms
                                                (server clock; expires when idle)
``{P}celery-streams:{shards}``          hash    sharded queues: queue name -> JSON
                                                ``{"count": N, "shards": [Q, Q{S...]}``:
                                                publishers use the first N shards,
                                                consumers read them all
                                                (:mod:`celery_streams.shards`)
``{P}celery-streams:q:{Q}:alive:{C}``   string  present while consumer C of queue Q lives
                                                (its worker renews it; expires after
                                                ``visibility_timeout``)
``{P}celery-streams:q:{Q}:healed:{N}``  string  the last entry id of bucket N's stream
                                                when its lost group was re-created:
                                                entries up to it may have been in
                                                flight (expires after
                                                ``visibility_timeout``)
``{P}celery-streams:q:{Q}:unique:K``    string  held uniqueness key K of queue Q
                                                (:mod:`celery_streams.unique`):
                                                ``mode|where|generation|task id`` of
                                                the task that stands for K; expires
                                                (PX) as that module says
======================================  ======  =========================================

``P`` is kombu's ``global_keyprefix`` (empty by default). The braces around a
queue or exchange name are a Redis Cluster hash tag: every key of one queue
lands in one slot, so cluster support needs no new schema.

A sharded queue Q (:mod:`celery_streams.shards`) is Q itself (shard 0) plus
internal queues named ``Q{S`` (:data:`SHARD_SEP`, then a small integer S): a
brace cannot be in a queue name, so a shard's name never collides with one, and
its hash tag (``{Q{S}``: from the first ``{`` to the first ``}``) gives each
shard a slot of its own. :func:`origin_of` gives the queue of a shard.

A stream entry has the fields ``payload`` (kombu's JSON envelope) and, once a
message was put back after a delivery, ``deliveries`` (how many times it was
delivered before) and ``redelivered``. The count travels with the message
across requeues and reclaims, so ``max_deliveries`` bounds a poison message; a
message put back unstarted (at a worker's shutdown) keeps its count.

The ledger of a queue shares its hash tag, so it lies in the slot of every
other key of the queue and the scripts that do the work count it there; the
scripts are given its key (:meth:`Keys.ledger`, or its affixes to a script
that finds queue names in data). :func:`ledger_of` finds it from any other key
of the queue (a stream, its schedule, its dead letters), as the bounded drains
that are given a key only need.

A member of a schedule (:mod:`celery_streams.scheduler`) is the message's
priority bucket, the server time it was added (``TIME``, 16 digits of µs), a
random token (so equal messages stay distinct) and the payload, joined by
``|``; the consumers move it into the stream of its bucket once due. The
scripts write it with ``schedule_member`` (``scripts/_library.lua``), Python
reads it with :func:`celery_streams.scheduler.parse_member`.
"""
from __future__ import annotations

import re
from typing import Any, NamedTuple

SCHEMA_VERSION = 1
#: kombu's Redis transport default: priorities 0-9 fall into 4 buckets.
DEFAULT_PRIORITY_STEPS = (0, 3, 6, 9)
NAMESPACE = 'celery-streams:'
LEDGER_TAIL = ':ledger'   # after the queue's hash tag
DEAD_TAIL = ':dead'       # after the queue's hash tag
UNIQUE_TAIL = '}:unique:'  # closes the queue's hash tag; the uniqueness key follows
SEP = '\x06\x16'   # the separator kombu's Redis transport uses in bindings
#: Between a sharded queue's name and a shard's suffix (no queue name holds a brace).
SHARD_SEP = '{'

TASK = 'task'
FANOUT = 'fanout'


class KeyInfo(NamedTuple):
    """What a per-queue key is: its queue, its role and the role's detail.

    Roles: ``stream`` (detail: the priority bucket), ``dead`` (detail: None),
    ``scheduled`` (detail: None), ``ledger`` (detail: None), ``alive`` (detail: the consumer name),
    ``healed`` (detail: the bucket) and ``unique`` (detail: the uniqueness key).
    """

    queue: str
    role: str
    detail: Any


class Keys:
    """Builds and parses the keys of one transport under one ``global_keyprefix``.

    Nobody else builds or slices a key string: what a module needs of a key,
    it asks here.
    """

    def __init__(self, global_keyprefix: str = '', priority_steps=DEFAULT_PRIORITY_STEPS):
        self.prefix = (global_keyprefix or '') + NAMESPACE
        self.priority_steps = tuple(sorted(priority_steps))
        self.schema = self.prefix + 'schema'
        self.queues = self.prefix + 'queues'
        #: What every per-queue key starts with.
        self.queue_head = self.prefix + 'q:{'
        self.bindings_head = self.prefix + 'bind:{'
        #: The rate limits (:mod:`celery_streams.limits`); their state shares its hash tag.
        self.limits = self.prefix + '{limits}'
        #: The registry of sharded queues (:mod:`celery_streams.shards`).
        self.shards = self.prefix + '{shards}'

    # -- building -------------------------------------------------------------

    def stream(self, queue: str, bucket: int = 0) -> str:
        """The stream of ``queue`` (of its priority ``bucket``, when not 0)."""
        if bucket:
            return '%s%s}:p%d' % (self.queue_head, queue, bucket)
        return self.queue_head + queue + '}'

    def stream_affixes(self, bucket: int = 0) -> tuple[str, str]:
        """``(head, tail)``: :meth:`stream` of queue Q in ``bucket`` is ``head + Q + tail``.

        For the scripts that find queue names in data (bindings, the
        registry): they are given the affixes and only concatenate.
        """
        return self.queue_head, self.stream('', bucket)[len(self.queue_head):]

    def streams(self, queue: str) -> list[str]:
        """Every stream of ``queue``: bucket 0 first, then the other priority buckets."""
        return [self.stream(queue, bucket) for bucket in self.priority_steps]

    def dead_letters(self, queue: str) -> str:
        """The dead-letter stream of ``queue``."""
        return self.queue_head + queue + '}' + DEAD_TAIL

    def scheduled(self, queue: str) -> str:
        """The schedule of ``queue``: messages waiting for their ETA (a sorted set)."""
        return self.queue_head + queue + '}:scheduled'

    def scheduled_affixes(self) -> tuple[str, str]:
        """``(head, tail)``: :meth:`scheduled` of queue Q is ``head + Q + tail`` (see
        :meth:`stream_affixes`)."""
        return self.queue_head, self.scheduled('')[len(self.queue_head):]

    def ledger(self, queue: str) -> str:
        """The ledger of ``queue``: a hash of counters (:mod:`celery_streams.ledger`)."""
        return self.queue_head + queue + '}' + LEDGER_TAIL

    def ledger_affixes(self) -> tuple[str, str]:
        """``(head, tail)``: :meth:`ledger` of queue Q is ``head + Q + tail`` (see
        :meth:`stream_affixes`)."""
        return self.queue_head, self.ledger('')[len(self.queue_head):]

    def alive_prefix(self, queue: str) -> str:
        """Liveness keys of the consumers of ``queue`` are this plus the consumer name."""
        return self.queue_head + queue + '}:alive:'

    def alive(self, queue: str, consumer: str) -> str:
        return self.alive_prefix(queue) + consumer

    def healed(self, queue: str, bucket: int = 0) -> str:
        """The healed mark of a stream of ``queue`` (see the ``create_group`` script)."""
        return '%s%s}:healed:%d' % (self.queue_head, queue, bucket)

    def limit_state(self, field: str) -> str:
        """The state of rate limit ``field`` (``task:NAME``, ``queue:NAME``): its next free
        start. In the slot of :attr:`limits`, so one script reads both."""
        return self.limits + ':tat:' + field

    def unique_prefix(self, queue: str) -> str:
        """The held uniqueness keys of ``queue`` are this plus the key
        (:mod:`celery_streams.unique`)."""
        return self.queue_head + queue + UNIQUE_TAIL

    def unique(self, queue: str, key: str) -> str:
        return self.unique_prefix(queue) + key

    @property
    def match_unique(self) -> str:
        """A SCAN pattern matching every held uniqueness key."""
        return glob_escape(self.queue_head) + '*' + glob_escape(UNIQUE_TAIL) + '*'

    def bindings(self, exchange: str) -> str:
        """The set of bindings of ``exchange``."""
        return self.bindings_head + exchange + '}'

    # -- SCAN patterns --------------------------------------------------------

    @property
    def match_all(self) -> str:
        """A SCAN pattern matching every key of this transport, and nothing else."""
        return glob_escape(self.prefix) + '*'

    @property
    def match_queue_keys(self) -> str:
        """A SCAN pattern matching every per-queue key (streams, dead letters, schedules,
        liveness)."""
        return glob_escape(self.queue_head) + '*'

    @property
    def match_bindings(self) -> str:
        """A SCAN pattern matching every binding set."""
        return glob_escape(self.bindings_head) + '*}'

    # -- parsing --------------------------------------------------------------

    def parse(self, key: str) -> KeyInfo | None:
        """What the per-queue ``key`` is, or None for any other key."""
        if not key.startswith(self.queue_head):
            return None
        body = key[len(self.queue_head):]
        if UNIQUE_TAIL in body:   # first: a uniqueness key may end with anything
            queue, _, unique_key = body.partition(UNIQUE_TAIL)
            return KeyInfo(queue, 'unique', unique_key)
        if body.endswith('}'):
            return KeyInfo(body[:-1], 'stream', 0)
        if '}:alive:' in body:
            queue, _, consumer = body.partition('}:alive:')
            return KeyInfo(queue, 'alive', consumer)
        if '}:healed:' in body:
            queue, _, bucket = body.partition('}:healed:')
            return KeyInfo(queue, 'healed', int(bucket)) if bucket.isdigit() else None
        if body.endswith('}:dead'):
            return KeyInfo(body[:-len('}:dead')], 'dead', None)
        if body.endswith('}' + LEDGER_TAIL):
            return KeyInfo(body[:-len('}' + LEDGER_TAIL)], 'ledger', None)
        if body.endswith('}:scheduled'):
            return KeyInfo(body[:-len('}:scheduled')], 'scheduled', None)
        match = _BUCKET.match(body)
        if match:
            return KeyInfo(match.group(1), 'stream', int(match.group(2)))
        return None

    def parse_stream(self, stream_key: str) -> tuple[str, int]:
        """``(queue, bucket)`` of a queue stream key (inverse of :meth:`stream`)."""
        info = self.parse(stream_key)
        if info is None or info.role != 'stream':
            raise ValueError('not a queue stream key: %r' % stream_key)
        return info.queue, info.detail

    def parse_bindings(self, key: str) -> str | None:
        """The exchange of a binding-set key, or None for any other key."""
        if key.startswith(self.bindings_head) and key.endswith('}'):
            return key[len(self.bindings_head):-1]
        return None


_BUCKET = re.compile(r'(.*)\}:p(\d+)$', re.S)


def glob_escape(text: str) -> str:
    """Escape the characters Redis' glob-style MATCH treats specially."""
    return ''.join('\\' + c if c in '*?[]\\' else c for c in text)


def ledger_of(key: str) -> str:
    """The ledger of the queue of per-queue ``key`` (a stream, a schedule, dead letters): the
    key up to the ``}`` that closes the queue's hash tag (none follows it), then ``:ledger``."""
    return key[:key.rindex('}') + 1] + LEDGER_TAIL


def shard_name(queue: str, suffix: int) -> str:
    """The name of the shard of sharded ``queue`` with ``suffix`` (shard 0 is ``queue``)."""
    return '%s%s%d' % (queue, SHARD_SEP, suffix)


def origin_of(name: str) -> str:
    """The queue a shard belongs to (``name`` itself for any other queue)."""
    return name.partition(SHARD_SEP)[0] if SHARD_SEP in name else name


def is_dead_letters(key: str) -> bool:
    """Whether per-queue ``key`` is a queue's dead-letter stream (see :meth:`Keys.dead_letters`)."""
    return key.endswith('}' + DEAD_TAIL)


def binding_member(routing_key: str, pattern: str, queue: str) -> str:
    return SEP.join([routing_key or '', pattern or '', queue or ''])


def parse_binding(member: bytes | str) -> tuple[str, str, str]:
    if isinstance(member, bytes):
        member = member.decode()
    routing_key, pattern, queue = member.split(SEP)
    return routing_key, pattern, queue


#: Every command the transport sends (workers and publishers), for a Redis ACL.
COMMANDS = (
    'ping', 'time', 'client|setname', 'multi', 'exec', 'get', 'set', 'del', 'exists', 'pexpire',
    'hset', 'hsetnx', 'hdel', 'hkeys', 'hincrby', 'hgetall', 'hget', 'pttl', 'sadd', 'srem', 'smembers',
    'xadd', 'xreadgroup', 'xack', 'xdel', 'xlen', 'xrange', 'xrevrange', 'xtrim', 'xpending', 'xclaim',
    'xgroup|create', 'xgroup|delconsumer', 'xinfo|groups', 'xinfo|consumers', 'xinfo|stream',
    'zadd', 'zrange', 'zrangebyscore', 'zrem', 'zscan',   # delayed delivery (inside its scripts)
    'zcard', 'unlink',                           # purge of a schedule
    'eval', 'evalsha', 'script|load', 'script|exists', 'scan',
    'watch', 'unwatch',                          # placing the shards of a sharded queue
)


def acl_rules(global_keyprefix: str = '') -> list[str]:
    """``ACL SETUSER`` rules that allow the transport and nothing else.

    Example: ``ACL SETUSER celery on >secret`` followed by these rules.
    """
    return ['~' + Keys(global_keyprefix).match_all, '-@all', *('+' + c for c in COMMANDS)]
