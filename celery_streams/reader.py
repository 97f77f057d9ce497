"""Reading: read plans, the budgeted and the blocking read, and stale-read detection.

A channel reads on connections of its own (its lanes; Celery's cold shutdown
finds a socket at ``channel.client.connection._sock``). The read is
*sent* by :meth:`Reader.start` and its reply *parsed* by :meth:`Reader.finish`
when the socket is readable, so the event hub never waits on Redis.

* While messages wait, the read is the ``read`` script: it takes the prefetch
  budget from the streams in reading order (priority buckets first, then the
  queues in ``queue_order_strategy`` order) and returns at once. While the
  first stream of that order has a backlog (the last read took its whole
  budget from it), the read is a plain ``XREADGROUP ... COUNT budget`` of that
  stream: the script would take the same entries, and stop there, at about
  three times the server's work (Redis converts every entry to Lua and back).
* When the last read found nothing, it is ``XREADGROUP ... BLOCK
  polling_interval`` over the same streams (``COUNT 1`` each), which returns
  as soon as anything arrives. Never ``BLOCK 0``: on Redis 6.2 a reader blocked
  on a deleted stream only learns about it from its next read.
* A read that fails with ``NOGROUP`` or ``UNBLOCKED`` heals the queues it read
  (:meth:`celery_streams.queues.QueueTable.heal`) and the next read goes on.
* Before a read is sent, the scheduled messages that came due are moved into
  the streams (:class:`celery_streams.scheduler.Scheduler`), and a blocking
  read waits no longer than until the next one is due (delayed delivery).

A read goes out on a :class:`~celery_streams.lanes.Lane`: one connection and
its outstanding read. On one server (or the master Sentinels name) a channel
has one lane for all its queues; on a Redis Cluster, a lane per slot it reads
(:mod:`celery_streams.lanes`): each queue's streams are read from the node
that owns them, all lanes at once, and the prefetch budget is shared: a
lane's read takes what the reads already out leave.
"""
from __future__ import annotations

import logging
import select
from time import monotonic
from typing import NamedTuple

import redis

from . import errors, wire
from .lanes import Lane, Read

logger = logging.getLogger(__name__)

#: The kind of a plain budgeted read (:meth:`Reader._packed_backlog_read`); ``'EVALSHA'`` is
#: the ``read`` script's, ``'XREADGROUP'`` the blocking read's.
BACKLOG_READ = 'XREADGROUP COUNT'


class Plan(NamedTuple):
    """The streams one read names, in reading order."""

    queues: list      # the queues read, each once
    streams: list     # their stream keys: priority buckets first, queues rotated
    packed: bytes     # the same keys, packed (RESP bulk strings)
    optional: str     # per stream: '1' for a priority bucket (may be missing), '0' for a main stream


