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

A read goes out on a :class:`Lane`: one connection and its outstanding read.
On one server (or the master Sentinels name) a channel has one lane for all
its queues. On a Redis Cluster, Redis refuses a read whose keys lie in two
slots, even on one node, so a channel has a lane per slot it reads
(:class:`celery_streams.cluster.ClusterLanes`): each queue's streams are read
from the node that owns them, all lanes at once, and the prefetch budget is
shared: a lane's read takes what the reads already out leave.
"""
from __future__ import annotations

import logging
import select
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
    count: int = 0    # the most messages it may bring


class Plan(NamedTuple):
    """The streams one read names, in reading order."""

    queues: list      # the queues read, each once
    streams: list     # their stream keys: priority buckets first, queues rotated
    packed: bytes     # the same keys, packed (RESP bulk strings)
    optional: str     # per stream: '1' for a priority bucket (may be missing), '0' for a main stream


class Lane:
    """One reading connection and the read outstanding on it (at most one)."""

    def __init__(self, client: redis.Redis, asking: bool = False):
        self.client = client
        self.outstanding: Read | None = None
        #: The last read found nothing: the next one waits for new entries (``BLOCK``).
        self.block_next = False
        #: Redis Cluster: the slot is migrating here; each read goes after ``ASKING``.
        self.asking = asking

    @property
    def connection(self):
        return self.client.connection

    def fileno(self) -> int | None:
        sock = self.outstanding.connection._sock if self.outstanding is not None else None
        return None if sock is None else sock.fileno()

    def send(self, kind: str, command: bytes, queues, noack, count) -> int:
        connection = self.client.connection
        if self.asking:
            command = wire.pack(['ASKING']) + command
        try:
            if connection._sock is None:
                connection.connect()
            connection.send_packed_command([command])
        except errors.connection_errors:
            connection.disconnect()
            raise
        self.outstanding = Read(connection, kind, queues, noack, monotonic(), count)
        return connection._sock.fileno()

    def receive(self):
        """The reply of the outstanding read (its error raised); the read is no longer out."""
        read, self.outstanding = self.outstanding, None
        try:
            if self.asking:
                self.client.parse_response(read.connection, 'ASKING')
            if read.command == 'EVALSHA':
                [replies] = self.client.parse_response(read.connection, 'EVALSHA')
                return replies
            return self.client.parse_response(read.connection, 'XREADGROUP')
        except redis.ResponseError:
            raise
        except BaseException:
            read.connection.disconnect()
            raise

    def drop(self) -> None:
        if self.client.connection is not None:
            self.client.connection.disconnect()
        self.outstanding = None

    def close(self) -> None:
        self.client.close()
        self.client.connection_pool.disconnect()


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
        self._rotation = 0
        self._layouts: dict = {}        # (queues, broadcast flags) -> Reader._lay_out
        #: Seconds the last :meth:`start` held a read back to fill more of the window (0: none).
        self.held_back = 0.0
        self._moves = master_moves(channel.pool)   # Sentinel: the master moved
        self._lane: Lane | None = None

    @property
    def client(self) -> redis.Redis:
        """The dedicated connection for the blocking read (``client.connection``)."""
        return self.lane().client

    def lane(self) -> Lane:
        """The channel's one lane (made at first use)."""
        if self._lane is None:
            pool = self.channel.address.pool(self.options, follow=self.channel.pool, max_connections=1)
            self._lane = Lane(redis.Redis(connection_pool=pool, single_connection_client=True))
        return self._lane

    def lanes(self) -> list:
        """Every lane open now."""
        return [self._lane] if self._lane is not None else []

    def route(self, queues) -> list:
        """``[(lane, its queues)]``: where each of ``queues`` is read."""
        return [(self.lane(), queues)]

    def lane_of(self, fd) -> Lane | None:
        """The lane whose outstanding read came on socket ``fd``."""
        return next((lane for lane in self.lanes() if lane.fileno() == fd), None)

    @property
    def outstanding(self) -> bool:
        """Whether any read is out."""
        return any(lane.outstanding is not None for lane in self.lanes())

    def drop_connection(self, fd=None) -> None:
        """Drop the connection of the lane reading on ``fd`` (None: of every lane)."""
        for lane in self.lanes():
            if fd is None or lane.fileno() == fd:
                lane.drop()

    def close(self) -> None:
        for lane in self.lanes():
            lane.close()

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
            if len(self._layouts) > 32 + len(self.lanes()):   # queue sets come and go (add_consumer, cancel)
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

    def start(self, queues, budget) -> list:
        """Send a read over ``queues`` on each lane that has none out, sharing ``budget``
        (the most messages they may bring together).

        Returns the file descriptors of the sockets with a read outstanding;
        :attr:`held_back` then says whether, and for how long, reads wait for
        more of the prefetch window to come free.
        """
        self.held_back = 0.0
        if master_moves(self.channel.pool) != self._moves:
            self._moves = master_moves(self.channel.pool)
            logger.info('celery_streams: the master moved (Sentinel): reading from the new one')
            self.drop_connection()
        idle = [(lane, lane_queues) for lane, lane_queues in self.route(queues)
                if lane.outstanding is None]
        if idle:
            self._send_reads(queues, idle, budget)
        return self.fds()

    def fds(self) -> list:
        """The file descriptors of the sockets with a read outstanding."""
        return [lane.outstanding.connection._sock.fileno() for lane in self.lanes()
                if lane.outstanding is not None]

    def _send_reads(self, queues, idle, budget) -> None:
        if self.scheduler.promote_due(queues):
            for lane, _ in idle:
                lane.block_next = False   # they wait in the streams now: read them at once
        budget -= sum(lane.outstanding.count for lane in self.lanes() if lane.outstanding is not None)
        if budget <= 0:
            return
        self.held_back = self.channel.qos.refill_wait(budget)
        if self.held_back:
            return
        self.queues.confirm_groups()
        alive = False
        for lane, lane_queues in idle:
            plan = self.plan(lane_queues)
            if not plan.streams:
                continue
            noack = all(self.queues[q].no_ack for q in plan.queues)
            if not noack and not alive:
                self.channel.liveness.ensure_alive()
                alive = True
            if lane.block_next:
                count = len(plan.streams)
                lane.send('XREADGROUP', self._packed_blocking_read(plan, noack), plan.queues, noack, count)
            else:
                count = budget
                lane.send('EVALSHA', self._packed_budget_read(plan, budget, noack), plan.queues, noack, count)
            budget -= count
            if budget <= 0:
                return

    def finish(self, fd=None) -> bool:
        """Read the reply of the read outstanding on ``fd`` (None: the first one out) into the
        inbox. True if it brought messages."""
        lane = (self.lane_of(fd) if fd is not None else
                next(lane for lane in self.lanes() if lane.outstanding is not None))
        return self._finish(lane)

    def _finish(self, lane) -> bool:
        read = lane.outstanding
        try:
            replies = lane.receive()
        except redis.exceptions.NoScriptError:   # the server restarted or flushed its scripts
            self.channel.scripts.reload('read')
            return False
        except redis.ResponseError as exc:
            if errors.is_missing_group(exc):
                self.heal(lane, read.queues, exc)
                return False
            if self.redirected(lane, read, exc):
                return False
            raise
        before = len(self.inbox)
        self.inbox.add_reply(replies or (), read.noack)
        lane.block_next = len(self.inbox) <= before
        return bool(self.inbox)

    def finish_all(self) -> None:
        """Read the reply of every read out (a closing channel), so that what they brought
        can be put back. A lane whose connection broke loses its reply: its entries are
        taken over once this consumer's liveness lapses. Raises the first such error once
        every lane was read."""
        first_error = None
        for lane in self.lanes():
            if lane.outstanding is None:
                continue
            try:
                self._finish(lane)
            except errors.connection_errors as exc:
                lane.drop()
                first_error = first_error or exc
        if first_error is not None:
            raise first_error

    def redirected(self, lane, read, error) -> bool:
        """A Redis Cluster sent the read elsewhere (``MOVED``, ``ASK``): follow; True if so."""
        return False

    def heal(self, lane, queues, error) -> None:
        """Re-create what vanished; the next read does not block (something may be waiting)."""
        if self.queues.heal(queues, error):
            lane.block_next = False

    def check_stale(self, margin) -> None:
        """Drop the connection of a read that got no reply long after its BLOCK ran out."""
        for lane in self.lanes():
            if lane.outstanding is None:
                continue
            waited = monotonic() - lane.outstanding.sent_at
            if waited > self.block_ms / 1000 + margin and not _reply_waiting(lane.outstanding):
                logger.warning('celery_streams: no reply to a read for %.0f s; reconnecting', waited)
                lane.drop()
                raise redis.ConnectionError('no reply from Redis for %.0f s' % waited)

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
                self.queues.heal([queue], exc)
                continue
            if not replies:
                return None
            before = len(buffer)
            self.inbox.add_reply(replies, noack=False)
            if len(buffer) > before:
                return buffer.pop()[1]
        return None


def _reply_waiting(read: Read) -> bool:
    """A reply sits unread in the socket: the hub was busy (a task under ``-P solo``)."""
    sock = read.connection._sock
    if sock is None:
        return False
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    return bool(poller.poll(0))
