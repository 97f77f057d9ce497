"""Kombu transport on Redis Streams consumer groups.

Use it from Celery with two settings::

    broker_url = 'redis://localhost:6379/0'
    broker_transport = 'celery_streams.transport:Transport'

or, once ``import celery_streams`` ran in the process, with a URL alone:
``redis-streams://localhost:6379/0`` (``rediss-streams://`` for TLS).

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

Transport options: see :mod:`celery_streams.options`. Key schema: see
:mod:`celery_streams.keys`.
"""
from __future__ import annotations

import logging
import os
import secrets
import socket
import sys
import threading
from collections import deque
from bisect import bisect
from fnmatch import fnmatchcase
from functools import cached_property
from time import monotonic, time
from typing import NamedTuple

import redis
from kombu.transport import virtual
from kombu.transport.base import to_rabbitmq_queue_arguments
from kombu.utils.json import dumps, loads

from . import errors, wire
from .keys import (FANOUT, SCHEMA_VERSION, SEP, TASK, Keys, binding_member, glob_escape,
                   parse_binding)
from .options import Options
from .poller import Poller
from .publish import PublishBatch
from .qos import QoS, make_tag, parse_tag
from .scripts import Scripts

logger = logging.getLogger(__name__)

#: Messages read at once by a consumer without a prefetch limit (no_ack consumers).
UNLIMITED_BATCH = 100
#: While messages are held, a consumer reads again once this many (or half its
#: prefetch window) are free, so a busy worker reads in batches.
REFILL_AT = 4
#: Seconds between two prunings of the queue registry by a consuming channel.
PRUNE_EVERY = 600.0
#: Queued acks are sent at the latest when this many are waiting, or when
#: handing over a batch has taken this many seconds.
ACK_BATCH = 256
ACK_DELAY = 0.005
#: URL schemes this transport answers to (registered by ``import celery_streams``).
SCHEMES = ('redis-streams', 'rediss-streams')
TLS_SCHEMES = ('rediss-streams',)