class Reader:
    """The read side of one channel: what to read, sending it, and taking the reply in.

    Its collaborators: ``lanes`` (the connections reads go out on,
    :mod:`celery_streams.lanes`), the queue table, the inbox replies go into,
    the scheduler of delayed delivery, the scripts and the client (for
    ``basic_get``'s read); ``refill_wait(budget)`` (the QoS: seconds to hold a
    read back), ``ensure_alive()`` (liveness: before a read with acks) and
    ``carry(queues)`` (the QoS: the queued acks a read of ``queues`` writes before
    itself, or None; unused where the lanes cannot carry them: on a Redis Cluster).
    """

    def __init__(self, *, options, keys, group: str, consumer: str, lanes, queues, inbox,
                 scheduler, scripts, client, refill_wait, ensure_alive, carry=None):
        self.options = options
        self.keys = keys
        self.group = group
        self.consumer = consumer
        self.lanes = lanes
        self.queues = queues
        self.inbox = inbox
        self.scheduler = scheduler
        self.scripts = scripts
        self.client = client
        self.refill_wait = refill_wait
        self.ensure_alive = ensure_alive
        self.carry = carry if lanes.carry_acks else None
        self.block_ms = options.block_ms
        self._rotations: dict = {}      # queues -> how many plans of them were made
        self._layouts: dict = {}        # (queues, table version) -> Reader._lay_out
        #: Seconds the last :meth:`start` held a read back to fill more of the window (0: none).
        self.held_back = 0.0
        #: The queues whose next read goes out soon (held back, or after a budgeted read out
        #: now): their acks can wait for it and ride with it (:meth:`QoS.flush_acks`).
        self.carrying: frozenset = frozenset()

    def lane_of(self, fd) -> Lane | None:
        """The lane whose outstanding read came on socket ``fd``."""
        return next((lane for lane in self.lanes.lanes() if lane.fileno() == fd), None)

    @property
    def outstanding(self) -> bool:
        """Whether any read is out."""
        return any(lane.outstanding is not None for lane in self.lanes.lanes())

    def drop_connection(self, fd=None) -> None:
        """Drop the connection of the lane reading on ``fd`` (None: of every lane)."""
        for lane in self.lanes.lanes():
            if fd is None or lane.fileno() == fd:
                lane.drop()

    def close(self) -> None:
        self.lanes.close()

    # -- plans ----------------------------------------------------------------

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
            if len(self._layouts) > 32 + len(self.lanes.lanes()):
                self._layouts.clear()   # queue sets come and go (add_consumer, cancel)
                self._rotations.clear()
            cached = self._layouts[key] = self._lay_out(key[0])
        queues, layout = cached
        shift = 0
        if self.options.queue_order_strategy == 'round_robin' and len(queues) > 1:
            # One turn per set of queues: on a Redis Cluster each lane reads a set of its own,
            # and one shared counter would let some of a lane's queues never come first.
            shift = self._rotations.get(key[0], 0)
            self._rotations[key[0]] = shift + 1
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
        for bucket in self.options.bucket_order:
            keys = [self.keys.stream(q, bucket) for q in queues if not bucket or not table.is_broadcast(q)]
            if keys:
                layout.append((bucket, keys, [wire.pack_args([key]) for key in keys]))
        return queues, layout

    def _read_args(self, budget, noack, optional) -> list:
        return [self.group, self.consumer, budget, '1' if noack else '0', optional]

    def budget_read(self, plan: Plan, budget, noack) -> list:
        """The ``read`` script over the streams of ``plan``, as a command."""
        return self.scripts.command('read', plan.streams,
                                            self._read_args(budget, noack, plan.optional))

    def _packed_budget_read(self, plan: Plan, budget, noack) -> bytes:
        args = self._read_args(budget, noack, plan.optional)
        head = ['EVALSHA', self.scripts.read.sha, len(plan.streams)]
        return (b'*%d\r\n' % (len(head) + len(plan.streams) + len(args))
                + wire.pack_args(head) + plan.packed + wire.pack_args(args))

    def _packed_backlog_read(self, plan: Plan, budget, noack) -> bytes:
        """``XREADGROUP ... COUNT budget`` of the first stream of the plan only."""
        return wire.pack(['XREADGROUP', 'GROUP', self.group, self.consumer, 'COUNT', budget,
                          *(['NOACK'] if noack else []), 'STREAMS', plan.streams[0], '>'])

    def _packed_blocking_read(self, plan: Plan, noack) -> bytes:
        """``XREADGROUP ... BLOCK`` over every stream of the plan: each got its group when
        its consumer started (but for the ones a full Redis refused)."""
        streams, packed = plan.streams, plan.packed
        refused = self.queues.refused
        if refused and not refused.isdisjoint(streams):
            streams = [stream for stream in streams if stream not in refused]
            packed = wire.pack_args(streams)
        block = self.scheduler.block_ms(self.block_ms, plan.queues)
        head = ['XREADGROUP', 'GROUP', self.group, self.consumer,
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
        self.lanes.follow_master()
        routes = self.lanes.route(queues)
        idle = [(lane, lane_queues) for lane, lane_queues in routes if lane.outstanding is None]
        if idle:
            self._send_reads(queues, idle, budget)
        self.carrying = frozenset(self._carrying(routes)) if self.carry is not None else frozenset()
        return self.fds()

    def pause(self) -> None:
        """No read goes out now (the channel holds messages, or consumes nothing)."""
        self.held_back = 0.0
        self.carrying = frozenset()

    def _carrying(self, routes):
        """The queues of lanes whose next read is sure to go out soon: a read held back for a
        fuller window (it goes out when the wait ends), or a budgeted read out now (its reply
        comes at once, and the read after it carries them). Not behind a blocking read: that
        one may wait ``polling_interval``."""
        for lane, lane_queues in routes:
            read = lane.outstanding
            if (read.command != 'XREADGROUP') if read is not None else bool(self.held_back):
                yield from lane_queues

    def fds(self) -> list:
        """The file descriptors of the sockets with a read outstanding."""
        return [lane.outstanding.connection._sock.fileno() for lane in self.lanes.lanes()
                if lane.outstanding is not None]

    def _send_reads(self, queues, idle, budget) -> None:
        if self.scheduler.promote_due(queues):
            for lane, _ in idle:
                lane.block_next = False   # they wait in the streams now: read them at once
        budget -= sum(lane.outstanding.max_messages for lane in self.lanes.lanes()
                      if lane.outstanding is not None)
        if budget <= 0:
            return
        self.held_back = self.refill_wait(budget)
        if self.held_back:
            return
        self.queues.confirm_groups()
        alive = False
        if len(idle) > 1:
            # The budget may not cover every lane (a blocking read holds one slot per stream it
            # names): the lane that waited longest goes first, so none waits for ever behind
            # the others' blocking reads (a sharded queue's shards, on a Redis Cluster).
            idle = sorted(idle, key=lambda route: route[0].last_sent)
        for lane, lane_queues in idle:
            plan = self.plan(lane_queues)
            if not plan.streams:
                continue
            noack = all(self.queues[q].no_ack for q in plan.queues)
            if not noack and not alive:
                self.ensure_alive()
                alive = True
            carried = self.carry(plan.queues) if self.carry is not None else None
            if lane.block_next:
                count = len(plan.streams)
                lane.send('XREADGROUP', self._packed_blocking_read(plan, noack), plan.queues, noack, count,
                          carried)
            elif lane.backlog == plan.streams[0]:
                count = budget
                lane.send(BACKLOG_READ, self._packed_backlog_read(plan, budget, noack), plan.queues, noack,
                          count, carried)
            else:
                count = budget
                lane.send('EVALSHA', self._packed_budget_read(plan, budget, noack), plan.queues, noack, count,
                          carried)
            budget -= count
            if budget <= 0:
                return

    def finish(self, fd=None) -> bool:
        """Read the reply of the read outstanding on ``fd`` (None: the first one out) into the
        inbox. True if it brought messages."""
        lane = (self.lane_of(fd) if fd is not None else
                next(lane for lane in self.lanes.lanes() if lane.outstanding is not None))
        return self._take(lane)

    def _take(self, lane) -> bool:
        try:
            return self._finish(lane)
        finally:
            self.lanes.finished(lane)

    def _finish(self, lane) -> bool:
        read, lane.backlog = lane.outstanding, None
        try:
            replies = lane.receive()
        except redis.exceptions.NoScriptError:   # the server restarted or flushed its scripts
            self.scripts.reload('read')
            return False
        except redis.ResponseError as exc:
            if errors.is_missing_group(exc):
                self.heal(lane, read.queues, exc)
                return False
            if self.lanes.redirected(lane, read, exc):
                return False
            raise
        replies = replies or ()
        # Block next only when this read found nothing: entries a rate limit held back, or
        # dead-lettered, leave the buffer as it was, and more may be waiting behind them.
        lane.block_next = not self.inbox.add_reply(replies, read.noack)
        lane.backlog = _backlog(read, replies)
        return bool(self.inbox)

    def finish_all(self) -> None:
        """Read the reply of every read out (a closing channel), so that what they brought
        can be put back. A lane whose connection broke loses its reply: its entries are
        taken over once this consumer's liveness lapses. Raises the first such error once
        every lane was read."""
        first_error = None
        for lane in self.lanes.lanes():
            if lane.outstanding is None:
                continue
            try:
                self._take(lane)
            except errors.connection_errors as exc:
                lane.drop()
                first_error = first_error or exc
        if first_error is not None:
            raise first_error

    def heal(self, lane, queues, error) -> None:
        """Re-create what vanished; the next read does not block (something may be waiting)."""
        if self.queues.heal(queues, error):
            lane.block_next = False

    def check_stale(self, margin) -> None:
        """Drop the connection of a read that got no reply long after its BLOCK ran out.

        This is how a silent network (packets lost, no RST: nothing closes the
        socket) is noticed by a consumer: its blocking read waits on the socket, not
        on a socket timeout. The error makes kombu reconnect.
        """
        for lane in self.lanes.lanes():
            read = lane.outstanding
            if read is None:
                continue
            waited = monotonic() - read.sent_at
            if waited > self.block_ms / 1000 + margin and not _reply_waiting(read):
                connection = read.connection
                where = '%s:%s' % (getattr(connection, 'host', '?'), getattr(connection, 'port', '?'))
                logger.warning('celery_streams: no reply to a read for %.0f s from %s; reconnecting',
                               waited, where)
                lane.drop()
                raise redis.ConnectionError('no reply to a read for %.0f s from Redis at %s'
                                            % (waited, where))

    # -- basic_get ------------------------------------------------------------

    def read_first(self, queues) -> tuple:
        """``(queue, payload)`` of one message of the first of ``queues`` that has one (the
        shards of a sharded queue, in turn), or ``(None, None)``; never blocks."""
        for queue in queues:
            payload = self.read_now(queue)
            if payload is not None:
                return queue, payload
        return None, None

    def read_now(self, queue):
        """The payload of one message of ``queue``, highest priority first, or None; never blocks.

        Skips dead-lettered and expired entries (up to 100 of them). Scheduled
        messages that came due are moved into the streams first.
        """
        buffer = self.inbox.buffer
        self.scheduler.promote_due([queue])
        order = self.options.bucket_order
        streams = [self.keys.stream(queue, bucket) for bucket in order]
        optional = ''.join('1' if bucket else '0' for bucket in order)
        command = self.budget_read(Plan([queue], streams, b'', optional), 1, noack=False)
        for _ in range(100):
            try:
                [replies] = self.client.execute_command(*command)
            except redis.exceptions.NoScriptError:
                self.scripts.reload('read')
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


def _backlog(read: Read, replies) -> str | None:
    """The stream a budgeted read took its whole budget from, or None (it took less, or from
    several streams: the next read is the script's, which reads the others too)."""
    if read.command == 'XREADGROUP' or len(replies) != 1:   # a blocking read; 0 or 2+ streams
        return None
    stream, entries = replies[0]
    return wire.text(stream) if len(entries) >= read.max_messages else None


def _reply_waiting(read: Read) -> bool:
    """A reply sits unread in the socket: the hub was busy (a task under ``-P solo``)."""
    sock = read.connection._sock
    if sock is None:
        return False
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    return bool(poller.poll(0))
