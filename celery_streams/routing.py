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

from . import errors, replication, scheduler, wire
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
        key = self.keys.stream(queue, bucket)
        expires = self.queues.expires(queue)
        if _publish_batch is not None:
            _publish_batch.add(lambda pipe: _xadd(pipe, key, payload, expires))
            return
        commands = [('XADD', key, '*', 'payload', payload)]
        if expires is not None:
            commands.append(('PEXPIRE', key, expires))
        if self.wait:
            commands.append(self.wait)
        try:
            replies = wire.calls(self.channel.pool, commands, raise_on_error=True)
        except redis.ResponseError as exc:
            raise errors.translate_write_error(exc) from None
        if self.wait:
            replication.confirm(replies[-1], self.options, self.channel.pool)

    def _schedule(self, queue, bucket, due, payload, if_exists, _publish_batch=None, pipe=None):
        """Add a message due at ``due`` (ms) to the schedule of ``queue`` (the ``schedule`` script).

        ``if_exists``: only while the queue's main stream exists (a queue known
        from bindings only). Returns 1, or None when the queue is gone.
        """
        keys = [self.keys.scheduled(queue), self.keys.stream(queue)]
        args = [due, bucket, scheduler.new_token(), payload, '1' if if_exists else '0']
        if pipe is not None:
            return self.scripts.schedule(keys=keys, args=args, client=pipe)
        if _publish_batch is not None:
            _publish_batch.add(lambda pipe: self.scripts.schedule(keys=keys, args=args, client=pipe))
            return None
        try:
            return self._call(self.channel.pool, 'schedule', keys, args)
        except redis.ResponseError as exc:
            raise errors.translate_write_error(exc) from None

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
            if batch is not None:
                self._route_in_batch(batch, exchange, kind, routing_key, message)
                return
            if self._route(exchange, kind, routing_key, message) >= 0:
                return
        declared_here = {queue for _, _, queue in self.queues.declared_bindings(exchange)}
        queues = [q for q in channel._lookup(exchange, routing_key) if q and q != channel.deadletter_queue]
        for queue in queues:
            if queue in declared_here:
                self.put(queue, message, **kwargs)
        elsewhere = [q for q in queues if q not in declared_here]
        if elsewhere:
            self._append_if_exists(exchange, elsewhere, message, self.bucket(message), 0, **kwargs)

    def _route(self, exchange, kind, routing_key, message) -> int:
        """Look up the bindings and append, in one round trip (the ``route`` script).

        Returns how many queues got the message, or -1 when Redis has no
        bindings for the exchange (nuked): the caller restores them.
        """
        try:
            return self._call(self.channel.pool, 'route', [self.keys.bindings(exchange)],
                              self._route_argv(exchange, kind, routing_key, message))
        except redis.ResponseError as exc:
            raise errors.translate_write_error(exc) from None

    def _call(self, pool, name, keys, args):
        """:meth:`Scripts.call`, with ``WAIT`` pipelined behind it when publishes are confirmed."""
        if not self.wait:
            return self.scripts.call(pool, name, keys, args)
        command = self.scripts.command(name, keys, args)
        replies = wire.calls(pool, [command, self.wait])
        if isinstance(replies[0], redis.exceptions.NoScriptError):
            self.scripts.reload(name)
            replies = wire.calls(pool, [command, self.wait])
        if isinstance(replies[0], Exception):
            raise replies[0]
        replication.confirm(replies[1], self.options, pool)
        return replies[0]

    def _route_argv(self, exchange, kind, routing_key, message) -> list:
        declared = {queue: self.queues.expires(queue) or 0
                    for _, _, queue in self.queues.declared_bindings(exchange)}
        now_ms = self.channel.server_time_ms()
        due = scheduler.due_ms(message, now_ms, self.options)
        return [kind, routing_key or '', serialize(message, now_ms), self.keys.queue_head,
                self.bucket(message), SEP, due or 0, scheduler.new_token() if due else '',
                *[x for pair in declared.items() for x in pair]]

    def _route_in_batch(self, batch, exchange, kind, routing_key, message):
        """The ``route`` script in a publish batch; without bindings, publish as below at flush."""
        key = self.keys.bindings(exchange)
        argv = self._route_argv(exchange, kind, routing_key, message)

        def fall_back(reply):
            if reply == -1:   # no bindings in Redis: restore them from this process's declarations
                for queue in self.channel._lookup(exchange, routing_key):
                    self.put(queue, message)

        batch.add(lambda pipe: self.scripts.route(keys=[key], args=argv, client=pipe),
                  on_result=fall_back)

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
        now_ms = self.channel.server_time_ms()
        payload = serialize(message, now_ms)
        due = scheduler.due_ms(message, now_ms, self.options) if schedule else None

        def append(pipe):
            for queue in queues:
                if due is not None:
                    self._schedule(queue, bucket, due, payload, True, pipe=pipe)
                else:
                    self.scripts.append(keys=[self.keys.stream(queue, bucket)], client=pipe,
                                        args=[maxlen, payload, self.queues.expires(queue) or 0])
            return pipe

        if _publish_batch is not None:
            _publish_batch.add(append)
            return
        with self.channel.pool_client.pipeline(transaction=False) as pipe:
            append(pipe)
            if self.wait:
                pipe.execute_command(*self.wait)
            results = pipe.execute(raise_on_error=False)
        confirmed = results.pop() if self.wait else None
        for result in results:
            if isinstance(result, Exception):
                raise errors.translate_write_error(result)
        gone = {queue for queue, result in zip(queues, results) if result is None}
        if gone:
            self.queues.drop_stale_bindings(exchange, gone)
        if self.wait:
            replication.confirm(confirmed, self.options, self.channel.pool)


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


def _xadd(pipe, key, payload, expires):
    pipe.xadd(key, {'payload': payload})
    if expires is not None:
        pipe.pexpire(key, expires)
    return pipe
