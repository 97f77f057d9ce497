"""Publishing: the priority bucket, direct/topic/fanout routing and the append paths.

* Through the default exchange (a queue name as routing key) a message is one
  ``XADD`` (and a ``PEXPIRE`` for a queue with ``x-expires``), packed by hand.
* Through a direct or topic exchange, the ``route`` script looks the bindings
  up and appends in one round trip.
* Through a fanout exchange, the message is copied into the stream of every
  bound queue, trimmed to ``fanout_maxlen`` (the ``append`` script).
* A Celery task whose ETA is further ahead than ``delayed_delivery_threshold``
  goes into each queue's schedule instead of its stream (delayed delivery,
  :mod:`celery_streams.scheduler`): the ``schedule`` script through the
  default exchange, the ``route`` script (given the due time) through a direct
  or topic exchange. Broadcasts are never scheduled.

Queues this process declared are created when missing: nothing published
before a worker declared its queue, or after a nuke, is lost. Queues known only
from bindings another process wrote (a reply queue, a broadcast queue)
receive a message only while their stream exists: a queue that expired or was
deleted leaves a stale binding, which is removed.
"""
from __future__ import annotations

from bisect import bisect
from fnmatch import fnmatchcase

import redis
from kombu.utils.json import dumps

from . import errors, replication, scheduler
from .keys import SEP


