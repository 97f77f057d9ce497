"""Redis Sentinel: the pool to the master the Sentinels name, and following it.

:class:`SentinelPool` is redis-py's pool to the master Sentinels name, which
counts the times the master moved (:func:`moves`): connections held outside
the pool (a channel's dispatcher, its pipe, its reader) compare that count
and reconnect. :func:`follow_master` asks the Sentinels where the master is
now. :class:`celery_streams.connection.Address` builds the pools
(see docs/sentinel.md).
"""
from __future__ import annotations

from typing import Any, Mapping

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import MasterNotFoundError, Sentinel, SentinelConnectionPool

#: Seconds a question to one Sentinel may take (connect, reply) unless ``sentinel_kwargs``
#: or the socket options say otherwise: a silent Sentinel must not hold up the others.
SENTINEL_TIMEOUT = 5.0


class Sentinels(Sentinel):
    """redis-py's Sentinel client, whose "no master" error is one short line."""

    def discover_master(self, service_name):
        try:
            return super().discover_master(service_name)
        except MasterNotFoundError:
            where = ','.join('{host}:{port}'.format_map(s.connection_pool.connection_kwargs)
                             for s in self.sentinels)
            raise MasterNotFoundError(
                'no master %r from the Sentinels at %s: none answered, or none knows a healthy '
                'master by that name' % (service_name, where)) from None


class SentinelPool(SentinelConnectionPool):
    """redis-py's pool to the master Sentinels name; closing it closes the Sentinel connections too.

    :attr:`moves` counts the times the master moved: redis-py drops only the
    idle connections then, so the ones held outside the pool (a channel's
    dispatcher, its pipes, its lanes) compare it and reconnect.
    """

    moves = 0
    #: A pool whose last known master this one connects to
    #: (see :meth:`~celery_streams.connection.Address.pool`).
    leader: SentinelPool | None = None

    def get_master_address(self):
        if self.leader is not None:
            return self.leader.master_address or self.leader.get_master_address()
        before = self.master_address
        address = super().get_master_address()
        if before is not None and address != before:
            self.moves += 1
        return address

    def disconnect(self, inuse_connections: bool = True) -> None:
        super().disconnect(inuse_connections)
        if inuse_connections:   # the pool is closed (redis-py only drops idle ones on a failover)
            for sentinel in self.sentinel_manager.sentinels:
                sentinel.close()


def sentinel_arguments(pool_arguments: Mapping[str, Any], given: Mapping[str, Any] | None) -> dict:
    """redis-py arguments of the connections to the Sentinels: ``sentinel_kwargs`` over the
    socket options of the broker connection, with :data:`SENTINEL_TIMEOUT` and no retries."""
    arguments = {k: v for k, v in pool_arguments.items() if k.startswith('socket_')}
    arguments.setdefault('socket_timeout', SENTINEL_TIMEOUT)
    arguments.setdefault('socket_connect_timeout', SENTINEL_TIMEOUT)
    arguments['retry'] = Retry(NoBackoff(), 0)   # one Sentinel down: ask the next one at once
    arguments.update(given or {})
    return arguments


def follow_master(pool) -> bool:
    """Ask the Sentinels where the master is now (a no-op without Sentinel); True if it moved.

    When it moved, redis-py drops the idle connections to the old one, so
    the next command goes to the new master; held ones follow :func:`moves`.
    """
    if isinstance(pool, SentinelConnectionPool):
        before = moves(pool)
        try:
            pool.get_master_address()
        except redis.ConnectionError:
            return False
        return moves(pool) != before
    return False


def moves(pool) -> int:
    """How many times the master of ``pool`` moved (always 0 without Sentinel)."""
    return getattr(pool, 'moves', 0)
