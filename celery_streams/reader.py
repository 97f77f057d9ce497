"""Reading: read plans, the budgeted and the blocking read, and stale-read detection.

A channel reads on a dedicated connection (``Reader.client``; Celery's cold
shutdown finds its socket at ``channel.client.connection._sock``). The read is
*sent* by :meth:`Reader.start` and its reply *parsed* by :meth:`Reader.finish`
when the socket is readable, so the event hub never waits on Redis.

* While messages wait, the read is the ``read`` script: it takes the prefetch
  budget from the streams in reading order (priority buckets first, then the
  queues in ``queue_order_strategy`` order) and returns at once.
* When the last read found nothing, it is ``XREADGROUP ... BLOCK
  polling_interval`` over the same streams (``COUNT 1`` each), which returns
  as soon as anything arrives. Never ``BLOCK 0``: on Redis 6.2 a reader blocked
  on a deleted stream only learns about it from its next read.
* A read that fails with ``NOGROUP`` or ``UNBLOCKED`` heals the queues it read
  (:meth:`celery_streams.queues.QueueTable.heal`) and the next read goes on.
* Before a read is sent, the scheduled messages that came due are moved into
  the streams (:class:`celery_streams.scheduler.Scheduler`), and a blocking
  read waits no longer than until the next one is due (delayed delivery).
"""
from __future__ import annotations

import logging
import select
from functools import cached_property
from time import monotonic
from typing import NamedTuple

import redis

from . import errors, wire
from .connection import moves as master_moves
from .scheduler import Scheduler

logger = logging.getLogger(__name__)


class Read(NamedTuple):
    """A read sent on a channel's reader connection, its reply not yet parsed."""

    connection: object
    command: str
    queues: list
    noack: bool
    sent_at: float


class Plan(NamedTuple):
    """The streams one read names, in reading order."""

    queues: list      # the queues read, each once
    streams: list     # their stream keys: priority buckets first, queues rotated
    packed: bytes     # the same keys, packed (RESP bulk strings)
    optional: str     # per stream: '1' for a priority bucket (may be missing), '0' for a main stream


