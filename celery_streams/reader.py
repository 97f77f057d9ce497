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

from . import errors
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
        self._block_next = False        # the last read found nothing: wait for new entries
        #: Seconds the last :meth:`start` held a read back to fill more of the window (0: none).
        self.held_back = 0.0
        self._moves = master_moves(channel.pool)   # Sentinel: the master moved

    @cached_property
    def client(self) -> redis.Redis:
        """The dedicated connection for the blocking read (``client.connection``)."""
        pool = self.channel.address.pool(self.options, max_connections=1)
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

    def plan(self, queues) -> list:
        """``(queue, bucket)`` pairs in reading order: priority buckets, then queues.

        Queues bound to a fanout exchange have no priority buckets.
        """
        queues = [q for q in dict.fromkeys(queues) if not self.queues.is_deleted(q)]
        strategy = self.options.queue_order_strategy
        if strategy == 'sorted':
            queues.sort()
        elif strategy == 'round_robin' and len(queues) > 1:
            start = self._rotation % len(queues)
            queues = queues[start:] + queues[:start]
            self._rotation += 1
        return [(queue, bucket) for bucket in self.bucket_order() for queue in queues
                if not bucket or not self.queues.is_broadcast(queue)]

    def budget_read(self, plan, budget, noack) -> list:
        streams = [self.keys.stream(queue, bucket) for queue, bucket in plan]
        optional = ''.join('1' if bucket else '0' for _, bucket in plan)
        channel = self.channel
        return channel.scripts.command('read', streams, [channel.group, channel.consumer_name, budget,
                                                         '1' if noack else '0', optional])

    def blocking_read(self, plan, noack) -> list:
        """Every stream of the plan: each got its group when its consumer started."""
        refused = self.queues.refused
        streams = [self.keys.stream(queue, bucket) for queue, bucket in plan]
        streams = [stream for stream in streams if stream not in refused]
        block = self.scheduler.block_ms(self.block_ms, [queue for queue, _ in plan])
        command = ['XREADGROUP', 'GROUP', self.channel.group, self.channel.consumer_name,
                   'COUNT', 1, 'BLOCK', block]
        if noack:
            command.append('NOACK')
        return command + ['STREAMS', *streams, *['>'] * len(streams)]

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
        plan = self.plan(queues)
        if not plan:
            return None
        queues = list(dict.fromkeys(queue for queue, _ in plan))
        noack = all(self.queues[q].no_ack for q in queues)
        if not noack:
            self.channel.liveness.ensure_alive()
        if self._block_next:
            command = self.blocking_read(plan, noack)
        else:
            command = self.budget_read(plan, budget, noack)
        connection = self.client.connection
        try:
            if connection._sock is None:
                connection.connect()
            connection.send_command(*command)
        except errors.connection_errors:
            connection.disconnect()
            raise
        self.outstanding = Read(connection, command[0], queues, noack, monotonic())
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
        plan = [(queue, bucket) for bucket in self.bucket_order()]
        command = self.budget_read(plan, 1, noack=False)
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
