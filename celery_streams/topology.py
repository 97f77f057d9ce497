"""Where the code differs by deployment: one server (or the master Sentinels name), or a Redis Cluster.

A channel opens one :class:`Topology` (:func:`open_topology`, from its
:class:`~celery_streams.connection.Address`): the object that owns the
channel's connections and everything that differs between the two kinds of
deployment, behind one interface, so no other module asks which kind it runs on
(:class:`ServerTopology` | :class:`ClusterTopology`):

* ``client``: ``redis.Redis`` on a pool | redis-py's ``RedisCluster``;
* ``dispatcher``: :class:`~.wire.Dispatcher`, one held connection |
  :class:`~.cluster.ClusterDispatcher`, one batch per master;
* :meth:`~Topology.open_pipe`: :class:`~.pipe.Pipe` (replies read later) |
  :class:`~.cluster.ClusterPipe` (replies read at once);
* :meth:`~Topology.open_lanes`: :class:`~.lanes.ServerLanes` | :class:`~.lanes.ClusterLanes`;
* :meth:`~Topology.batches`: everything in one batch | one batch per slot;
* ``scripts_span_keys``: True, the ``route`` script and registry pruning run in
  Redis | False, a script touches one slot and those run in the client;
* :meth:`~Topology.follow_master`: asks the Sentinels (if any) | nothing
  (``MOVED`` is followed).

:meth:`Topology.check_server` asks the server what a channel needs to know
before it runs (credentials, the schema version, the scripts, the clock) and
says what is wrong in one line.
"""
from __future__ import annotations

import logging
from time import time
from typing import Callable, Iterable, TypeVar

import redis
from redis.cluster import RedisCluster

from . import errors, wire
from .cluster import ClusterDispatcher, ClusterPipe
from .connection import Address
from .sentinel import follow_master, moves, shortfall
from .keys import SCHEMA_VERSION
from .lanes import ClusterLanes, ServerLanes
from .options import Options
from .pipe import Pipe
from .scripts import NAMES, source
from .slots import by_slot

T = TypeVar('T')
logger = logging.getLogger(__name__)

#: (server, ignored options) pairs this process has warned about already.
_WARNED: set = set()


def topology_class(address: Address) -> type[Topology]:
    """The kind of deployment ``address`` names: a cluster, or one server."""
    return ClusterTopology if address.cluster else ServerTopology


def open_topology(address: Address, options: Options) -> Topology:
    """The connections of one channel to ``address``."""
    return topology_class(address)(address, options)


class Topology:
    """The connections of one channel, and what differs by deployment (see the module)."""

    #: Whether one script may touch the keys of several queues (they lie in one database);
    #: on a Redis Cluster a script touches one slot.
    scripts_span_keys: bool = True
    #: Whether ``Connection.as_uri`` should ask the transport for its URL (a cluster's seed list).
    prints_own_url: bool = False

    client: redis.Redis | RedisCluster
    dispatcher: wire.Dispatcher | ClusterDispatcher

    def __init__(self, address: Address, options: Options):
        self.address = address
        self.options = options

    def open_pipe(self, max_unread: int | None = None, poll: bool = True) -> Pipe | ClusterPipe:
        """A pipe for writes whose replies are read later (acks)."""
        raise NotImplementedError

    def open_publish_pipe(self, max_unread: int) -> Pipe | None:
        """The pipe of ``publish_confirm='later'``, or None where publishes are confirmed at once."""
        raise NotImplementedError

    def open_lanes(self, stream_of: Callable[[str], str]) -> ServerLanes | ClusterLanes:
        """The reader's connections; ``stream_of(queue)`` is the main stream of a queue."""
        raise NotImplementedError

    def batches(self, items: Iterable[T], key: Callable[[T], str]) -> list[list[T]]:
        """``items`` in batches a script can run on: all of them, or one batch per slot of
        ``key(item)`` (non-empty batches only)."""
        items = list(items)
        return [items] if items else []

    def follow_master(self) -> bool:
        """Ask where the master is (Sentinel); True when it moved."""
        return False

    @property
    def master(self) -> tuple | None:
        """``(host, port)`` of the master the Sentinels named last, or None."""
        return None

    def check_server(self, keys, scripts) -> float:
        """Fail early and in one line on credentials, database or schema trouble; write the
        schema key when missing, load the scripts. Returns the server's clock minus this
        host's, in ms.

        A full Redis (``maxmemory``) is no reason to stop: reads, acks and deletes still
        work and free it. It refuses the ``SET NX`` of the schema key even when the key is
        there: the ``GET`` behind it says which version is; a missing key a full Redis
        refused is written by a later channel.
        """
        address = self.address
        try:
            version, offset_ms = self._ask_server(keys, scripts)
        except redis.AuthenticationError as exc:
            raise errors.ConfigurationError(
                'Redis refused the credentials for %s: %s' % (address.where, exc)) from None
        except redis.exceptions.NoPermissionError as exc:
            raise errors.ConfigurationError(
                'the Redis user may not use the transport keys %s* on %s: %s'
                % (keys.prefix, address.where, exc)) from None
        except redis.ResponseError as exc:
            if 'DB index' not in str(exc):
                raise
            raise errors.ConfigurationError(
                'database %d does not exist on %s (%s): use a number below its "databases" setting'
                % (address.db, address.where, exc)) from None
        if version is not None and int(version) != SCHEMA_VERSION:
            raise errors.SchemaMismatch(
                'keys under %r use schema %s, this celery_streams writes schema %s'
                % (keys.prefix, int(version), SCHEMA_VERSION))
        return offset_ms

    def _ask_server(self, keys, scripts) -> tuple:
        """``(schema version or None, clock offset in ms)``."""
        raise NotImplementedError

    def warn_once(self) -> None:
        """Warn once per process and server when keys may be lost to eviction, or options
        are ignored (a Celery worker opens several connections: one warning is enough)."""
        checked = (self.address.where, self.options.ignored)
        if checked in _WARNED:
            return
        _WARNED.add(checked)
        self.options.warn_ignored()
        try:
            policy = self.client.config_get('maxmemory-policy').get('maxmemory-policy', '')
        except redis.ResponseError:   # CONFIG not allowed (ACL, managed Redis)
            return
        if policy and policy != 'noeviction':
            logger.warning(
                "celery_streams: Redis maxmemory-policy is %r: under memory pressure Redis may "
                "evict queue streams and their messages; use 'noeviction'", policy)

    def disconnect(self) -> None:
        """Close every connection of the channel."""
        raise NotImplementedError


