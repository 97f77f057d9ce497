"""Bindings of exchanges to queues: in Redis, shared by every process, and as this process
declared them (kombu's broker state).

A binding is a member of the exchange's set (``Keys.bindings``, member format
:func:`celery_streams.keys.binding_member`). Binding a queue to a fanout
exchange makes it a broadcast queue (:meth:`celery_streams.queues.QueueTable.mark_broadcast`).
A binding a full Redis refused is kept in ``unwritten`` (the queue table's) and
written once Redis has room again.
"""
from __future__ import annotations

import logging

import redis

from . import errors, wire
from .keys import Keys, binding_member, parse_binding

logger = logging.getLogger(__name__)


class Bindings:
    """The bindings one channel knows and writes.

    Its collaborators: the channel's ``client`` and ``dispatcher``, kombu's broker
    ``state`` and ``typeof`` (an exchange's type), ``mark_broadcast(queue, exchange)``
    (the queue table's: the commands that make a queue a broadcast queue) and
    ``unwritten`` (the queue table's set of queues whose declarations wait for room).
    """

    def __init__(self, *, client, dispatcher, keys: Keys, state, typeof, mark_broadcast, unwritten: set):
        self.client = client
        self.dispatcher = dispatcher
        self.keys = keys
        self.state = state
        self.typeof = typeof
        self.mark_broadcast = mark_broadcast
        self.unwritten = unwritten

    def bind(self, exchange: str, routing_key: str, pattern: str, queue: str) -> None:
        """Store a binding; one a full Redis refused is stored once it has room again."""
        for reply in wire.calls(self.dispatcher,
                                self.commands(exchange, routing_key, pattern, queue)):
            if isinstance(reply, Exception) and errors.is_out_of_memory(reply):
                if queue not in self.unwritten:
                    self.unwritten.add(queue)
                    errors.say_full(logger, 'binding of queue %r to %r not stored', queue, exchange)
            elif isinstance(reply, Exception):
                raise errors.translate_write_error(reply)

    def write(self, pipe, exchange, routing_key, pattern, queue) -> None:
        for command in self.commands(exchange, routing_key, pattern, queue):
            pipe.execute_command(*command)

    def commands(self, exchange, routing_key, pattern, queue) -> list[tuple[str | int, ...]]:
        """The commands that store a binding (a fanout one also marks its queue a broadcast
        queue, here and in the registry)."""
        commands: list[tuple[str | int, ...]] = [
            ('SADD', self.keys.bindings(exchange), binding_member(routing_key, pattern, queue))]
        if self.typeof(exchange).type == 'fanout':
            commands += self.mark_broadcast(queue, exchange)
        return commands

    def declared(self, exchange: str) -> list:
        """``(routing_key, pattern, queue)`` of ``exchange`` as this process declared them."""
        return list(self.state.exchanges.get(exchange, {}).get('table') or ())

    def table(self, exchange: str) -> list:
        """The bindings of ``exchange`` from Redis (kombu's ``get_table``).

        When Redis has none (nuked, or never written), this process's own
        declarations are used and written back, so other processes see them again.
        """
        members = wire.call(self.dispatcher, 'SMEMBERS', self.keys.bindings(exchange))
        if members:
            return [parse_binding(member) for member in members]
        local = self.declared(exchange)
        if local:
            try:
                with self.client.pipeline(transaction=False) as pipe:
                    for routing_key, pattern, queue in local:
                        self.write(pipe, exchange, routing_key, pattern, queue)
                    pipe.execute()
            except redis.ResponseError as exc:
                if not errors.is_out_of_memory(exc):
                    raise
                self.unwritten.update(queue for _, _, queue in local)   # routed by them meanwhile
        return local

    def drop_stale(self, exchange: str, gone) -> None:
        """Remove the bindings of ``exchange`` to queues whose streams are ``gone``."""
        stale = [binding_member(k, p, q) for k, p, q in self.table(exchange) if q in gone]
        if stale:
            logger.debug('celery_streams: dropping stale bindings of %r to %s', exchange, sorted(gone))
            self.client.srem(self.keys.bindings(exchange), *stale)

    def everywhere(self):
        """Every binding stored in Redis, not only this process's: ``(queue, exchange, routing_key)``."""
        for key in self.client.scan_iter(match=self.keys.match_bindings, count=500):
            exchange = self.keys.parse_bindings(key.decode() if isinstance(key, bytes) else key)
            if exchange is not None:
                for routing_key, _, queue in self.table(exchange):
                    yield queue, exchange, routing_key