class Reader:
    """The read side of one channel."""

    def __init__(self, channel):
        self.channel = channel
        self.options = channel.options
        self.keys = channel.keys
        self.queues = channel.queues
        self.inbox = channel.inbox
        self.scheduler = Scheduler(channel)
        self.block_ms = int(self.options.polling_interval * 1000)
        self.outstanding: Read | None = None
        self._rotation = 0
        self._layouts: dict = {}        # (queues, broadcast flags) -> Reader._lay_out
        self._block_next = False        # the last read found nothing: wait for new entries
        #: Seconds the last :meth:`start` held a read back to fill more of the window (0: none).
        self.held_back = 0.0
        self._moves = master_moves(channel.pool)   # Sentinel: the master moved

    @cached_property
    def client(self) -> redis.Redis:
        """The dedicated connection for the blocking read (``client.connection``)."""
        pool = self.channel.address.pool(self.options, follow=self.channel.pool, max_connections=1)
        return redis.Redis(connection_pool=pool, single_connection_client=True)

    def drop_connection(self) -> None:
        client = self.__dict__.get('client')
        if client is not None and client.connection is not None:
            client.connection.disconnect()
        self.outstanding = None

    def close(self) -> None:
        client = self.__dict__.get('client')
        if client is not None:
            client.close()
            client.connection_pool.disconnect()

    # -- plans ----------------------------------------------------------------

    def bucket_order(self) -> tuple:
        buckets = self.options.priority_steps
        return buckets[::-1] if self.options.priority_semantics == 'rabbitmq' else buckets

    def plan(self, queues) -> Plan:
        """The streams of ``queues`` in reading order: priority buckets, then queues.

        Queues bound to a fanout exchange have no priority buckets. The keys of
        a set of queues are laid out (and packed) once; a read only rotates
        them (``queue_order_strategy='round_robin'``): with 100 queues,
        building and packing 400 keys per read cost about 0.4 ms.
        """
        key = (tuple(queues), self.queues.version)
        cached = self._layouts.get(key)
        if cached is None:
            if len(self._layouts) > 32:   # queue sets come and go (add_consumer, cancel)
                self._layouts.clear()
            cached = self._layouts[key] = self._lay_out(key[0])
        queues, layout = cached
        strategy = self.options.queue_order_strategy
        shift = 0
        if strategy == 'round_robin' and len(queues) > 1:
            shift = self._rotation
            self._rotation += 1
        streams, packed, optional = [], [], []
        for bucket, keys, packs in layout:
            k = shift % len(keys)
            streams += keys[k:]
            streams += keys[:k]
            packed += packs[k:]
            packed += packs[:k]
            optional.append(('1' if bucket else '0') * len(keys))
        return Plan(queues, streams, b''.join(packed), ''.join(optional))

    def _lay_out(self, queues) -> tuple:
        """The queues read (each once, none deleted; sorted if so ordered) and, per priority
        bucket in reading order, ``(bucket, their stream keys, the same packed)``."""
        table = self.queues
        queues = [q for q in dict.fromkeys(queues) if not table.is_deleted(q)]
        if self.options.queue_order_strategy == 'sorted':
            queues.sort()
        layout = []
        for bucket in self.bucket_order():
            keys = [self.keys.stream(q, bucket) for q in queues if not bucket or not table.is_broadcast(q)]
            if keys:
                layout.append((bucket, keys, [wire.pack_args([key]) for key in keys]))
        return queues, layout

    def _read_args(self, budget, noack, optional) -> list:
        channel = self.channel
        return [channel.group, channel.consumer_name, budget, '1' if noack else '0', optional]

    def budget_read(self, plan: Plan, budget, noack) -> list:
        """The ``read`` script over the streams of ``plan``, as a command."""
        return self.channel.scripts.command('read', plan.streams,
                                            self._read_args(budget, noack, plan.optional))

    def _packed_budget_read(self, plan: Plan, budget, noack) -> bytes:
        args = self._read_args(budget, noack, plan.optional)
        head = ['EVALSHA', self.channel.scripts.read.sha, len(plan.streams)]
        return (b'*%d\r\n' % (len(head) + len(plan.streams) + len(args))
                + wire.pack_args(head) + plan.packed + wire.pack_args(args))

    def _packed_blocking_read(self, plan: Plan, noack) -> bytes:
        """``XREADGROUP ... BLOCK`` over every stream of the plan: each got its group when
        its consumer started (but for the ones a full Redis refused)."""
        streams, packed = plan.streams, plan.packed
        refused = self.queues.refused
        if refused and not refused.isdisjoint(streams):
            streams = [stream for stream in streams if stream not in refused]
            packed = wire.pack_args(streams)
        block = self.scheduler.block_ms(self.block_ms, plan.queues)
        head = ['XREADGROUP', 'GROUP', self.channel.group, self.channel.consumer_name,
                'COUNT', 1, 'BLOCK', block, *(['NOACK'] if noack else []), 'STREAMS']
        return (b'*%d\r\n' % (len(head) + 2 * len(streams))
                + wire.pack_args(head) + packed + b'$1\r\n>\r\n' * len(streams))

    # -- the consume loop's read ----------------------------------------------

    def start(self, queues, budget):
        """Send one read over ``queues`` for at most ``budget`` messages, unless one is out.

        Returns the socket's file descriptor while a read is outstanding, else
        None; :attr:`held_back` then says whether, and for how long, the read
        waits for more of the prefetch window to come free.
        """
        self.held_back = 0.0
        if master_moves(self.channel.pool) != self._moves:
            self._moves = master_moves(self.channel.pool)
            logger.info('celery_streams: the master moved (Sentinel): reading from the new one')
            self.drop_connection()
        if self.outstanding is not None:
            return self.outstanding.connection._sock.fileno()
        if self.scheduler.promote_due(queues):
            self._block_next = False   # they wait in the streams now: read them at once
        if not budget:
            return None
        self.held_back = self.channel.qos.refill_wait(budget)
        if self.held_back:
            return None
        self.queues.confirm_groups()
        plan = self.plan(queues)
        if not plan.streams:
            return None
        queues = plan.queues
        noack = all(self.queues[q].no_ack for q in queues)
        if not noack:
            self.channel.liveness.ensure_alive()
        if self._block_next:
            kind, command = 'XREADGROUP', self._packed_blocking_read(plan, noack)
        else:
            kind, command = 'EVALSHA', self._packed_budget_read(plan, budget, noack)
        connection = self.client.connection
        try:
            if connection._sock is None:
                connection.connect()
            connection.send_packed_command([command])
        except errors.connection_errors:
            connection.disconnect()
            raise
        self.outstanding = Read(connection, kind, queues, noack, monotonic())
        return connection._sock.fileno()

    def finish(self) -> bool:
        """Read the reply of the outstanding read into the inbox. True if it brought messages."""
        read, self.outstanding = self.outstanding, None
        try:
            if read.command == 'EVALSHA':
                [replies] = self.client.parse_response(read.connection, 'EVALSHA')
            else:
                replies = self.client.parse_response(read.connection, 'XREADGROUP')
        except redis.exceptions.NoScriptError:   # the server restarted or flushed its scripts
            self.channel.scripts.reload('read')
            return False
        except redis.ResponseError as exc:
            if errors.is_missing_group(exc):
                self.heal(read.queues, exc)
                return False
            raise
        except BaseException:
            read.connection.disconnect()
            raise
        self.inbox.add_reply(replies or (), read.noack)
        self._block_next = not self.inbox
        return bool(self.inbox)

    def heal(self, queues, error) -> None:
        """Re-create what vanished; the next read does not block (something may be waiting)."""
        if self.queues.heal(queues, error):
            self._block_next = False

    def check_stale(self, margin) -> None:
        """Drop the connection of a read that got no reply long after its BLOCK ran out."""
        if self.outstanding is not None:
            waited = monotonic() - self.outstanding.sent_at
            if waited > self.block_ms / 1000 + margin and not self._reply_waiting():
                logger.warning('celery_streams: no reply to a read for %.0f s; reconnecting', waited)
                self.drop_connection()
                raise redis.ConnectionError('no reply from Redis for %.0f s' % waited)

    def _reply_waiting(self) -> bool:
        """A reply sits unread in the socket: the hub was busy (a task under ``-P solo``)."""
        sock = self.outstanding.connection._sock
        if sock is None:
            return False
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN)
        return bool(poller.poll(0))

    # -- basic_get ------------------------------------------------------------

    def read_now(self, queue):
        """The payload of one message of ``queue``, highest priority first, or None; never blocks.

        Skips dead-lettered and expired entries (up to 100 of them). Scheduled
        messages that came due are moved into the streams first.
        """
        channel, buffer = self.channel, self.inbox.buffer
        self.scheduler.promote_due([queue])
        streams = [self.keys.stream(queue, bucket) for bucket in self.bucket_order()]
        optional = ''.join('1' if bucket else '0' for bucket in self.bucket_order())
        command = self.budget_read(Plan([queue], streams, b'', optional), 1, noack=False)
        for _ in range(100):
            try:
                [replies] = channel.pool_client.execute_command(*command)
            except redis.exceptions.NoScriptError:
                channel.scripts.reload('read')
                continue
            except redis.ResponseError as exc:
                if not errors.is_missing_group(exc):
                    raise
                self.heal([queue], exc)
                continue
            if not replies:
                return None
            before = len(buffer)
            self.inbox.add_reply(replies, noack=False)
            if len(buffer) > before:
                return buffer.pop()[1]
        return None