class Channel(virtual.Channel):
    """One kombu channel: a pooled client for writes, a dedicated one for the blocking read."""

    QoS = QoS
    supports_fanout = True
    do_restore = True

    #: The read outstanding on :attr:`client` (a :class:`Read`).
    _reading = None
    #: Set when kombu collects the connection after it was lost.
    _collected = False

    #: kombu's option, with one more value as the default: ``auto`` stores a
    #: text body (JSON) as it is and a binary one in base64, where kombu's
    #: Redis transport base64-encodes every body (a third larger).
    body_encoding = 'auto'

    def encode_body(self, body, encoding=None):
        if encoding == 'auto':
            encoding = 'utf-8' if isinstance(body, str) else 'base64'
        return super().encode_body(body, encoding)

    def __init__(self, connection, **kwargs):
        super().__init__(connection, **kwargs)
        options = self.options = connection.options
        self.keys = Keys(options.global_keyprefix, options.priority_steps)
        self.group = options.consumer_group
        self.block_ms = int(options.polling_interval * 1000)
        # Unique per channel instance: a reconnected channel must not inherit the
        # entries of its predecessor (they are reclaimed once its liveness lapses).
        self.consumer_name = '%s:%s:%s' % (socket.gethostname(), os.getpid(), secrets.token_hex(3))
        self.visibility_ms = int(options.visibility_timeout * 1000)
        self.reclaim_every = min(max(options.visibility_timeout / 4, 0.5), 60.0)
        self._next_reclaim = 0.0
        self._next_prune = monotonic() + PRUNE_EVERY
        self._alive_queues = frozenset()
        self._noack_queues = set()
        self._fanout_queues = {}       # queue -> exchange, for queues bound to a fanout exchange
        self._expires = {}             # queue -> x-expires in ms
        self._message_ttl = {}         # queue -> x-message-ttl in ms
        self._auto_delete = set()
        self._consumed = set()         # every queue this channel consumed from
        self._deleted = set()          # queues this process deleted: never healed
        self._expiry_refreshed_at = 0.0
        self._rotation = 0
        self._block_next = False       # the last read found nothing: wait for new entries
        self._buckets_in_use = set()   # priority bucket streams (not 0) known to exist
        self._buffer = deque()         # (queue, payload) read but not yet delivered
        self._acks = deque()           # tags acked by the app, not yet sent
        self._loop_thread = None       # the thread whose acks wait for the next turn
        self.pool = redis.ConnectionPool(**self._connparams())
        self.pool_client = redis.Redis(connection_pool=self.pool)
        self.scripts = Scripts(self.pool_client)
        try:
            self._check_server()
        except Exception:
            self.pool.disconnect()
            raise
        connection.poller.add(self)

    # -- connecting -----------------------------------------------------------

    def _connparams(self):
        conninfo = self.connection.client
        options = self.options
        params = {
            'host': conninfo.hostname or '127.0.0.1',
            'port': conninfo.port or DEFAULT_PORT,
            'db': _database(conninfo.virtual_host),
            'username': conninfo.userid,
            'password': conninfo.password,
            'max_connections': options.max_connections,
            'socket_timeout': options.socket_timeout,
            'socket_connect_timeout': options.socket_connect_timeout,
            'socket_keepalive': options.socket_keepalive,
            'socket_keepalive_options': options.socket_keepalive_options,
            'health_check_interval': options.health_check_interval,
            'retry_on_timeout': options.retry_on_timeout,
            'client_name': options.client_name,
        }
        ssl = conninfo.ssl
        if ssl or conninfo.transport_cls in TLS_SCHEMES:
            params['connection_class'] = redis.SSLConnection
            if isinstance(ssl, dict):
                params.update(ssl)
        return {k: v for k, v in params.items() if v is not None}

    def _check_server(self):
        """Fail early and in one line on credentials, schema or eviction trouble."""
        try:
            with self.pool_client.pipeline(transaction=False) as pipe:
                pipe.ping()
                pipe.set(self.keys.schema, SCHEMA_VERSION, nx=True)
                pipe.get(self.keys.schema)
                pipe.script_load(self.scripts.read.script)
                _, _, version, _ = pipe.execute()
        except redis.AuthenticationError as exc:
            raise errors.ConfigurationError(
                'Redis refused the credentials for %s: %s' % (self._where(), exc)) from None
        except redis.exceptions.NoPermissionError as exc:
            raise errors.ConfigurationError(
                'the Redis user may not use the transport keys %s* on %s: %s'
                % (self.keys.prefix, self._where(), exc)) from None
        if version is not None and int(version) != SCHEMA_VERSION:
            raise errors.SchemaMismatch(
                'keys under %r use schema %s, this celery_streams writes schema %s'
                % (self.keys.prefix, int(version), SCHEMA_VERSION))
        self.connection.check_eviction_policy(self.pool_client)

    def _where(self):
        conninfo = self.connection.client
        return '%s:%s' % (conninfo.hostname or '127.0.0.1', conninfo.port or DEFAULT_PORT)

    @cached_property
    def client(self):
        """The dedicated connection for the blocking read (``client.connection``)."""
        return redis.Redis(connection_pool=redis.ConnectionPool(
            **dict(self._connparams(), max_connections=1)), single_connection_client=True)

    def drop_reader_connection(self):
        client = self.__dict__.get('client')
        if client is not None and client.connection is not None:
            client.connection.disconnect()
        self._reading = None

    # -- declaring ------------------------------------------------------------

    def _new_queue(self, queue, auto_delete=False, **kwargs):
        if '{' in queue or '}' in queue:
            raise errors.ConfigurationError(
                'queue name %r: braces are not allowed (they delimit the queue in its Redis keys)'
                % queue)
        arguments = kwargs.get('arguments') or {}
        self._deleted.discard(queue)
        if auto_delete:
            self._auto_delete.add(queue)
        self._set_or_clear(self._expires, queue, arguments.get('x-expires'))
        self._set_or_clear(self._message_ttl, queue, arguments.get('x-message-ttl'))
        with self.pool_client.pipeline(transaction=False) as pipe:
            pipe.xgroup_create(self.keys.queue(queue), self.group, id='0', mkstream=True)
            pipe.hsetnx(self.keys.queues, queue, TASK)
            if queue in self._expires:
                for stream in self.keys.queue_streams(queue):
                    pipe.pexpire(stream, self._expires[queue])
            _raise_unless_busygroup(pipe.execute(raise_on_error=False))

    @staticmethod
    def _set_or_clear(mapping, queue, value):
        try:
            mapping[queue] = int(value)
        except (TypeError, ValueError):
            mapping.pop(queue, None)

    def prepare_queue_arguments(self, arguments, **kwargs):
        return to_rabbitmq_queue_arguments(arguments, **kwargs)

    def _has_queue(self, queue, **kwargs):
        return bool(self.pool_client.exists(self.keys.queue(queue)))

    def _queue_bind(self, exchange, routing_key, pattern, queue):
        with self.pool_client.pipeline(transaction=False) as pipe:
            self._write_binding(pipe, exchange, routing_key, pattern, queue)
            pipe.execute()

    def _write_binding(self, pipe, exchange, routing_key, pattern, queue):
        pipe.sadd(self.keys.bindings(exchange), binding_member(routing_key, pattern, queue))
        if self.typeof(exchange).type == 'fanout':
            self._fanout_queues[queue] = exchange
            pipe.hset(self.keys.queues, queue, FANOUT)

    def get_table(self, exchange):
        members = self.pool_client.smembers(self.keys.bindings(exchange))
        if members:
            return [parse_binding(member) for member in members]
        # The bindings are gone (nuked, or never written): fall back on what this
        # process declared, and write them back so other processes see them again.
        local = self.state.exchanges.get(exchange, {}).get('table') or []
        if local:
            with self.pool_client.pipeline(transaction=False) as pipe:
                for routing_key, pattern, queue in local:
                    self._write_binding(pipe, exchange, routing_key, pattern, queue)
                pipe.execute()
        return list(local)

    def queue_delete(self, queue, if_unused=False, if_empty=False, **kwargs):
        if if_empty and self._size(queue):
            return
        with self.pool_client.pipeline(transaction=False) as pipe:
            for exchange, routing_key, args in self.state.queue_bindings(queue):
                _, pattern, _ = self.typeof(exchange).prepare_bind(queue, exchange, routing_key, args)
                pipe.srem(self.keys.bindings(exchange), binding_member(routing_key, pattern, queue))
            pipe.delete(*self.keys.queue_streams(queue))
            pipe.hdel(self.keys.queues, queue)
            pipe.execute()
        self.state.queue_bindings_delete(queue)
        self._auto_delete.discard(queue)
        self._deleted.add(queue)

    # -- publishing -----------------------------------------------------------

    def create_publish_batch(self, max_size):
        return PublishBatch(self, max_size)

    def _bucket(self, message):
        """The priority bucket of ``message`` (kombu: the step at or below its priority)."""
        steps = self.options.priority_steps
        return steps[bisect(steps, self._get_message_priority(message)) - 1]

    def _put(self, queue, message, _publish_batch=None, **kwargs):
        key = self.keys.queue(queue, self._bucket(message))
        fields = {'payload': _serialize(message)}
        expires = self._expires.get(queue)
        if _publish_batch is not None:
            _publish_batch.add(lambda pipe: _xadd(pipe, key, fields, expires))
            return
        commands = [('XADD', key, '*', 'payload', fields['payload'])]
        if expires is not None:
            commands.append(('PEXPIRE', key, expires))
        try:
            wire.calls(self.pool, commands, raise_on_error=True)
        except redis.ResponseError as exc:
            raise errors.translate_write_error(exc) from None

    def basic_publish(self, message, exchange, routing_key, **kwargs):
        """Route one message and append it to the streams of its queues.

        Through the default exchange, and to queues this process declared, a
        missing stream is created: nothing published before a worker declared
        its queue, or after a nuke, is lost. Queues known only from bindings
        another process wrote (a reply queue, a broadcast queue) receive the
        message only while their stream exists: a queue that expired or was
        deleted leaves a stale binding, which is removed here.
        """
        self._inplace_augment_message(message, exchange, routing_key)
        if not exchange:
            return self._put(routing_key, message, **kwargs)
        kind = self.typeof(exchange).type
        if kind == 'fanout':
            return self._put_fanout(exchange, message, routing_key, **kwargs)
        if not self.deadletter_queue:
            batch = kwargs.get('_publish_batch')
            if batch is not None:
                self._route_in_batch(batch, exchange, kind, routing_key, message, kwargs)
                return
            if self._route(exchange, kind, routing_key, message) >= 0:
                return
        declared_here = {queue for _, _, queue in self.state.exchanges.get(exchange, {}).get('table') or ()}
        queues = [q for q in self._lookup(exchange, routing_key) if q and q != self.deadletter_queue]
        for queue in queues:
            if queue in declared_here:
                self._put(queue, message, **kwargs)
        elsewhere = [q for q in queues if q not in declared_here]
        if elsewhere:
            self._append_if_exists(exchange, elsewhere, message, self._bucket(message), 0, **kwargs)

    def _route_command(self, exchange, kind, routing_key, message):
        declared = {}
        for _, _, queue in self.state.exchanges.get(exchange, {}).get('table') or ():
            declared[queue] = self._expires.get(queue, 0)
        return ('EVALSHA', self.scripts.route.sha, 1, self.keys.bindings(exchange),
                kind, routing_key or '', _serialize(message), self.keys.queue('')[:-1],
                self._bucket(message), SEP, *[x for pair in declared.items() for x in pair])

    def _route(self, exchange, kind, routing_key, message):
        """Look up the bindings and append, in one round trip (the ``route`` script).

        Returns how many queues got the message, or -1 when Redis has no
        bindings for the exchange (nuked): the caller restores them.
        """
        command = self._route_command(exchange, kind, routing_key, message)
        try:
            try:
                return wire.call(self.pool, *command)
            except redis.exceptions.NoScriptError:   # the server restarted or flushed its scripts
                self.pool_client.script_load(self.scripts.route.script)
                return wire.call(self.pool, *command)
        except redis.ResponseError as exc:
            raise errors.translate_write_error(exc) from None

    def _route_in_batch(self, batch, exchange, kind, routing_key, message, kwargs):
        """The ``route`` script in a publish batch; without bindings, publish as below at flush."""
        command = self._route_command(exchange, kind, routing_key, message)

        def fall_back(reply):
            if reply == -1:   # no bindings in Redis: restore them from this process's declarations
                for queue in self._lookup(exchange, routing_key):
                    self._put(queue, message)

        batch.add(lambda pipe: self.scripts.route(keys=[command[3]], args=command[4:], client=pipe),
                  on_result=fall_back)

    def _put_fanout(self, exchange, message, routing_key, **kwargs):
        """Copy a broadcast into the stream of every bound queue (priority bucket 0), trimmed."""
        queues = [queue for bound_key, _, queue in self.get_table(exchange)
                  if _fanout_matches(bound_key, routing_key)]
        if queues:
            self._append_if_exists(exchange, queues, message, 0, self.options.fanout_maxlen, **kwargs)

    def _append_if_exists(self, exchange, queues, message, bucket, maxlen, _publish_batch=None, **kwargs):
        payload = _serialize(message)

        def append(pipe):
            for queue in queues:
                self.scripts.append(keys=[self.keys.queue(queue, bucket)], client=pipe,
                                    args=[maxlen, payload, self._expires.get(queue, 0)])
            return pipe

        if _publish_batch is not None:
            _publish_batch.add(append)
            return
        with self.pool_client.pipeline(transaction=False) as pipe:
            results = append(pipe).execute(raise_on_error=False)
        for result in results:
            if isinstance(result, Exception):
                raise errors.translate_write_error(result)
        gone = {queue for queue, result in zip(queues, results) if result is None}
        if gone:
            stale = [binding_member(k, p, q) for k, p, q in self.get_table(exchange) if q in gone]
            if stale:
                logger.debug('celery_streams: dropping stale bindings of %r to %s', exchange, sorted(gone))
                self.pool_client.srem(self.keys.bindings(exchange), *stale)

    def list_bindings(self):
        """Every binding stored in Redis (``celery list bindings``), not only this process's."""
        head = self.keys.bindings('')[:-2]
        for key in self.pool_client.scan_iter(match=glob_escape(head) + '{*}', count=500):
            exchange = _text(key)[len(head) + 1:-1]
            for routing_key, _, queue in self.get_table(exchange):
                yield queue, exchange, routing_key

    # -- consuming ------------------------------------------------------------

    def basic_consume(self, queue, no_ack, *args, **kwargs):
        self._consumed.add(queue)
        if no_ack:
            self._noack_queues.add(queue)
        else:
            self._noack_queues.discard(queue)
        return super().basic_consume(queue, no_ack, *args, **kwargs)

    def basic_cancel(self, consumer_tag):
        queue = self._tag_to_queue.get(consumer_tag)
        result = super().basic_cancel(consumer_tag)
        if queue is not None and queue not in self._active_queues:
            self._restore_buffered(queue)   # read for this consumer, never handed over
            self._noack_queues.discard(queue)
        return result

    @property
    def reading(self):
        return self._reading is not None

    def start_read(self):
        """Send one read over the consumed streams, unless one is out or nothing may be read.

        Returns the socket's file descriptor while a read is outstanding, else None.
        While messages wait, the read is the ``read`` script: it takes the
        prefetch budget from the streams in priority order and returns at once.
        When the last read found nothing, it is ``XREADGROUP ... BLOCK`` over the
        same streams (COUNT 1 each), which returns as soon as anything arrives.
        """
        if self._reading is not None:
            return self._reading.connection._sock.fileno()
        if self.closed or self._buffer or not self._active_queues:
            return None
        budget = self._read_budget()
        if not budget:
            return None
        plan = self._read_plan()
        if not plan:
            return None
        queues = list(dict.fromkeys(queue for queue, _ in plan))
        noack = all(queue in self._noack_queues for queue in queues)
        if not noack and not self._alive_queues.issuperset(self.acked_queues()):
            self._try_renew_liveness()
        self._refresh_expiry(queues)
        if self._block_next:
            command = self._blocking_read(plan, noack)
        else:
            command = self._budget_read(plan, budget, noack)
        connection = self.client.connection
        try:
            if connection._sock is None:
                connection.connect()
            connection.send_command(*command)
        except errors.connection_errors:
            connection.disconnect()
            raise
        self._reading = Read(connection, command[0], queues, noack, monotonic())
        return connection._sock.fileno()

    def _read_plan(self):
        """``(queue, bucket)`` pairs in reading order: priority buckets, then queues.

        Queues bound to a fanout exchange have no priority buckets.
        """
        queues = [q for q in dict.fromkeys(self._active_queues) if q not in self._deleted]
        strategy = self.options.queue_order_strategy
        if strategy == 'sorted':
            queues.sort()
        elif strategy == 'round_robin' and len(queues) > 1:
            start = self._rotation % len(queues)
            queues = queues[start:] + queues[:start]
            self._rotation += 1
        return [(queue, bucket) for bucket in self._read_plan_buckets() for queue in queues
                if not bucket or queue not in self._fanout_queues]

    def _budget_read(self, plan, budget, noack):
        streams = [self.keys.queue(queue, bucket) for queue, bucket in plan]
        optional = ''.join('1' if bucket else '0' for _, bucket in plan)
        return ['EVALSHA', self.scripts.read.sha, len(streams), *streams,
                self.group, self.consumer_name, budget, '1' if noack else '0', optional]

    def _blocking_read(self, plan, noack):
        streams = [self.keys.queue(queue, bucket) for queue, bucket in plan
                   if not bucket or self.keys.queue(queue, bucket) in self._buckets_in_use]
        command = ['XREADGROUP', 'GROUP', self.group, self.consumer_name,
                   'COUNT', 1, 'BLOCK', self.block_ms]
        if noack:
            command.append('NOACK')
        return command + ['STREAMS', *streams, *['>'] * len(streams)]

    def _read_budget(self):
        """How many messages the next read may return (kombu's prefetch rules)."""
        qos = self.qos
        if not qos.can_consume():
            return 0
        if 'can_consume' in vars(qos):
            # Celery's worker_disable_prefetch patched can_consume: one at a time.
            return 1
        estimate = qos.can_consume_max_estimate()
        if estimate is None:
            return UNLIMITED_BATCH
        if estimate < qos.prefetch_count and estimate < min(qos.prefetch_count // 2, REFILL_AT):
            # Messages are still held: refill in batches, not one read per ack.
            return 0
        return estimate

    def finish_read(self):
        """Read the reply of the outstanding read into the buffer. True if it brought messages."""
        read, self._reading = self._reading, None
        try:
            if read.command == 'EVALSHA':
                replies, existing = self.client.parse_response(read.connection, 'EVALSHA')
                self._buckets_in_use = {_text(key) for key in existing}
            else:
                replies = self.client.parse_response(read.connection, 'XREADGROUP')
        except redis.exceptions.NoScriptError:   # the server restarted or flushed its scripts
            self.pool_client.script_load(self.scripts.read.script)
            return False
        except redis.ResponseError as exc:
            if errors.is_missing_group(exc):
                self.heal(read.queues, exc)
                return False
            raise
        except BaseException:
            read.connection.disconnect()
            raise
        self._buffer_reply(replies or (), read.noack)
        self._block_next = not self._buffer
        return bool(self._buffer)

    def has_buffered(self):
        return bool(self._buffer)

    def deliver_buffered(self, limit=None):
        """Hand buffered messages to their consumers while the QoS allows. True if any."""
        delivered, first_error, started = 0, None, monotonic()
        buffer, qos = self._buffer, self.qos
        while buffer and (limit is None or delivered < limit) and qos.can_consume():
            if delivered and _worker_shutting_down():
                break   # a blocking pool (solo) ran one: the rest go back at close
            if self._acks and monotonic() - started > ACK_DELAY:
                self.flush_acks()   # callbacks that run tasks (-P solo): acks go out between them
                started = monotonic()
            queue, payload = buffer.popleft()
            try:
                self.connection._deliver(payload, queue)
            except Exception as exc:   # deliver the rest, then report
                first_error = first_error or exc
            delivered += 1
        if first_error is not None:
            raise first_error
        return bool(delivered)

    def check_stale_read(self, margin):
        """Drop the connection of a read that got no reply long after its BLOCK ran out."""
        if self._reading is not None:
            waited = monotonic() - self._reading.sent_at
            if waited > self.block_ms / 1000 + margin:
                logger.warning('celery_streams: no reply to a read for %.0f s; reconnecting', waited)
                self.drop_reader_connection()
                raise redis.ConnectionError('no reply from Redis for %.0f s' % waited)

    def _buffer_reply(self, replies, noack):
        """Decode what a read returned (XREADGROUP or script shape) into the buffer."""
        settle = []
        for stream, entries in replies:
            queue, bucket = self.keys.parse_stream(_text(stream))
            for entry_id, fields in entries:
                entry_id = _text(entry_id)
                if isinstance(fields, list):   # the script's raw reply
                    fields = dict(zip(fields[::2], fields[1::2]))
                payload = self._decode_entry(queue, entry_id, fields, noack, bucket=bucket)
                if payload is None:
                    continue
                if queue in self._noack_queues:
                    settle.append((queue, bucket, entry_id))
                self._buffer.append((queue, payload))
        if settle:
            self._settle_noack(settle, noack)

    def _decode_entry(self, queue, entry_id, fields, noack, times_in_pel=1, bucket=0):
        """The kombu payload of one entry, or None once a bad entry was dead-lettered.

        ``times_in_pel`` is the group's delivery count of this entry id (1 for a
        fresh read); ``deliveries`` carries the count of earlier entries of the
        same message (requeues, restores).
        """
        fields = {_text(k): v for k, v in (fields or {}).items()}
        try:
            payload = loads(fields['payload'])
            properties = payload['properties']
            delivery_info = properties.setdefault('delivery_info', {})
            deliveries = int(fields.get('deliveries') or 0)
        except Exception as exc:
            problem = 'missing field %s' % exc if isinstance(exc, KeyError) else _one_line(exc)
            self.dead_letter(queue, bucket, entry_id, fields, 'undecodable entry: %s' % problem, noack)
            return None
        delivered = deliveries + times_in_pel
        if delivered > self.options.max_deliveries and not noack:
            self.dead_letter(queue, bucket, entry_id, fields,
                             'delivered %d times, more than max_deliveries=%d'
                             % (delivered, self.options.max_deliveries), noack)
            return None
        ttl = self._message_ttl.get(queue)
        deadline = payload.get('x-deadline')
        if (ttl is not None and _entry_age_ms(entry_id) > ttl) or (deadline and time() * 1000 > deadline):
            self._settle_noack([(queue, bucket, entry_id)], noack)   # expired: dropped, as AMQP does
            return None
        properties['delivery_tag'] = make_tag(entry_id, self.consumer_name, queue, bucket)
        if delivered > 1 or fields.get('redelivered'):
            delivery_info['redelivered'] = True
        return payload

    def dead_letter(self, queue, bucket, entry_id, fields, reason, noack=False):
        """Move one entry to the queue's dead-letter stream, with the reason."""
        logger.warning('celery_streams: moved entry %s of queue %r to its dead letters: %s',
                       entry_id, queue, reason)
        key = self.keys.queue(queue, bucket)
        record = {'reason': reason, 'queue': queue, 'id': entry_id, 'stream': key}
        record.update({'field:' + k: v for k, v in fields.items()})
        with self.pool_client.pipeline(transaction=True) as pipe:
            pipe.xadd(self.keys.dead_letters(queue), record,
                      maxlen=self.options.dead_letter_maxlen, approximate=True)
            if not noack:
                pipe.xack(key, self.group, entry_id)
            pipe.xdel(key, entry_id)
            pipe.execute()

    def _settle_noack(self, settled, noack):
        """Ack (unless read with NOACK) and delete entries of no-ack consumers."""
        with self.pool_client.pipeline(transaction=False) as pipe:
            for queue, bucket, entry_id in settled:
                key = self.keys.queue(queue, bucket)
                if not noack:
                    pipe.xack(key, self.group, entry_id)
                if queue not in self._fanout_queues:
                    pipe.xdel(key, entry_id)
            pipe.execute()

    def _restore_buffered(self, only_queue=None):
        """Return messages read but never handed to a consumer (cancelled, or the channel closes)."""
        # Changed in place: a delivery loop may be iterating this very deque.
        returned = [item for item in self._buffer if only_queue in (None, item[0])]
        kept = [item for item in self._buffer if only_queue not in (None, item[0])]
        self._buffer.clear()
        self._buffer.extend(kept)
        self.restore_tags([payload['properties']['delivery_tag'] for queue, payload in returned
                           if queue not in self._noack_queues])

    # -- reclaim and liveness (at-least-once under failure) -------------------

    def acked_queues(self):
        return [q for q in dict.fromkeys(self._active_queues)
                if q not in self._noack_queues and q not in self._deleted]

    def maybe_reclaim(self):
        """Every ``visibility_timeout / 4``: take over messages of dead consumers.

        They are buffered like a read, within the prefetch budget, and carry
        ``redelivered``. Runs between reads, never while one is outstanding.
        """
        now = monotonic()
        if self._reading is not None or self._buffer or now < self._next_reclaim:
            return
        self._next_reclaim = now + self.reclaim_every
        if now >= self._next_prune:
            self._next_prune = now + PRUNE_EVERY
            try:
                self.prune_registry()
            except redis.ResponseError as exc:   # e.g. an ACL without HKEYS: consuming goes on
                logger.warning('celery_streams: pruning the queue registry failed: %s', _one_line(exc))
        queues = self.acked_queues()
        budget = self._read_budget() if queues else 0
        if not budget:
            return
        streams = [self.keys.queue(queue, bucket)
                   for bucket in self._read_plan_buckets() for queue in queues]
        try:
            claimed = self.scripts.reclaim(
                keys=streams, args=[self.group, self.consumer_name, self.visibility_ms, budget,
                                    *[self.keys.alive_prefix(self.keys.queue_of(k)) for k in streams]])
        except redis.ResponseError as exc:   # e.g. an ACL without XCLAIM: consuming goes on
            logger.warning('celery_streams: reclaim failed: %s', _one_line(exc))
            return
        taken = {}
        for i in range(0, len(claimed), 4):
            queue, bucket = self.keys.parse_stream(_text(claimed[i]))
            entry_id, times, flat = _text(claimed[i + 1]), int(claimed[i + 2]), claimed[i + 3]
            payload = self._decode_entry(queue, entry_id, dict(zip(flat[::2], flat[1::2])),
                                         noack=False, times_in_pel=times, bucket=bucket)
            taken[queue] = taken.get(queue, 0) + 1
            if payload is not None:
                self._buffer.append((queue, payload))
        for queue, count in taken.items():
            logger.info('celery_streams: took over %d message(s) of queue %r from consumers '
                        'silent for more than visibility_timeout', count, queue)

    def prune_registry(self):
        """Forget registered queues whose streams expired; returns how many."""
        return self.scripts.prune_registry(keys=[self.keys.queues], args=[self.keys.queue('')[:-1]])

    def liveness_queues(self):
        """The queues this consumer holds or may hold messages of."""
        queues = set(self.acked_queues())
        queues.update(parse_tag(tag).queue for tag in list(self.qos._delivered))
        return queues

    def renew_liveness(self):
        """Say this consumer lives, for ``visibility_timeout``, on every queue it holds.

        Called from the renewal thread (so a busy ``-P solo`` worker still renews)
        and before the first read of a queue.
        """
        queues = self.liveness_queues()
        if queues:
            with self.pool_client.pipeline(transaction=False) as pipe:
                for queue in queues:
                    pipe.set(self.keys.alive(queue, self.consumer_name), 1, px=self.visibility_ms)
                pipe.execute()
        self._alive_queues = frozenset(queues)

    def _try_renew_liveness(self):
        """Renew, but keep consuming when Redis refuses the write (full: ``maxmemory``).

        Without the key, this consumer's messages may be taken over once
        ``visibility_timeout`` passes: a redelivery, never a loss.
        """
        try:
            self.renew_liveness()
        except redis.ResponseError as exc:
            self._alive_queues = frozenset(self.acked_queues())   # retried by the renewer thread
            logger.warning('celery_streams: could not renew liveness (%s); consuming goes on',
                           _one_line(exc))

    def _forget_liveness(self):
        """At close: whatever this consumer still holds may be reclaimed at once."""
        if self._alive_queues:
            self.pool_client.delete(*[self.keys.alive(q, self.consumer_name) for q in self._alive_queues])
            self._alive_queues = frozenset()

    def _leave_groups(self, queues):
        """Remove this consumer from the groups it read, where it owns nothing any more."""
        with self.pool_client.pipeline(transaction=False) as pipe:
            for queue in queues:
                for stream in self.keys.queue_streams(queue):
                    self.scripts.forget_consumer(keys=[stream], args=[self.group, self.consumer_name],
                                                 client=pipe)
            pipe.execute()

    def heal(self, queues, error):
        """Re-create the groups (and registry, bindings) of ``queues``; log once each.

        Queues this process deleted itself (a pidbox reply queue deleted while its
        consumer still reads) are left deleted.
        """
        queues = [q for q in queues if q not in self._deleted]
        if not queues:
            return
        with self.pool_client.pipeline(transaction=False) as pipe:
            for queue in queues:
                start = '$' if queue in self._fanout_queues else '0'
                pipe.xgroup_create(self.keys.queue(queue), self.group, id=start, mkstream=True)
            results = pipe.execute(raise_on_error=False)
        _raise_unless_busygroup(results)
        self._buckets_in_use.clear()   # the next read (the script) finds them again
        self._block_next = False
        self._expiry_refreshed_at = 0.0
        self._refresh_expiry(queues)
        for queue, result in zip(queues, results):
            if result is True:
                logger.info(
                    'celery_streams: consumer group %r of queue %r was gone (%s); '
                    're-created it at id %s and reading on',
                    self.group, queue, _one_line(error), '$' if queue in self._fanout_queues else '0')
        self.rewrite_declarations(queues)

    def rewrite_declarations(self, queues):
        """Write the registry entries and bindings of ``queues`` as this process declared them."""
        with self.pool_client.pipeline(transaction=False) as pipe:
            pipe.set(self.keys.schema, SCHEMA_VERSION, nx=True)
            for queue in queues:
                pipe.hsetnx(self.keys.queues, queue, TASK)
                for exchange, routing_key, args in self.state.queue_bindings(queue):
                    _, pattern, _ = self.typeof(exchange).prepare_bind(
                        queue, exchange, routing_key, args)
                    self._write_binding(pipe, exchange, routing_key, pattern, queue)
            pipe.execute()

    def _refresh_expiry(self, queues):
        """Keep consumed queues with ``x-expires`` alive (at most every third of it)."""
        expiring = [q for q in queues if q in self._expires]
        if not expiring:
            return
        now = monotonic()
        if now - self._expiry_refreshed_at < min(self._expires[q] for q in expiring) / 3000:
            return
        self._expiry_refreshed_at = now
        with self.pool_client.pipeline(transaction=False) as pipe:
            for queue in expiring:
                for stream in self.keys.queue_streams(queue):
                    pipe.pexpire(stream, self._expires[queue])
            pipe.execute()

    def _get(self, queue):
        """Read one message of ``queue``, highest priority first, without blocking (``basic_get``)."""
        plan = [(queue, bucket) for bucket in self._read_plan_buckets()]
        command = self._budget_read(plan, 1, noack=False)
        for _ in range(100):   # skips dead-lettered and expired entries
            try:
                replies, _ = self.pool_client.execute_command(*command)
            except redis.exceptions.NoScriptError:
                self.pool_client.script_load(self.scripts.read.script)
                continue
            except redis.ResponseError as exc:
                if not errors.is_missing_group(exc):
                    raise
                self.heal([queue], exc)
                continue
            if not replies:
                break
            self._buffer_reply(replies, noack=False)
            if self._buffer:
                if queue not in self._alive_queues:
                    self._alive_queues |= {queue}   # renewed from now on by the renewer
                    try:
                        self.pool_client.set(self.keys.alive(queue, self.consumer_name), 1,
                                             px=self.visibility_ms)
                    except redis.ResponseError as exc:   # full Redis: the renewer retries
                        logger.warning('celery_streams: could not renew liveness (%s)', _one_line(exc))
                return self._buffer.popleft()[1]
        raise virtual.Empty()

    def _read_plan_buckets(self):
        buckets = self.options.priority_steps
        return buckets[::-1] if self.options.priority_semantics == 'rabbitmq' else buckets

    def basic_get(self, queue, no_ack=False, **kwargs):
        message = super().basic_get(queue, no_ack=no_ack, **kwargs)
        if message is not None and no_ack:
            self.ack_tags([message.delivery_tag])
        return message

    # -- acks and restores ----------------------------------------------------

    def ack_later(self, tag):
        """Queue an ack: the consume loop sends the queued acks once per turn.

        An ack from another thread (``-P threads``), or with no consume loop
        running, is sent at once. Until an ack reaches Redis the message is
        pending: a crash then means a redelivery, never a loss.
        """
        self._acks.append(tag)
        if threading.get_ident() != self._loop_thread or len(self._acks) >= ACK_BATCH:
            self.flush_acks()

    def flush_acks(self):
        tags = []
        while True:
            try:
                tags.append(self._acks.popleft())
            except IndexError:
                break
        if tags:
            try:
                self.ack_tags(tags)
            except Exception:
                self._acks.extendleft(reversed(tags))
                raise

    def ack_tags(self, tags):
        """XACK and XDEL the entries of ``tags``: one XACK and one XDEL per stream, one round trip."""
        by_stream = {}
        for tag in map(parse_tag, tags):
            by_stream.setdefault(self.keys.queue(tag.queue, tag.bucket), []).append(tag.entry_id)
        commands = []
        for key, ids in by_stream.items():
            commands += [('XACK', key, self.group, *ids), ('XDEL', key, *ids)]
        wire.calls(self.pool, commands, raise_on_error=True)

    def restore_tags(self, tags, attempted=False):
        """Put entries back at the tail of their stream, if still pending for their reader.

        ``attempted``: the consumer tried the message and gave up (a reject with
        requeue), so this delivery counts towards ``max_deliveries``; a message
        restored unstarted (at shutdown) keeps its count.
        Returns the tags that could not be restored because of an error.
        """
        if not tags:
            return []
        self.flush_acks()   # an acked message must never be restored
        with self.pool_client.pipeline(transaction=False) as pipe:
            for tag in map(parse_tag, tags):
                self.scripts.restore(keys=[self.keys.queue(tag.queue, tag.bucket)], client=pipe,
                                     args=[self.group, tag.consumer, tag.entry_id, int(attempted)])
            results = pipe.execute(raise_on_error=False)
        return [(tag, result) for tag, result in zip(tags, results) if isinstance(result, Exception)]

    def _restore(self, message):
        failed = self.restore_tags([message.delivery_tag])
        if failed:
            raise failed[0][1]

    # -- sizes, purge, close --------------------------------------------------

    def _size(self, queue):
        """Messages no consumer received yet, over every priority bucket."""
        streams = self.keys.queue_streams(queue)
        with self.pool_client.pipeline(transaction=False) as pipe:
            for key in streams:
                pipe.xlen(key)
                pipe.xpending(key, self.group)
            results = pipe.execute(raise_on_error=False)
        size = 0
        for length, pending in zip(results[::2], results[1::2]):
            if isinstance(length, Exception):
                raise length
            pending = 0 if isinstance(pending, Exception) else pending['pending']
            size += max(length - pending, 0)
        return size

    def _purge(self, queue):
        """Empty the queue; its consumer groups stay (``DEL`` would destroy them)."""
        with self.pool_client.pipeline(transaction=False) as pipe:
            for key in self.keys.queue_streams(queue):
                self.scripts.drain(keys=[key], client=pipe)
            return sum(removed for removed, _ in pipe.execute())

    def close(self):
        if self.closed:
            return
        try:
            self.flush_acks()
            if self._reading is not None:
                self.finish_read()
            self._restore_buffered()
        except Exception:   # the connection is gone: reclaim will return them
            logger.debug('celery_streams: could not return the last read', exc_info=True)
        poller = getattr(self.connection, 'poller', None)
        consumed = [q for q in self._consumed if q not in self._deleted]
        # A clean close deletes the auto-delete queues it consumed (a worker's
        # Broadcast and event queues); a lost connection (kombu's collect) does
        # not: the worker comes back for them and for what was sent meanwhile.
        auto_delete = [] if self._collected else [q for q in self._auto_delete if q in consumed]
        for queue in auto_delete:
            try:
                self.queue_delete(queue)
            except Exception as exc:
                logger.warning('celery_streams: could not delete auto-delete queue %r: %s',
                               queue, _one_line(exc))
        super().close()
        if not self._collected:
            try:
                self._forget_liveness()
                self._leave_groups([q for q in consumed if q not in auto_delete])
            except Exception:
                logger.debug('celery_streams: could not leave the consumer groups', exc_info=True)
        if poller is not None:
            poller.discard(self)
        client = self.__dict__.get('client')
        if client is not None:
            client.close()
            client.connection_pool.disconnect()
        self.pool.disconnect()


class Read(NamedTuple):
    """A read sent on a channel's reader connection, its reply not yet parsed."""

    connection: object
    command: str
    queues: list
    noack: bool
    sent_at: float


class Transport(virtual.Transport):
    """Kombu transport: Redis Streams with consumer groups."""

    Channel = Channel

    default_port = 6379  # type: ignore[assignment]
    driver_type = 'redis'
    driver_name = 'redis'
    polling_interval = None  # type: ignore[assignment]

    implements = virtual.Transport.implements.extend(
        asynchronous=True,
        batch_publish=True,
        exchange_type=frozenset(['direct', 'topic', 'fanout']),
    )

    connection_errors = errors.connection_errors
    channel_errors = errors.channel_errors
    #: Only these make kombu retry a connection (and fail over to an alternate URL).
    recoverable_connection_errors = errors.connection_errors
    recoverable_channel_errors = ()

    def __init__(self, client, **kwargs):
        self.options = Options.from_transport_options(client.transport_options)
        _refuse_foreign_alternates(client)
        super().__init__(client, **kwargs)
        self.poller = Poller(renew_every=min(max(self.options.visibility_timeout / 3, 0.2), 60.0))
        self._eviction_checked = False

    def driver_version(self):
        return redis.__version__

    def close_connection(self, connection):
        super().close_connection(connection)
        self.poller.close()

    def _collect(self, connection):
        """The connection was lost (kombu's ``Connection.collect``): close without cleaning up.

        Auto-delete queues stay, and so do liveness keys and group membership:
        the worker reconnects for them, and a broadcast sent meanwhile waits in
        its queue. Unacked messages are still put back if Redis answers.
        """
        for channel in list(self.channels) + list(self._avail_channels):
            channel._collected = True
        self.close_connection(connection)

    def register_with_event_loop(self, connection, loop):
        self.poller.attach(loop)

    def drain_events(self, connection, timeout=None):
        self.poller.drain_events(timeout)

    def check_eviction_policy(self, client):
        """Warn once when the server may evict keys: a stream evicted is a queue lost."""
        if self._eviction_checked:
            return
        self._eviction_checked = True
        self.options.warn_ignored()
        try:
            policy = client.config_get('maxmemory-policy').get('maxmemory-policy', '')
        except redis.ResponseError:   # CONFIG not allowed (ACL, managed Redis)
            return
        if policy and policy != 'noeviction':
            logger.warning(
                "celery_streams: Redis maxmemory-policy is %r: under memory pressure Redis may "
                "evict queue streams and their messages; use 'noeviction'", policy)


DEFAULT_PORT = Transport.default_port


def _refuse_foreign_alternates(client):
    """Failover URLs must select this transport too, or kombu switches to another one."""
    for url in client.alt or ():
        if not isinstance(url, str) or '://' not in url:
            continue
        scheme = url.split('://', 1)[0]
        if scheme not in SCHEMES and scheme != 'celery_streams.transport:Transport':
            raise errors.ConfigurationError(
                'failover URL %s://... would switch to another transport on failover; '
                'write every broker URL as redis-streams:// (or rediss-streams://) '
                'and import celery_streams where the app is created' % scheme)


def _serialize(message):
    """The stored form of kombu's envelope: its JSON, less the delivery tag.

    A tag names one delivery, so readers make their own; stored, it would
    only cost ~50 bytes per message. A message with an ``expiration`` (kombu's
    per-message TTL, Celery's ``expires``) carries its deadline, in ms since the
    epoch, as ``x-deadline``: requeues and restores keep it.
    """
    properties = message['properties']
    properties.pop('delivery_tag', None)
    expiration = properties.get('expiration')
    if expiration is not None and 'x-deadline' not in message:
        try:
            message['x-deadline'] = int(time() * 1000 + float(expiration))
        except (TypeError, ValueError):
            pass
    return dumps(message)


def _xadd(pipe, key, fields, expires):
    pipe.xadd(key, fields)
    if expires is not None:
        pipe.pexpire(key, expires)
    return pipe


def _raise_unless_busygroup(results):
    for result in results:
        if isinstance(result, Exception) and not errors.is_busy_group(result):
            raise errors.translate_write_error(result)


def _database(virtual_host):
    if virtual_host in (None, '', '/'):
        return 0
    text = str(virtual_host).lstrip('/')
    try:
        return int(text)
    except ValueError:
        raise errors.ConfigurationError(
            'the database in a redis URL is a number (as in redis://host:6379/0), not %r'
            % text) from None


def _fanout_matches(bound_key, routing_key):
    """kombu Redis semantics: a binding key may be a pattern (``#`` and ``*``)."""
    if not bound_key or bound_key == '#':
        return True
    return fnmatchcase(routing_key or '', bound_key.replace('#', '*'))


def _worker_shutting_down():
    """True once a Celery worker in this process began its shutdown.

    A pool that runs tasks inside the delivery (``-P solo``) would otherwise run
    a whole prefetched batch after a warm shutdown was asked for.
    """
    state = sys.modules.get('celery.worker.state')
    if state is None:
        return False
    return any(flag not in (None, False) for flag in (state.should_stop, state.should_terminate))


def _entry_age_ms(entry_id):
    return time() * 1000 - int(entry_id.split('-', 1)[0])


def _text(value):
    return value.decode() if isinstance(value, bytes) else value


def _one_line(error):
    return str(error).splitlines()[0] if str(error) else type(error).__name__
