"""Kombu transport on Redis Streams consumer groups.

Use it from Celery with two settings::

    broker_url = 'redis://localhost:6379/0'
    broker_transport = 'celery_streams.transport:Transport'

or, once ``import celery_streams`` ran in the process, with a URL alone:
``redis-streams://localhost:6379/0`` (``rediss-streams://`` for TLS,
``sentinel-streams://`` for Redis Sentinel: see docs/sentinel.md).

Each kombu queue is a stream; all workers share one consumer group per stream
(``consumer_group``), so each message goes to one of them and stays in the
group's pending entries list (PEL) until it is acked (``XACK``, then ``XDEL``).
Broadcast (fanout) exchanges copy each message into the stream of every bound
queue, trimmed to ``fanout_maxlen`` entries.

A worker's consume loop heals itself: when a read fails with ``NOGROUP`` or
``UNBLOCKED`` (a group or stream vanished), it re-creates the group with
``MKSTREAM`` (at id ``0`` for task queues, so nothing published meanwhile is
skipped), re-writes its queue registry and bindings, logs one line and reads
again.

:class:`Channel` keeps to kombu's hooks and hands the work to one collaborator
per concern (see docs/design.md, "Modules"): the queue table
(:mod:`~celery_streams.queues`), the publisher (:mod:`~celery_streams.publisher`),
the reader (:mod:`~celery_streams.reader`), the inbox
(:mod:`~celery_streams.inbox`), the QoS (:mod:`~celery_streams.qos`),
liveness (:mod:`~celery_streams.liveness`), the scheduler of delayed
delivery (:mod:`~celery_streams.scheduler`) and the rate limits (:mod:`~celery_streams.limits`).
Options: :mod:`~celery_streams.options`; keys: :mod:`~celery_streams.keys`; URLs: :mod:`.connection`.
"""
from __future__ import annotations

import logging
from functools import partial
import os
import secrets
import socket
from time import time
from typing import TYPE_CHECKING

import redis
from kombu.transport import virtual
from kombu.transport.base import to_rabbitmq_queue_arguments
from kombu.transport.virtual.base import queue_declare_ok_t

from . import errors, worker_state
from .connection import SCHEMES, TLS_SCHEMES, Address, refuse_foreign_alternates, safe_url  # noqa: F401
from .inbox import Inbox
from .keys import Keys
from .limits import Throttle
from .liveness import Liveness
from .options import Options
from .poller import Poller
from .batch import PublishBatch
from .qos import ACK_BATCH, UNLIMITED_BATCH, QoS  # noqa: F401  (documented here)
from .queues import QueueTable
from .reader import Reader
from .publisher import Publisher
from .scheduler import Scheduler
from .scripts import Scripts
from .shards import ShardTable, purge, size
from .topology import open_topology, topology_class

if TYPE_CHECKING:
    from kombu import Connection

logger = logging.getLogger(__name__)
worker_state.one_line_worker_errors()