class Router:
    """The publish side of one channel."""

    def __init__(self, channel):
        self.channel = channel
        self.options = channel.options
        self.keys = channel.keys
        self.queues = channel.queues
        self.scripts = channel.scripts
        #: ``WAIT`` sent behind every write (``publish_wait_replicas``), or None.
        self.wait = replication.wait_command(self.options)

    def bucket(self, message) -> int:
        """The priority bucket of ``message`` (kombu: the step at or below its priority)."""
        steps = self.options.priority_steps
        return steps[bisect(steps, self.channel._get_message_priority(message)) - 1]

    def put(self, queue, message, _publish_batch=None, **kwargs):
        """Append to the stream of a queue by name (created when missing), or schedule it."""
        bucket = self.bucket(message)
        now_ms = self.channel.server_time_ms()
        payload = serialize(message, now_ms)
        due = scheduler.due_ms(message, now_ms, self.options)
        if due is not None:
            return self._schedule(queue, bucket, due, payload, False, _publish_batch)
        self._write(_xadd(self.keys.stream(queue, bucket), payload, self.queues.expires(queue)),
                    _publish_batch)

    def _schedule(self, queue, bucket, due, payload, if_exists, _publish_batch=None):
        """Add a message due at ``due`` (ms) to the schedule of ``queue`` (the ``schedule`` script).

        ``if_exists``: only while the queue's main stream exists (a queue known
        from bindings only). Returns 1, or None when the queue is gone.
        """
        replies = self._write([self._schedule_command(queue, bucket, due, payload, if_exists)],
                              _publish_batch)
        return replies and replies[0]

    def _schedule_command(self, queue, bucket, due, payload, if_exists) -> tuple:
        return self.scripts.command('schedule', [self.keys.scheduled(queue), self.keys.stream(queue)],
                                    [due, bucket, scheduler.new_token(), payload,
                                     '1' if if_exists else '0'])

    def _write(self, commands, batch=None, on_result=None):
        """One publish's commands: buffered in ``batch``, or sent now; their replies (None if buffered).

        ``on_result(reply of the first command)``: called once the commands ran.
        """
        if batch is not None:
            batch.add(commands, on_result)
            return None
        replies = self.run(commands)
        if on_result is not None:
            on_result(replies[0])
        return replies

    def run(self, commands) -> list:
        """Send ``commands`` in one round trip (``WAIT`` behind them when publishes are
        confirmed by replicas); their replies, or the first error, in one line."""
        wait = self.wait
        replies = self.scripts.run(self.channel.line, [*commands, wait] if wait else commands)
        confirmed = replies.pop() if wait else None
        for reply in replies:
            if isinstance(reply, redis.ResponseError):
                raise errors.translate_write_error(reply) from None
            if isinstance(reply, Exception):
                raise reply
        if wait:
            replication.confirm(confirmed, self.options, self.channel.pool)
        return replies

    def publish(self, message, exchange, routing_key, **kwargs):
        """Route one message through ``exchange`` and append it (kombu's ``basic_publish``)."""
        channel = self.channel
        if not exchange:
            return self.put(routing_key, message, **kwargs)
        kind = channel.typeof(exchange).type
        if kind == 'fanout':
            return self.put_fanout(exchange, message, routing_key, **kwargs)
        if not channel.deadletter_queue:
            batch = kwargs.get('_publish_batch')
            route = self.scripts.command('route', [self.keys.bindings(exchange)],
                                         self._route_argv(exchange, kind, routing_key, message))

            def fall_back(delivered):
                if delivered == -1:   # no bindings in Redis: route by this process's declarations
                    self._put_declared(exchange, routing_key, message)   # now: a batch is flushing

            self._write([route], batch, on_result=fall_back)
            return
        self._put_declared(exchange, routing_key, message, kwargs.get('_publish_batch'))

    def _put_declared(self, exchange, routing_key, message, batch=None):
        """Route with kombu's lookup: to the queues this process declared (created when
        missing), and to the others only while they exist."""
        channel = self.channel
        declared_here = {queue for _, _, queue in self.queues.declared_bindings(exchange)}
        queues = [q for q in channel._lookup(exchange, routing_key) if q and q != channel.deadletter_queue]
        for queue in queues:
            if queue in declared_here:
                self.put(queue, message, _publish_batch=batch)
        elsewhere = [q for q in queues if q not in declared_here]
        if elsewhere:
            self._append_if_exists(exchange, elsewhere, message, self.bucket(message), 0,
                                   _publish_batch=batch)

    def _route_argv(self, exchange, kind, routing_key, message) -> list:
        declared = {queue: self.queues.expires(queue) or 0
                    for _, _, queue in self.queues.declared_bindings(exchange)}
        now_ms = self.channel.server_time_ms()
        due = scheduler.due_ms(message, now_ms, self.options)
        return [kind, routing_key or '', serialize(message, now_ms), self.keys.queue_head,
                self.bucket(message), SEP, due or 0, scheduler.new_token() if due else '',
                *[x for pair in declared.items() for x in pair]]

    def put_fanout(self, exchange, message, routing_key, **kwargs):
        """Copy a broadcast into the stream of every bound queue (priority bucket 0), trimmed.

        Never scheduled: a broadcast with an ETA is copied at once.
        """
        queues = [queue for bound_key, _, queue in self.queues.table(exchange)
                  if fanout_matches(bound_key, routing_key)]
        if queues:
            self._append_if_exists(exchange, queues, message, 0, self.options.fanout_maxlen,
                                   schedule=False, **kwargs)

    def _append_if_exists(self, exchange, queues, message, bucket, maxlen, _publish_batch=None,
                          schedule=True, **kwargs):
        """Append (or schedule) to each of ``queues`` while its stream exists; bindings of
        the ones gone are removed."""
        now_ms = self.channel.server_time_ms()
        payload = serialize(message, now_ms)
        due = scheduler.due_ms(message, now_ms, self.options) if schedule else None
        commands = [
            self._schedule_command(queue, bucket, due, payload, True) if due is not None else
            self.scripts.command('append', [self.keys.stream(queue, bucket)],
                                 [maxlen, payload, self.queues.expires(queue) or 0])
            for queue in queues]
        replies = self._write(commands, _publish_batch)
        if replies is not None:
            gone = {queue for queue, reply in zip(queues, replies) if reply is None}
            if gone:
                self.queues.drop_stale_bindings(exchange, gone)


def serialize(message, now_ms: float) -> str:
    """The stored form of kombu's envelope: its JSON, less the delivery tag.

    A tag names one delivery, so readers make their own; stored, it would
    only cost ~50 bytes per message. A message with an ``expiration`` (kombu's
    per-message TTL, Celery's ``expires``) carries its deadline, in ms since the
    epoch by the server's clock (``now_ms``), as ``x-deadline``: requeues and
    restores keep it.
    """
    properties = message['properties']
    properties.pop('delivery_tag', None)
    expiration = properties.get('expiration')
    if expiration is not None and 'x-deadline' not in message:
        try:
            message['x-deadline'] = int(now_ms + float(expiration))
        except (TypeError, ValueError):
            pass
    return dumps(message)


def fanout_matches(bound_key, routing_key) -> bool:
    """kombu Redis semantics: a binding key may be a pattern (``#`` and ``*``)."""
    if not bound_key or bound_key == '#':
        return True
    return fnmatchcase(routing_key or '', bound_key.replace('#', '*'))


def _xadd(key, payload, expires) -> list:
    """The commands appending ``payload`` to stream ``key`` (renewing its ``x-expires``)."""
    commands = [('XADD', key, '*', 'payload', payload)]
    if expires is not None:
        commands.append(('PEXPIRE', key, expires))
    return commands