def clock_offset_ms(server_time, sent: float) -> float:
    """The server's clock minus this host's, in ms, from the reply of ``TIME`` to a question
    sent at ``sent`` (answered now): ages and deadlines are measured on the server's clock,
    so a host whose clock is off must neither drop fresh messages nor keep stale ones."""
    seconds, micros = server_time
    return (seconds * 1000 + micros / 1000) - (sent + time()) * 500


class ServerTopology(Topology):
    """One server, or the master the Sentinels name (followed after a failover)."""

    client: redis.Redis
    dispatcher: wire.Dispatcher

    def __init__(self, address: Address, options: Options):
        super().__init__(address, options)
        self.pool = address.pool(options)   # with Sentinel: follows the master
        self.client = redis.Redis(connection_pool=self.pool)
        #: Publishes and the other hot commands: one connection, no checkout per call.
        self.dispatcher = wire.Dispatcher(self.pool)

    def open_pipe(self, max_unread=None, poll=True) -> Pipe:
        return Pipe(self.pool, poll=poll, **({} if max_unread is None else {'max_unread': max_unread}))

    def open_publish_pipe(self, max_unread: int) -> Pipe:
        return Pipe(self.pool, max_unread, poll=False)

    def open_lanes(self, stream_of) -> ServerLanes:
        # The reader goes where this channel decided the master is (Sentinel).
        return ServerLanes(lambda: self.address.pool(self.options, follow=self.pool, max_connections=1),
                           lambda: moves(self.pool))

    def follow_master(self) -> bool:
        return follow_master(self.pool)

    @property
    def master(self) -> tuple | None:
        return getattr(self.pool, 'master_address', None)

    def _ask_server(self, keys, scripts) -> tuple:
        with self.client.pipeline(transaction=False) as pipe:
            pipe.ping()
            pipe.set(keys.schema, SCHEMA_VERSION, nx=True)
            pipe.get(keys.schema)
            # Every script, now: an EVALSHA written without waiting (a consumer's group
            # creation on its pipe) and answered NOSCRIPT would only be run again later,
            # after whatever happened meanwhile (a group lost, then re-created unmarked).
            for name in NAMES:
                pipe.script_load(source(name))
            pipe.time()
            sent = time()
            replies = pipe.execute(raise_on_error=False)
        _, written, version, *_, server_time = replies
        for reply in replies:   # a full Redis refuses the SET even of a key that is there
            if isinstance(reply, Exception) and not (reply is written and errors.is_out_of_memory(reply)):
                raise reply
        if version is None:
            errors.say_full(logger, 'schema key %s not written', keys.schema)
        return version, clock_offset_ms(server_time, sent)

    def disconnect(self) -> None:
        self.pool.disconnect()

    def shortfall(self, written_to) -> str:
        """Why the master a publish was written to (``written_to``, :attr:`master` then) did
        not get it confirmed by its replicas in time: being replaced, alone, or a replica
        behind (:func:`celery_streams.sentinel.shortfall`)."""
        return shortfall(self.pool, written_to, self.options.publish_wait_timeout)


class ClusterTopology(Topology):
    """A Redis Cluster: every command to the master of its key's slot."""

    client: RedisCluster
    dispatcher: ClusterDispatcher

    scripts_span_keys = False
    prints_own_url = True

    def __init__(self, address: Address, options: Options):
        super().__init__(address, options)
        self.client = address.cluster_client(options)
        self.dispatcher = ClusterDispatcher(self.client)

    def open_pipe(self, max_unread=None, poll=True) -> ClusterPipe:
        return ClusterPipe(self.dispatcher)

    def open_publish_pipe(self, max_unread: int) -> None:
        return None   # publish_confirm='later' is 'now' on a cluster (docs/cluster.md)

    def open_lanes(self, stream_of) -> ClusterLanes:
        address, options = self.address, self.options
        return ClusterLanes(self.client, lambda host, port: address.node_pool(options, host, port),
                            stream_of)

    def batches(self, items, key) -> list:
        return by_slot(items, key)

    def _ask_server(self, keys, scripts) -> tuple:
        """The scripts are loaded on every master (redis-py's cluster pipelines load none)."""
        client = self.client
        version = client.get(keys.schema)
        if version is None:
            try:
                client.set(keys.schema, SCHEMA_VERSION, nx=True)
            except redis.ResponseError as exc:
                if not errors.is_out_of_memory(exc):
                    raise
                errors.say_full(logger, 'schema key %s not written', keys.schema)
            version = client.get(keys.schema)
        scripts.reload_all()
        node = client.get_node_from_key(keys.schema)
        sent = time()
        return version, clock_offset_ms(client.time(target_nodes=node), sent)

    def disconnect(self) -> None:
        self.dispatcher.disconnect()