class Channel(virtual.Channel):
    """One kombu channel: a pooled client for writes, a dedicated one for the blocking read."""

    QoS = QoS
    supports_fanout = True
    do_restore = True

    #: Set when kombu collects the connection after it was lost (:meth:`mark_collected`).
    collected = False
    #: The server's clock minus this host's, in ms (measured when the channel opens).
    _clock_offset_ms = 0.0

    #: kombu's option, with one more value as the default: ``auto`` stores a text body (JSON)
    #: as it is and a binary one in base64 (kombu's Redis transport: every body, a third larger).
    body_encoding = 'auto'

    def encode_body(self, body, encoding=None):
        if encoding == 'auto':
            encoding = 'utf-8' if isinstance(body, str) else 'base64'
        return super().encode_body(body, encoding)

    def __init__(self, connection, **kwargs):
        super().__init__(connection, **kwargs)
        options = self.options = connection.options
        self.address = connection.address
        keys = self.keys = Keys(options.global_keyprefix, options.priority_steps)
        self.group = options.consumer_group
        # Unique per channel instance: a reconnected channel must not inherit the entries
        # of its predecessor (they are reclaimed once its liveness lapses).
        # The node name of a Celery worker (w1@host) when there is one, so an operator
        # can tell whose consumer it is in `celery streams status`.
        consumer = self.consumer_name = '%s:%s:%s' % (
            worker_state.worker_node_name() or socket.gethostname(), os.getpid(), secrets.token_hex(3))
        topology = self.topology = open_topology(self.address, options)
        client = self.pool_client = topology.client
        scripts = self.scripts = Scripts(client)
        #: Writes whose replies are read later: acks (the QoS) and group creations.
        self.pipe = topology.open_pipe()
        self.queues = QueueTable(client=client, dispatcher=topology.dispatcher, pipe=self.pipe,
                                 scripts=scripts, keys=keys, options=options, state=self.state,
                                 typeof=self.typeof, scripts_span_keys=topology.scripts_span_keys)
        self.shards = ShardTable(client, keys, options.sharded_queues, self.queues, connection._callbacks)
        self.publisher = Publisher(kombu=self, topology=topology, queues=self.queues,
                                   bindings=self.queues.bindings, scripts=scripts, keys=keys,
                                   options=options, clock=self.server_time_ms, shards=self.shards)
        scheduler = Scheduler(keys=keys, queues=self.queues, scripts=scripts,
                              dispatcher=topology.dispatcher, clock=self.server_time_ms,
                              options=options)
        self.throttle = Throttle(keys=keys, options=options, client=client, pipe=self.pipe, scripts=scripts,
                                 dispatcher=topology.dispatcher, on_held=scheduler.expect,
                                 clock=self.server_time_ms)
        self.inbox = Inbox(keys=keys, queues=self.queues, options=options, consumer=consumer,
                           client=client, scripts=scripts, dispatcher=topology.dispatcher,
                           clock=self.server_time_ms, decode_body=self.decode_body,
                           throttle=self.throttle)
        self.liveness = Liveness(keys=keys, options=options, consumer=consumer, client=client,
                                 dispatcher=topology.dispatcher, scripts=scripts, queues=self.queues,
                                 batches=topology.batches, consuming=self.consuming_queues,
                                 held=lambda: self.qos.held_queues())
        self.reader = Reader(options=options, keys=keys, group=self.group, consumer=consumer,
                             lanes=topology.open_lanes(keys.stream), queues=self.queues,
                             inbox=self.inbox, scheduler=scheduler, scripts=scripts, client=client,
                             refill_wait=lambda budget: self.qos.refill_wait(budget),
                             ensure_alive=self.liveness.ensure_alive,
                             carry=lambda queues: self.qos.carry(queues))
        try:
            self._clock_offset_ms = topology.check_server(keys, scripts)
            topology.warn_once()
            self.shards.refresh()   # sharded queues: their shards, before the first publish
        except Exception:
            topology.disconnect()
            raise
        connection.poller.add(self)

    def server_time_ms(self) -> float:
        """Now, in ms since the epoch, by the server's clock (as measured when the channel opened)."""
        return time() * 1000 + self._clock_offset_ms

    @property
    def client(self):
        """A client of the reader's connection (Celery's cold shutdown closes it)."""
        return self.reader.lanes.client(self.consuming_queues())

    # -- declaring (kombu hooks) ------------------------------------------------

    def _new_queue(self, queue, auto_delete=False, **kwargs):
        return self.queues.declare(queue, auto_delete, kwargs.get('arguments'))

    def queue_declare(self, queue=None, passive=False, **kwargs):
        """kombu's, with the declaration and its message count in one round trip."""
        if passive or not queue:
            return super().queue_declare(queue, passive, **kwargs)
        return queue_declare_ok_t(queue, self._new_queue(queue, **kwargs), 0)

    def prepare_queue_arguments(self, arguments, **kwargs):
        return to_rabbitmq_queue_arguments(arguments, **kwargs)

    def _has_queue(self, queue, **kwargs):
        return self.queues.exists(queue)

    def _queue_bind(self, exchange, routing_key, pattern, queue):
        self.queues.bindings.bind(exchange, routing_key, pattern, queue)

    def get_table(self, exchange):
        return self.queues.bindings.table(exchange)

    def queue_delete(self, queue, if_unused=False, if_empty=False, **kwargs):
        if if_empty and self._size(queue):
            return
        for name in self.shards.names(queue):   # a sharded queue: every shard (not the registry's entry)
            self.queues.delete(name)

    def list_bindings(self):
        """Every binding stored in Redis (``celery list bindings``), not only this process's."""
        return self.queues.bindings.everywhere()

    # -- publishing ---------------------------------------------------------------

    def create_publish_batch(self, max_size):
        return PublishBatch(self, max_size)

    def _put(self, queue, message, **kwargs):
        self.publisher.put(queue, message, kwargs.get('_publish_batch'))

    def _put_fanout(self, exchange, message, routing_key, **kwargs):
        self.publisher.put_fanout(exchange, message, routing_key, **kwargs)

    def basic_publish(self, message, exchange, routing_key, **kwargs):
        """Route one message and append it to the streams of its queues (see :mod:`.publisher`)."""
        self._inplace_augment_message(message, exchange, routing_key)
        return self.publisher.publish(message, exchange, routing_key, **kwargs)

    def _inplace_augment_message(self, message, exchange, routing_key):
        """kombu's, less the delivery tag: a reader makes its own (a uuid4 here was 5 µs
        of a publish, and never stored)."""
        message['body'], body_encoding = self.encode_body(message['body'], self.body_encoding)
        properties = message['properties']
        properties['body_encoding'] = body_encoding
        properties['delivery_info'].update(exchange=exchange, routing_key=routing_key)

    # -- consuming ------------------------------------------------------------------

    def basic_consume(self, queue, no_ack, *args, **kwargs):
        record = self.queues[queue]
        if not record.consumed:
            self.queues.start_groups(queue)   # every bucket: the blocking read names them all
        record.consumed = True
        record.no_ack = bool(no_ack)
        if not no_ack:
            self.throttle.configure()   # the rate_limits option, once
            self.shards.configure()   # the sharded_queues option, once
        return super().basic_consume(queue, no_ack, *args, **kwargs)

    def basic_cancel(self, consumer_tag):
        cancelled = self._tag_to_queue.get(consumer_tag)
        result = super().basic_cancel(consumer_tag)
        for queue in () if cancelled is None or cancelled in self._active_queues else (
                cancelled, *self.shards.detach(cancelled)):   # a sharded queue: its shards too
            self.qos.restore_tags(self.inbox.take_back(queue))   # read, never handed over
            self.queues[queue].no_ack = False
            if not self.closed:
                try:
                    self.liveness.release(queue)   # unless it still holds messages of it
                except errors.connection_errors + (redis.ResponseError,) as exc:
                    logger.debug('celery_streams: liveness not renewed at cancel: %s', exc)
        return result

    def consuming_queues(self):
        """The queues with an active consumer on this channel (a sharded queue: its shards)."""
        return self.shards.expand(self._active_queues)

    def _get(self, queue):
        """Read one message of ``queue`` (its shards in turn), highest priority first, without
        blocking (``basic_get``)."""
        shard, payload = self.reader.read_first(self.shards.names(queue))
        if payload is None:
            raise virtual.Empty()
        self.liveness.mark_alive(shard)
        return payload

    def basic_get(self, queue, no_ack=False, **kwargs):
        message = super().basic_get(queue, no_ack=no_ack, **kwargs)
        if message is not None and no_ack:
            self.qos.ack_tags([message.delivery_tag])
        return message

    # -- the consume loop (poller.ConsumingChannel) ---------------------------------

    @property
    def reading(self):
        """A read was sent and its reply not parsed yet."""
        return self.reader.outstanding

    def reading_on(self, fd):
        """A read was sent on socket ``fd`` and its reply not parsed yet."""
        return self.reader.lane_of(fd) is not None

    def start_read(self):
        """Send a read on each lane with none out, unless nothing may be read; the file
        descriptors of the sockets with a read out."""
        if self.closed or self.inbox or not self._active_queues:
            self.reader.pause()
            return self.reader.fds()
        return self.reader.start(self.consuming_queues(), self.qos.read_budget())

    def read_held_back(self):
        """Seconds until a read held back by the last :meth:`start_read` goes out, or None."""
        return self.reader.held_back or None

    def read_socket(self, fd):
        lane = self.reader.lane_of(fd)
        return None if lane is None else lane.outstanding.connection._sock

    def finish_read(self, fd=None):
        return self.reader.finish(fd)

    def check_stale_read(self, margin):
        self.reader.check_stale(margin)

    def drop_reader_connection(self, fd=None):
        self.reader.drop_connection(fd)

    def has_buffered(self):
        return bool(self.inbox)

    def deliver_buffered(self, limit=None):
        return self.inbox.deliver(self.qos, self.connection._deliver, limit)

    def loop_turn(self, thread_ident):
        self.qos.loop_turn(thread_ident)

    def flush_acks(self, carry=False):   # carry: unless the next read goes out soon and takes them
        return self.qos.flush_acks(keep=self.reader.carrying if carry else ())

    def maybe_reclaim(self):
        """Take over the messages of dead consumers when due, between reads (not while a read
        is out or messages wait in the inbox); first, attach the shards placed since."""
        self.shards.sync(self._active_queues)
        if not (self.inbox or self.reader.outstanding):
            self.liveness.maybe_reclaim(self.qos.read_budget, self.inbox.add_claimed)

    def promote_due(self):
        """Move the scheduled messages of the consumed queues that came due into their streams."""
        if not self.closed:
            self.reader.scheduler.promote_due(self.consuming_queues())

    def next_due_in(self):
        """Seconds until the next scheduled message of a consumed queue is due, or None."""
        return None if self.closed else self.reader.scheduler.next_due_in(self.consuming_queues())

    def follow_master(self):
        """Sentinel: ask where the master is; when it moved, this channel's connections follow
        (:func:`celery_streams.sentinel.moves`), the reader at its next read."""
        if self.topology.follow_master():
            logger.warning('celery_streams: the Sentinels moved master %r to %s:%s; following it',
                           self.options.master_name, *self.topology.master)

    def renew_liveness(self):
        self.liveness.renew()

    def renewal_tick(self):
        """From the renewal thread, about every second: renew what is due; False once a
        closed channel holds nothing more.

        Liveness every third of ``visibility_timeout``; the expiry of consumed queues with an
        ``x-expires`` every third of it -- off the hub, so a full prefetch window or a long
        task under ``-P solo`` never lets a consumed queue expire. With Sentinel, where the
        master is: a channel follows a failover within about a second, even while the old
        master still takes writes (after ``SENTINEL FAILOVER`` it does so for about 10 s).
        """
        if self.closed and self.pipe.unconfirmed:
            try:   # acks written on a connection that broke: again, until they land
                self.pipe.collect(wait=True, timeout=1.0)
            except Exception as exc:   # noqa: BLE001 - kept, tried again next tick
                logger.debug('celery_streams: acks of a closed channel not confirmed: %s', exc)
        if self.closed and not self.qos.holds_messages() and not self.pipe.unconfirmed:
            self.liveness.forget()   # a held channel's last running task was acked
            return False
        if not self.closed:
            self.follow_master()
        self.liveness.renew_if_due()
        self.qos.renew_unique()   # the uniqueness keys of the messages held (unique.Holds)
        if not self.closed:
            queues = self.consuming_queues()
            self.queues.refresh_expiry(queues)
            self.queues.retry_refused(queues)
            self.shards.tick()   # the registry of sharded queues, every second
        return True

    def prune_registry(self):
        """Forget registered queues whose streams expired; returns how many."""
        return self.queues.prune_registry()

    # -- restores, sizes, purge, close ------------------------------------------------

    def _restore(self, message):
        failed = self.qos.restore_tags([message.delivery_tag])
        if failed:
            raise failed[0][1]

    def _size(self, queue):
        """Messages no consumer received yet, over every priority bucket (and every shard)."""
        return size(self.pool_client, self.keys, self.group, self.shards.names(queue))

    def _purge(self, queue):
        """Empty the queue (every shard) up to its last entry and its schedule up to now, in bounded
        steps (groups stay: ``DEL`` would destroy them), releasing their uniqueness keys."""
        return purge(self.pool_client, self.scripts, self.keys, self.shards.names(queue))

    def mark_collected(self):
        """The connection was lost: :meth:`close` keeps what the worker comes back for."""
        self.collected = True

    def close(self):
        if self.closed:
            return
        self.publisher.close()   # publishes confirmed later: read their replies
        # Each step on its own: on a Redis Cluster, one node gone leaves the others'.
        for step in (self.reader.finish_all, partial(self.qos.flush_acks, wait=True),
                     lambda: self.qos.restore_tags(self.inbox.take_back())):
            try:
                step()
            except Exception:   # the connection is gone: reclaim will return them
                logger.debug('celery_streams: could not return the last read', exc_info=True)
        poller = getattr(self.connection, 'poller', None)
        consumed = self.queues.consumed()
        # A clean close deletes the auto-delete queues it consumed (a worker's
        # Broadcast and event queues); a lost connection (kombu's collect) does
        # not: the worker comes back for them and for what was sent meanwhile.
        auto_delete = [] if self.collected else [
            q for q in consumed
            if self.queues[q].auto_delete and not self.queues.others_consume(q, self.consumer_name)]
        for queue in auto_delete:
            try:
                self.queue_delete(queue)
            except Exception as exc:
                logger.warning('celery_streams: could not delete auto-delete queue %r: %s',
                               queue, errors.one_line(exc))
        super().close()
        if not self.collected:
            try:
                self.liveness.forget()
                self.liveness.leave_groups([q for q in consumed if q not in auto_delete])
            except Exception:
                logger.debug('celery_streams: could not leave the consumer groups', exc_info=True)
        self.qos.loop_turn(None)   # acks from now on are sent at once
        if poller is not None and self.collected and self.qos.holds_messages():
            poller.hold(self)      # running tasks: renewed until acked (their acks still work)
        elif poller is not None:
            poller.discard(self)
        self.reader.close()
        self.topology.disconnect()


