"""The queue table of a channel: one record per queue, its declaration, bindings and healing.

Declaring a queue creates its consumer group (``XGROUP CREATE ... 0
MKSTREAM``; ``BUSYGROUP`` from a second declarer is success) and its registry
entry. Bindings live in Redis (one set per exchange), so a binding written by
one process routes the publishes of every other: Celery's reply queues and
broadcast queues depend on it.

What this process declared is also kept here (:class:`QueueRecord`), because
Redis may lose it -- a nuke, an ``x-expires`` that fired, a ``DEL``: a
consumer whose group vanished calls :meth:`QueueTable.heal`, which re-creates
the group at id ``0`` (``$`` for broadcast queues, which never replay old
broadcasts), the registry entry and the bindings, and logs one line.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from time import monotonic

import redis

from . import errors, wire
from .errors import one_line
from .bindings import Bindings
from .depth import depth_commands, depth_of
from .keys import FANOUT, SCHEMA_VERSION, TASK, Keys, binding_member, glob_escape
from .wire import text

logger = logging.getLogger(__name__)


@dataclass
class QueueRecord:
    """What this process knows of one queue."""

    name: str
    expires: int | None = None          # x-expires, ms: the streams expire when unused
    message_ttl: int | None = None      # x-message-ttl, ms
    auto_delete: bool = False
    fanout_exchange: str | None = None  # bound to this fanout exchange: a broadcast queue
    deleted: bool = False               # deleted by this process: never healed
    consumed: bool = False              # this channel consumed from it
    no_ack: bool = False                # its consumer reads without acks (pidbox)

    @property
    def is_broadcast(self) -> bool:
        return self.fanout_exchange is not None


class QueueTable:
    """The queues of one channel: records, declarations, bindings and healing.

    Its collaborators: the channel's ``client`` (redis-py), ``dispatcher``
    (hot commands in one write) and ``pipe`` (group creations written without
    waiting, shared with the QoS's acks); the ``scripts``; kombu's broker
    ``state`` (this process's exchanges and bindings) and ``typeof`` (an
    exchange's type); ``scripts_span_keys`` (a script may touch the registry and
    the streams together: not on a Redis Cluster).
    """

    def __init__(self, *, client, dispatcher, pipe, scripts, keys: Keys, options, state, typeof,
                 scripts_span_keys: bool = True):
        self.client = client
        self.dispatcher = dispatcher
        self.pipe = pipe
        self.scripts = scripts
        self.keys = keys
        self.group = options.consumer_group
        self.state = state
        self.typeof = typeof
        self.scripts_span_keys = scripts_span_keys
        self.healed_mark_ms = options.healed_mark_ms
        #: stream -> (ms, seq) of its healed mark: entries up to it may have been in flight.
        self.healed_marks: dict = {}
        #: Streams a full Redis (maxmemory) refused to create, or to give the group: left out
        #: of reads (a main stream: its whole queue, see :meth:`is_deleted`), and created once
        #: Redis has room again (see :meth:`retry_refused`).
        self.refused: set = set()
        #: Queues whose registry entry or bindings a full Redis refused: written once it has
        #: room again (:meth:`retry_refused`).
        self.unwritten: set = set()
        #: The expiry given to a broadcast queue that is auto-delete and has none:
        #: its consumers renew it, so the queue of a killed worker goes away.
        self.orphan_expiry_ms = options.orphan_expiry_ms
        #: A consumer without a liveness key (no-ack) that read this recently lives.
        self.idle_consumer_ms = options.idle_consumer_ms
        self._records: dict[str, QueueRecord] = {}
        self._expiry_refreshed_at = 0.0
        #: Group creations :meth:`start_groups` wrote whose replies were not read yet.
        self.groups_unconfirmed = 0
        #: Changes when a queue is deleted, declared again or bound to a fanout exchange:
        #: what a read plan depends on (see :meth:`celery_streams.reader.Reader.plan`).
        self.version = 0
        #: The bindings of exchanges to these queues.
        self.bindings = Bindings(client=client, dispatcher=dispatcher, keys=keys, state=state,
                                 typeof=typeof, mark_broadcast=self.mark_broadcast,
                                 unwritten=self.unwritten)

    def __getitem__(self, queue: str) -> QueueRecord:
        record = self._records.get(queue)
        if record is None:
            record = self._records[queue] = QueueRecord(queue)
        return record

    def get(self, queue: str) -> QueueRecord | None:
        return self._records.get(queue)

    def expires(self, queue: str) -> int | None:
        record = self._records.get(queue)
        return record.expires if record else None

    def is_broadcast(self, queue: str) -> bool:
        record = self._records.get(queue)
        return bool(record and record.is_broadcast)

    def is_deleted(self, queue: str) -> bool:
        """Whether ``queue`` is not to be read: this process deleted it, or a full Redis
        refused to create its main stream (it is read once Redis made it)."""
        record = self._records.get(queue)
        return bool(record and record.deleted) or (
            bool(self.refused) and self.keys.stream(queue) in self.refused)

    def consumed(self) -> list[str]:
        """Queues this channel consumed from and did not delete."""
        return [r.name for r in self._records.values() if r.consumed and not r.deleted]

    # -- declaring ------------------------------------------------------------

    def declare(self, queue: str, auto_delete: bool = False, arguments=None, internal=False) -> int:
        """Create ``queue``'s main stream and group (at ``0``) and register it; return how
        many messages it holds for a consumer (kombu's ``queue_declare`` message count).
        ``internal``: a shard of a sharded queue (:mod:`celery_streams.shards`), whose
        name holds a brace.

        One packed write with the count's commands: a consumer of 100 queues
        declared them in 38 ms with a redis-py pipeline for each and another
        for the count.
        """
        if '}' in queue or ('{' in queue and not internal):
            raise errors.ConfigurationError(
                'queue name %r: braces are not allowed (they delimit the queue in its Redis keys)'
                % queue)
        arguments = arguments or {}
        record = self[queue]
        if record.deleted:
            record.deleted = False
            self.version += 1
        record.auto_delete = record.auto_delete or bool(auto_delete)
        record.expires = _milliseconds(arguments.get('x-expires'))
        record.message_ttl = _milliseconds(arguments.get('x-message-ttl'))
        commands = [('XGROUP', 'CREATE', self.keys.stream(queue), self.group, '0', 'MKSTREAM'),
                    ('HSETNX', self.keys.queues, queue, TASK)]
        if record.expires is not None:
            commands += [('PEXPIRE', key, record.expires)
                         for key in (*self.keys.streams(queue), self.keys.ledger(queue))]
        counting = depth_commands(self.keys, self.group, queue)
        replies = wire.calls(self.dispatcher, commands + counting)
        results, counts = replies[:len(commands)], replies[len(commands):]
        if any(errors.is_out_of_memory(r) for r in results if isinstance(r, Exception)):
            self._refused_declaration(queue)
            return depth_of(counts)
        raise_unless_busygroup(results)
        if self.unwritten:
            self.retry_refused([])   # Redis has room again
        return depth_of(counts)

    def _refused_declaration(self, queue: str) -> None:
        """A full Redis refused the declaration of ``queue`` (it refuses every write, even
        one with nothing to do): what is missing in Redis is written once it has room."""
        if self._declared_in_redis(queue):
            return
        stream = self.keys.stream(queue)
        if not self._has_group(stream):
            self._refuse(stream)
        if queue not in self.unwritten:
            self.unwritten.add(queue)
            errors.say_full(logger, 'queue %r not declared', queue)

    def _declared_in_redis(self, queue: str) -> bool:
        """Whether ``queue`` is registered and its main stream has the group (read-only checks)."""
        return bool(self.client.hexists(self.keys.queues, queue)) and self._has_group(self.keys.stream(queue))

    def _has_group(self, stream: str) -> bool:
        try:
            groups = self.client.xinfo_groups(stream)
        except redis.ResponseError:   # no such stream
            return False
        return any(text(group['name']) == self.group for group in groups)

    def others_consume(self, queue: str, me: str) -> bool:
        """Whether a consumer other than ``me`` lives on ``queue``.

        Alive: it has a liveness key, or it read within ``idle_consumer_ms``
        (no-ack consumers keep no key). An auto-delete queue goes only with
        its last consumer, as in AMQP.
        """
        mine = self.keys.alive(queue, me)
        pattern = glob_escape(self.keys.alive_prefix(queue)) + '*'
        if any(text(key) != mine for key in self.client.scan_iter(match=pattern, count=100)):
            return True
        try:
            consumers = self.client.xinfo_consumers(self.keys.stream(queue), self.group)
        except Exception:   # no stream or no group: nobody reads it
            return False
        return any(text(c['name']) != me and c['idle'] < self.idle_consumer_ms for c in consumers)

    def exists(self, queue: str) -> bool:
        return bool(self.client.exists(self.keys.stream(queue)))

    def delete(self, queue: str) -> None:
        """Delete the queue's streams, schedule, registry entry and this process's bindings of it."""
        state = self.state
        with self.client.pipeline(transaction=False) as pipe:
            for exchange, routing_key, args in state.queue_bindings(queue):
                _, pattern, _ = self.typeof(exchange).prepare_bind(
                    queue, exchange, routing_key, args)
                pipe.srem(self.keys.bindings(exchange), binding_member(routing_key, pattern, queue))
            pipe.execute_command('DEL', *self.keys.streams(queue), self.keys.scheduled(queue),
                                  self.keys.ledger(queue))   # one slot
            pipe.hdel(self.keys.queues, queue)
            pipe.execute()
        state.queue_bindings_delete(queue)
        self.unwritten.discard(queue)
        self.refused.difference_update(self.keys.streams(queue))
        record = self[queue]
        record.auto_delete = False
        record.deleted = True
        self.version += 1

    def mark_broadcast(self, queue: str, exchange: str) -> list:
        """``queue`` is bound to fanout ``exchange``: a broadcast queue (here and in the
        registry; an auto-delete one without an expiry gets the orphan expiry). Returns the
        commands that store it."""
        record = self[queue]
        if record.fanout_exchange != exchange:
            record.fanout_exchange = exchange
            self.version += 1
        commands: list[tuple[str | int, ...]] = []
        if record.auto_delete and record.expires is None:
            record.expires = self.orphan_expiry_ms
            commands += [('PEXPIRE', self.keys.stream(queue), record.expires),
                         ('PEXPIRE', self.keys.ledger(queue), record.expires)]
        commands.append(('HSET', self.keys.queues, queue, FANOUT))
        return commands

    # -- healing --------------------------------------------------------------

    def read_streams(self, queue: str) -> list[str]:
        """The streams a consumer of ``queue`` reads: every priority bucket, or the
        main stream alone for a broadcast queue (broadcasts have no priorities)."""
        return [self.keys.stream(queue)] if self.is_broadcast(queue) else self.keys.streams(queue)

    def ensure_groups(self, queues, healing=False) -> dict:
        """Create the group on every stream a consumer of ``queues`` reads (``MKSTREAM``).

        A blocked ``XREADGROUP`` sees only streams it names, and naming a stream
        without the group fails the read: so every priority bucket gets its
        stream and group before the first read, and a message published to any
        bucket, by any process, wakes the reader at once.
        When ``healing``, a group re-created at ``0`` leaves a mark (see the
        ``create_group`` script); marks found are kept in :attr:`healed_marks`.
        Returns queue -> whether a group was created.
        """
        plan = self._group_plan(queues)
        # One packed write (no SCRIPT EXISTS first, as a redis-py pipeline of scripts does).
        return self._groups_made(plan, self.scripts.run(self.dispatcher, self._group_commands(plan, healing)))

    def start_groups(self, queue) -> None:
        """A consumer starts on ``queue``: its groups (:meth:`ensure_groups`) are written now,
        without waiting for Redis' reply, on the channel's pipe; :meth:`confirm_groups` waits for
        them before the next read.

        A consumer of 100 queues started with one round trip per queue (16 ms).
        The groups are made when consuming starts, as before: a group destroyed
        after that fails the next read, which heals it with its healed mark.
        """
        plan = self._group_plan([queue])
        self.groups_unconfirmed += 1

        def made(replies):
            self.groups_unconfirmed -= 1
            if any(isinstance(reply, redis.exceptions.NoScriptError) for reply in replies):
                self.scripts.reload_all()   # the server lost its scripts: now, waiting
                self.ensure_groups([queue])
            else:
                self._groups_made(plan, replies)

        self.pipe.write(self._group_commands(plan, healing=False), on_replies=made)

    def confirm_groups(self) -> None:
        """Before a read: every group :meth:`start_groups` wrote is in Redis (or its error raised)."""
        if self.groups_unconfirmed:
            self.pipe.collect(wait=True)

    def _group_plan(self, queues) -> list:
        return [(queue, stream) for queue in queues for stream in self.read_streams(queue)]

    def _group_commands(self, plan, healing) -> list:
        return [self.scripts.command('create_group', [stream, self.healed_key(stream)],
                                [self.group, self._start_id(queue), int(healing), self.healed_mark_ms])
                for queue, stream in plan]

    def _groups_made(self, plan, results) -> dict:
        """The replies of the ``create_group`` calls of ``plan``; queue -> whether one was created."""
        created: dict = {}
        for (queue, stream), result in zip(plan, results):
            created.setdefault(queue, False)
            if isinstance(result, Exception):
                if not errors.is_out_of_memory(result):
                    raise errors.translate_write_error(result)
                if not self._has_group(stream):   # a full Redis refuses even a group that is there
                    if stream not in self.refused:   # consumers must still drain the others
                        errors.say_full(logger, 'stream %s of queue %r not created', stream, queue)
                    self._refuse(stream)
                continue
            self._made(stream)
            created[queue] = created.get(queue, False) or bool(result[0])
            if result[1]:
                self.healed_marks[stream] = entry_id_tuple(text(result[1]))
        return created

    def healed_key(self, stream: str) -> str:
        """The healed mark of a queue stream (see the ``create_group`` script)."""
        return self.keys.healed(*self.keys.parse_stream(stream))

    def _refuse(self, stream: str) -> None:
        """A full Redis refused to make ``stream`` (or its group): not read until it is made."""
        if stream not in self.refused:
            self.refused.add(stream)
            self.version += 1   # read plans leave it out (a main stream: its queue)

    def _made(self, stream: str) -> None:
        if stream in self.refused:
            self.refused.discard(stream)
            self.version += 1
            errors.say_room(logger)
            logger.debug('celery_streams: stream %s a full Redis refused is read from now on', stream)

    def retry_refused(self, queues) -> None:
        """Once Redis has room again: create the streams a full Redis refused, for those of
        ``queues`` (and the queues of :attr:`unwritten`) that have some, and write what it
        refused of the declarations."""
        refused, unwritten = self.refused, sorted(self.unwritten)
        waiting = [q for q in dict.fromkeys([*queues, *unwritten])
                   if not self[q].deleted and any(s in refused for s in self.read_streams(q))]
        if waiting:
            self.ensure_groups(waiting)
            self._expiry_refreshed_at = 0.0
            self.refresh_expiry(waiting)
        if unwritten and self._rewrite(unwritten):
            self.unwritten.difference_update(unwritten)
            errors.say_room(logger)

    def _rewrite(self, queues) -> bool:
        """:meth:`rewrite_declarations`; False when a full Redis refused them (kept for later)."""
        try:
            self.rewrite_declarations(queues)
        except redis.ResponseError as exc:
            if not errors.is_out_of_memory(exc):
                raise
            self.unwritten.update(queues)
            return False
        return True

    def healed_before(self, stream: str, entry_id: str) -> bool:
        """Whether the entry may have been in flight when the group of ``stream`` was lost."""
        mark = self.healed_marks.get(stream)
        return mark is not None and entry_id_tuple(entry_id) <= mark

    def heal(self, queues, error) -> list[str]:
        """Re-create the groups (and registry, bindings) of ``queues``; log once each.

        Queues this process deleted itself (a pidbox reply queue deleted while its
        consumer still reads) are left deleted. Returns the queues healed.
        """
        queues = [q for q in queues if not self.is_deleted(q)]
        if not queues:
            return []
        created = self.ensure_groups(queues, healing=True)
        self._expiry_refreshed_at = 0.0
        self.refresh_expiry(queues)
        for queue in queues:
            if created.get(queue):
                logger.info(
                    'celery_streams: consumer group %r of queue %r was gone (%s); '
                    're-created it at id %s and reading on',
                    self.group, queue, one_line(error), self._start_id(queue))
        self._rewrite(queues)
        return queues

    def _start_id(self, queue: str) -> str:
        return '$' if self.is_broadcast(queue) else '0'

    def rewrite_declarations(self, queues) -> None:
        """Write the registry entries and bindings of ``queues`` as this process declared them."""
        state, typeof = self.state, self.typeof
        with self.client.pipeline(transaction=False) as pipe:
            pipe.set(self.keys.schema, SCHEMA_VERSION, nx=True)
            for queue in queues:
                pipe.hsetnx(self.keys.queues, queue, TASK)
                for exchange, routing_key, args in state.queue_bindings(queue):
                    _, pattern, _ = typeof(exchange).prepare_bind(queue, exchange, routing_key, args)
                    self.bindings.write(pipe, exchange, routing_key, pattern, queue)
            pipe.execute()

    def refresh_expiry(self, queues) -> None:
        """Keep consumed queues with ``x-expires`` alive (at most every third of it)."""
        expiring = [(q, ms) for q in queues if (ms := self.expires(q)) is not None]
        if not expiring:
            return
        now = monotonic()
        if now - self._expiry_refreshed_at < min(ms for _, ms in expiring) / 3000:
            return
        self._expiry_refreshed_at = now
        with self.client.pipeline(transaction=False) as pipe:
            for queue, ms in expiring:
                for key in (*self.keys.streams(queue), self.keys.ledger(queue)):
                    pipe.pexpire(key, ms)
            pipe.execute()

    def prune_registry(self) -> int:
        """Forget registered queues whose streams expired; returns how many.

        On a Redis Cluster the registry and the streams lie in different slots:
        the streams are looked at here, and a queue whose stream is gone is
        removed with ``HDEL`` (declared again meanwhile, it is registered again
        by its next declaration or heal).
        """
        if self.scripts_span_keys:
            return self.scripts.prune_registry(keys=[self.keys.queues], args=[*self.keys.stream_affixes(0)])
        queues = [text(queue) for queue in self.client.hkeys(self.keys.queues)]
        with self.client.pipeline(transaction=False) as pipe:
            for queue in queues:
                pipe.exists(self.keys.stream(queue))
            gone = [queue for queue, exists in zip(queues, pipe.execute()) if not exists]
        return self.client.hdel(self.keys.queues, *gone) if gone else 0


def raise_unless_busygroup(results) -> None:
    for result in results:
        if isinstance(result, Exception) and not errors.is_busy_group(result):
            raise errors.translate_write_error(result)


def entry_id_tuple(entry_id: str) -> tuple:
    ms, _, seq = entry_id.partition('-')
    return int(ms), int(seq or 0)


def _milliseconds(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None
