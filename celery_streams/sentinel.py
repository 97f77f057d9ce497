"""Redis Sentinel: the pool to the master the Sentinels name, and following it.

:class:`SentinelPool` is redis-py's pool to the master Sentinels name, which
counts the times the master moved (:func:`moves`): connections held outside
the pool (a channel's dispatcher, its pipe, its reader) compare that count
and reconnect. :func:`follow_master` asks the Sentinels where the master is
now; :func:`shortfall` tells why a master did not get a publish confirmed by its
replicas: being replaced (the publish is sent again, to the new master), alone,
or a replica behind (:mod:`celery_streams.replication`).
:class:`celery_streams.connection.Address` builds the pools, and
:func:`one_endpoint` makes kombu count a retry as one (see docs/sentinel.md).
"""
from __future__ import annotations

from time import monotonic, sleep
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


#: Seconds a server may take to answer :func:`shortfall`'s questions.
ASK_TIMEOUT = 0.5
#: :func:`shortfall`'s verdicts.
MOVED, ALONE, BEHIND = 'moved', 'alone', 'behind'


def shortfall(pool, written_to, patience: float = 1.0) -> str:
    """Why ``written_to`` (``(host, port)``, the master of ``pool`` when the write was sent)
    did not get a write confirmed by its replicas in time.

    * :data:`MOVED`: it is being replaced. The Sentinels name another master, or
      a server they list as its replica answers as a master promoted from it
      (its ``master_replid2`` is this master's replication id): after ``SENTINEL
      FAILOVER`` the replica is a master at once, the Sentinels name it about a
      second later (this waits up to ``patience`` seconds for that, so a publish
      sent again goes there), and the old master takes writes that its demotion
      throws away for about 10 s.
    * :data:`ALONE`: it is the master the Sentinels name and has no replica online
      (a replica down; a new master whose old one is not demoted yet): no
      failover can keep a write now, and none can lose one to a replica.
    * :data:`BEHIND`: it has replicas online that did not confirm in time, or no
      Sentinel, or it cannot be told.
    """
    if not isinstance(pool, SentinelConnectionPool) or written_to is None:
        return BEHIND
    follow_master(pool)
    if pool.master_address != written_to:
        return MOVED
    mine = replication_info(pool, written_to)
    if mine is None:
        return BEHIND
    if promoted_from(pool, written_to, mine.get('master_replid')) is not None:
        deadline = monotonic() + patience
        while monotonic() < deadline and not follow_master(pool):
            sleep(0.05)
        return MOVED
    online = [r for name, r in mine.items() if name.startswith('slave') and isinstance(r, dict)
              and r.get('state') == 'online']
    return BEHIND if online else ALONE


def replication_info(pool, address) -> dict | None:
    """``INFO replication`` of the server at ``address`` (the credentials of ``pool``), or None."""
    credentials = {k: pool.connection_kwargs.get(k) for k in ('username', 'password')}
    try:
        with redis.Redis(host=address[0], port=int(address[1]), socket_timeout=ASK_TIMEOUT,
                         socket_connect_timeout=ASK_TIMEOUT, retry=Retry(NoBackoff(), 0),
                         decode_responses=True, **credentials) as client:
            return client.info('replication')
    except redis.RedisError:
        return None


def promoted_from(pool, master, replid) -> tuple | None:
    """``(host, port)`` of a server the Sentinels list as a replica of ``master`` that answers
    as a master promoted from it (``master_replid2`` = ``replid``), or None."""
    try:
        replicas = pool.sentinel_manager.discover_slaves(pool.service_name)
    except redis.RedisError:
        return None
    for host, port in replicas:
        address = (host, int(port))
        if replid is None or address == tuple(master):
            continue
        info = replication_info(pool, address)
        if info and info.get('role') == 'master' and info.get('master_replid2') == replid:
            return address
    return None


def one_endpoint(connection) -> None:
    """Make kombu's ``connection`` (whose URLs name Sentinels) count each attempt as a retry.

    kombu cycles through ``;``-separated URLs and sleeps once per cycle, so a
    retry policy of 40 retries with three Sentinel URLs sleeps 13 times (~2.4 s
    for 0.25 s intervals), shorter than a promotion. Here every attempt asks
    every Sentinel already: no URL to switch to, and every failed attempt
    sleeps its interval, as with one URL.
    """
    connection.cycle = None
    connection.completes_cycle = _every_retry


def _every_retry(retries) -> bool:
    return True