class _PrintsClusterURLs:
    """``Transport.can_parse_url``: kombu parses this transport's URLs (asked of the class),
    but a connection to a Redis Cluster prints its own URL (asked of the transport, for
    ``Connection.as_uri``: kombu's parser takes the list of seed nodes for a bad port)."""

    def __get__(self, transport, owner=None) -> bool:
        return transport is not None and topology_class(transport.address).prints_own_url


class Transport(virtual.Transport):
    """Kombu transport: Redis Streams with consumer groups."""

    client: Connection  # type: ignore[assignment]  # kombu: None at class level, set in __init__
    Channel = Channel
    can_parse_url = _PrintsClusterURLs()

    default_port = 6379  # type: ignore[assignment]
    driver_type = 'redis'
    driver_name = 'redis'
    polling_interval = None  # type: ignore[assignment]

    implements = virtual.Transport.implements.extend(
        asynchronous=True,
        batch_publish=True,
        exchange_type=frozenset(['direct', 'topic', 'fanout']),
    )

    # kombu's class attributes are 1-tuples to mypy; any tuple of exception classes is meant.
    connection_errors = errors.connection_errors  # type: ignore[assignment]
    channel_errors = errors.channel_errors  # type: ignore[assignment]
    #: Only these make kombu retry a connection (and fail over to an alternate URL).
    recoverable_connection_errors = errors.connection_errors
    recoverable_channel_errors = ()

    def __init__(self, client, **kwargs):
        self.options = Options.from_transport_options(client.transport_options)
        refuse_foreign_alternates(client)
        self.address = Address.from_kombu(client, self.options)   # options that fit the URL
        super().__init__(client, **kwargs)
        self.poller = Poller(renew_every=self.options.renew_every)

    def driver_version(self):
        return redis.__version__

    def as_uri(self, uri, include_password=False, mask='**') -> str:
        """A Redis Cluster's URL, as given (with its password masked unless asked for)."""
        uri = '%s+%s' % (self.client.transport_cls, uri)
        return uri if include_password else safe_url(uri).replace(':**@', ':%s@' % mask)

    def close_connection(self, connection):
        try:
            super().close_connection(connection)
        finally:
            self.poller.close()

    def _collect(self, connection):
        """The connection was lost (kombu's ``Connection.collect``): close without cleaning up.

        Auto-delete queues stay, and so do liveness keys and group membership:
        the worker reconnects for them, and a broadcast sent meanwhile waits in
        its queue. Unacked messages are still put back if Redis answers.
        """
        for channel in list(self.channels) + list(self._avail_channels):
            channel.mark_collected()
        self.close_connection(connection)

    def register_with_event_loop(self, connection, loop):
        self.poller.attach(loop)

    def drain_events(self, connection, timeout=None):
        self.poller.drain_events(timeout)


DEFAULT_PORT = Transport.default_port
