"""Where Redis is and how to reach it: one parser and one client builder.

Both the transport (from kombu's connection info) and the operator commands
(from a broker URL) go through :class:`Address`, so a URL means the same thing
to ``celery worker`` and to ``celery streams``: schemes, default port,
database, credentials and TLS are read in one place.

==================================  ==========================================================
URL                                 meaning
==================================  ==========================================================
``redis-streams://h:6379/0``        this transport (once ``import celery_streams`` ran)
``rediss-streams://h:6380/0``       the same over TLS
``redis://h:6379/0``                with ``broker_transport`` set to this transport
``rediss://h:6380/0``               the same over TLS
``sentinel-streams://s1:26379/0``   the master the Sentinels name (transport option
                                    ``master_name``), followed through failovers; more
                                    Sentinels: ``sentinel-streams://s1;sentinel-streams://s2``
``redis-streams+cluster://h1,h2``   a Redis Cluster, by seed nodes (``host[:port]``,
                                    comma-separated, or ``;``-separated URLs); the
                                    ``celery streams`` commands only, for now
``rediss-streams+cluster://h1,h2``  the same over TLS
==================================  ==========================================================

The database is a number (``/0``; a trailing slash is allowed); no database
means 0. ``broker_use_ssl`` (``True`` or a dict of redis-py ``ssl_*``
arguments) turns TLS on for any scheme but ``sentinel-streams``.

A ``sentinel-streams://`` URL names Sentinels (default port 26379), and every
``;``-separated URL is one more Sentinel to ask, as with kombu's Sentinel
transport. The database, user and password of the first URL are the master's;
``sentinel_kwargs`` holds the Sentinels' own (see docs/sentinel.md). Both
connection pools of a channel are redis-py ``SentinelConnectionPool`` s: each
new connection asks the Sentinels where the master is, and a connection that
meets a demoted master (``READONLY``) is dropped as lost, so kombu reconnects
and the next connections go to the new master.

A ``redis-streams+cluster://`` URL names seed nodes of a Redis Cluster:
``redis-streams+cluster://:pw@h1:7000,h2:7001,h3:7002`` (default port 6379),
or one node per ``;``-separated URL. The credentials, the TLS settings and the
``ssl_*`` query arguments of the first URL apply to every node; the database
must be 0 (a cluster has no other). :func:`client_from_url` gives a redis-py
``RedisCluster`` for it, which learns the other nodes from the seeds, follows
``MOVED`` / ``ASK`` and re-reads the topology after a failover. Workers, publishers and the
operator commands all take such a URL (see :mod:`celery_streams.slots`).
"""
from __future__ import annotations

import socket
from dataclasses import dataclass, field
from typing import Any, Mapping

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import RedisClusterException
from redis.retry import Retry

from .errors import ConfigurationError, one_line
from .options import Options
from .sentinel import SentinelPool, Sentinels, one_endpoint, sentinel_arguments
from .urls import (  # noqa: F401  (the names a URL's parts have; public here too)
    CLUSTER_SCHEMES, CLUSTER_TLS_SCHEME, DEFAULT_HOST, DEFAULT_PORT, DEFAULT_SENTINEL_PORT,
    REDIS_SCHEMES, SCHEMES, SENTINEL_SCHEME, TLS_SCHEMES, TRANSPORT_PATH, CLUSTER_SCHEME,
    _parse, _parse_cluster, _refuse_mixed, _scheme, _ssl_settings, broker_urls, database,
    first_seed, first_url, refuse_foreign_alternates, safe_url, sentinel_addresses,
    ssl_arguments)

#: Seconds an operator command waits for a TCP connection when the options do not say.
DEFAULT_CONNECT_TIMEOUT = 10.0
#: Seconds a command waits for Redis' reply when ``socket_timeout`` is not set (and for a
#: TCP connection, when ``socket_connect_timeout`` is not): a silent network (packets lost,
#: no RST) fails a publish, an ack or a renewal in that time instead of never. The reader's
#: blocking read waits on its socket's readiness, not on this (``BLOCK`` + stale-read check).
DEFAULT_SOCKET_TIMEOUT = 5.0
#: Seconds a command waits beyond its own wait in Redis (a reader's ``BLOCK``, a ``WAIT``)
#: when that is longer than :data:`DEFAULT_SOCKET_TIMEOUT`.
REPLY_MARGIN = 2.0
#: TCP keepalive of every connection when ``socket_keepalive_options`` is not set: a probe
#: after 30 s idle, then every 5 s, 3 unanswered close it (about 45 s); the probes also keep
#: an idle connection known to a load balancer that drops idle ones.
DEFAULT_KEEPALIVE = (('TCP_KEEPIDLE', 30), ('TCP_KEEPINTVL', 5), ('TCP_KEEPCNT', 3))


@dataclass(frozen=True)
class Address:
    """One Redis server and the credentials and TLS settings to reach it.

    With ``sentinels`` (``(host, port)`` pairs), the server is the master those
    Sentinels name (transport option ``master_name``); ``host`` and ``port``
    are then the first Sentinel's. With ``cluster``, it is a Redis Cluster
    known by its ``seeds`` (``(host, port)`` pairs; ``host`` and ``port``
    are the first one's).
    """

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    ssl: Mapping[str, Any] | None = field(default=None, repr=False)   # redis-py ssl_* arguments
    sentinels: tuple = ()
    cluster: bool = False
    seeds: tuple = ()

    @classmethod
    def from_kombu(cls, conninfo, options: Options | None = None) -> Address:
        """From kombu's ``Connection`` (what a worker or producer connects with).

        With ``options``, also checks that they fit the URL (:meth:`check`).
        kombu reads ``redis-streams+cluster://h1,h2`` as transport
        ``redis-streams`` with host ``cluster://h1,h2``: that is a Redis Cluster.
        """
        hostname = str(conninfo.hostname or '')
        if hostname.startswith('cluster://'):
            urls = conninfo.alt or ['%s+%s' % (conninfo.transport_cls, hostname)]
            return cls.from_cluster_urls(urls, conninfo.ssl or None, options)
        ssl = conninfo.ssl
        # With broker_transport set, kombu keeps a URL's scheme only in the list of URLs.
        sentinel = conninfo.transport_cls == SENTINEL_SCHEME or (
            conninfo.transport_cls == TRANSPORT_PATH and bool(conninfo.alt)
            and all(_scheme(url) == SENTINEL_SCHEME for url in conninfo.alt))
        if sentinel:
            one_endpoint(conninfo)   # each URL asks every Sentinel: a retry is one attempt
        port = conninfo.port or (DEFAULT_SENTINEL_PORT if sentinel else DEFAULT_PORT)
        address = cls(host=conninfo.hostname or DEFAULT_HOST, port=port,
                      db=database(conninfo.virtual_host), username=conninfo.userid,
                      password=conninfo.password,
                      tls=bool(ssl) or conninfo.transport_cls in TLS_SCHEMES,
                      ssl=ssl_arguments(ssl) if isinstance(ssl, Mapping) else None,
                      sentinels=sentinel_addresses(conninfo.alt or [], (conninfo.hostname, port))
                      if sentinel else ())
        if options is None:
            return address
        if conninfo.transport_cls == TRANSPORT_PATH and not sentinel and options.sentinel_options:
            raise ConfigurationError(
                'transport option(s) %s need Sentinel URLs, but with broker_transport set kombu '
                'drops the scheme of a single URL (sentinel-streams:// reads as one Redis server): '
                'drop broker_transport (import celery_streams registers sentinel-streams://), or '
                'list every Sentinel, ;-separated' % ', '.join(options.sentinel_options))
        return address.check(options)

    @classmethod
    def from_url(cls, url: Any, ssl: Any = None, options: Options | None = None) -> Address:
        """From a broker URL (any of :data:`REDIS_SCHEMES`) and Celery's ``broker_use_ssl``.

        ``url`` may be Celery's ``broker_url`` as it is (``a;b`` or a list): the
        first URL is the server, and with ``sentinel-streams://`` every URL is a
        Sentinel. With ``options``, also checks that they fit (:meth:`check`).
        """
        urls = broker_urls(url) or [url]
        _refuse_mixed(urls)
        if _scheme(urls[0]) in CLUSTER_SCHEMES:
            return cls.from_cluster_urls(urls, ssl, options)
        parts = _parse(urls[0])
        settings = _ssl_settings(parts, ssl)
        sentinel = parts['transport'] == SENTINEL_SCHEME
        if sentinel:
            for other in urls[1:]:
                _parse(other)
        port = parts['port'] or (DEFAULT_SENTINEL_PORT if sentinel else DEFAULT_PORT)
        address = cls(host=parts['hostname'] or DEFAULT_HOST, port=port,
                      db=database(parts['virtual_host']), username=parts['userid'],
                      password=parts['password'],
                      tls=parts['transport'] in TLS_SCHEMES or bool(ssl) or bool(parts.get('ssl')),
                      ssl=settings or None,
                      sentinels=sentinel_addresses(urls, (parts['hostname'], port)) if sentinel else ())
        return address.check(options) if options is not None else address

    @classmethod
    def from_cluster_urls(cls, urls: list, ssl: Any = None,
                          options: Options | None = None) -> Address:
        """From ``redis-streams+cluster://`` URLs: every host of every URL is a seed node;
        the first URL's credentials, database (0 only) and TLS settings are the cluster's."""
        seeds: list = []
        parts: dict | None = None
        for url in urls:
            first, hosts = _parse_cluster(url)
            parts = parts or first
            seeds += hosts
        assert parts is not None
        db = database(parts['virtual_host'])
        if db:
            raise ConfigurationError(
                'broker URL %s names database %d, but a Redis Cluster has database 0 only: '
                'drop the /%d' % (safe_url(urls[0]), db, db))
        address = cls(host=seeds[0][0], port=seeds[0][1], db=0, username=parts['userid'],
                      password=parts['password'],
                      tls=_scheme(urls[0]) == CLUSTER_TLS_SCHEME or bool(ssl)
                      or bool(parts.get('ssl')),
                      ssl=_ssl_settings(parts, ssl) or None, cluster=True,
                      seeds=tuple(dict.fromkeys(seeds)))
        return address.check(options) if options is not None else address

    def check(self, options: Options) -> Address:
        """Refuse, in one line, transport options that do not fit this address; return it."""
        if self.sentinels:
            if options.master_name is None:
                raise ConfigurationError(
                    'a sentinel-streams:// broker URL needs the transport option master_name '
                    '(the name the Sentinels monitor, as in their "sentinel monitor NAME ..." line)')
            if self.tls:
                raise ConfigurationError(
                    'TLS is not supported with sentinel-streams:// URLs yet (broker_use_ssl or '
                    'ssl_* arguments were given)')
        elif self.cluster and options.publish_wait_replicas:
            raise ConfigurationError(
                'publish_wait_replicas is not supported on a Redis Cluster yet (WAIT must follow '
                'each write on its node\'s connection): drop it')
        elif options.sentinel_options:
            raise ConfigurationError(
                'transport option(s) %s apply to Redis Sentinel only: write the broker URL as '
                'sentinel-streams://sentinel-host:26379 (one per Sentinel, ;-separated), or drop them'
                % ', '.join(options.sentinel_options))
        return self

    @property
    def where(self) -> str:
        """``host:port`` (every Sentinel's, with Sentinel), for messages (never the password)."""
        if self.sentinels:
            return 'the master of Sentinels %s' % ','.join('%s:%s' % s for s in self.sentinels)
        if self.cluster:
            return 'the cluster of %s' % ','.join('%s:%s' % s for s in self.seeds)
        return '%s:%s' % (self.host, self.port)

    def pool_arguments(self, options: Options, **overrides) -> dict:
        """Keyword arguments of a ``redis.ConnectionPool`` to this server.

        The socket options not set get this transport's defaults, whatever the
        redis-py version (:func:`socket_timeout`, :data:`DEFAULT_KEEPALIVE`).
        """
        keepalive = True if options.socket_keepalive is None else options.socket_keepalive
        params = {
            'host': self.host, 'port': self.port, 'db': self.db,
            'username': self.username, 'password': self.password,
            'max_connections': options.max_connections,
            'socket_timeout': socket_timeout(options),
            'socket_connect_timeout': DEFAULT_SOCKET_TIMEOUT if options.socket_connect_timeout is None
            else options.socket_connect_timeout,
            'socket_keepalive': keepalive,
            'socket_keepalive_options': options.socket_keepalive_options
            if options.socket_keepalive_options is not None or not keepalive else keepalive_options(),
            'health_check_interval': options.health_check_interval,
            'retry_on_timeout': options.retry_on_timeout,
            'client_name': options.client_name,
        }
        if self.tls:
            params['connection_class'] = redis.SSLConnection
            params.update(self.ssl or {})
        params.update(overrides)
        return {k: v for k, v in params.items() if v is not None}

    def node_pool(self, options: Options, host: str, port: int) -> redis.ConnectionPool:
        """A pool of one connection to one node of a Redis Cluster (a reader's lane)."""
        return redis.ConnectionPool(**self.pool_arguments(options, host=host, port=port, db=0,
                                                          max_connections=1))

    def pool(self, options: Options, follow=None, **overrides) -> redis.ConnectionPool:
        """A connection pool to this server: with Sentinels, to the master they name now.

        A ``SentinelConnectionPool`` asks the Sentinels for the master each time
        it connects, and turns a ``READONLY`` reply (the master was demoted) into
        a ``ConnectionError`` that drops the connection. With ``follow`` (a pool
        of this address), it connects to the master *that* pool last found
        instead of asking again: a channel's reader then goes where the channel
        decided the master is (:func:`~celery_streams.sentinel.follow_master`), never to a master a
        Sentinel that has not heard of the failover yet still names. A Redis Cluster has no
        single pool (:meth:`cluster_client`, :meth:`node_pool`).
        """
        if self.cluster:
            raise ValueError('a Redis Cluster has no single connection pool: use cluster_client()')
        arguments = self.pool_arguments(options, **overrides)
        if not self.sentinels:
            return redis.ConnectionPool(**arguments)
        self.check(options)
        del arguments['host'], arguments['port']
        pool = SentinelPool(options.master_name, Sentinels(
            list(self.sentinels), min_other_sentinels=options.min_other_sentinels or 0,
            sentinel_kwargs=sentinel_arguments(arguments, options.sentinel_kwargs)), **arguments)
        pool.leader = follow if isinstance(follow, SentinelPool) else None
        return pool

    def client(self, options: Options, **overrides) -> redis.Redis | RedisCluster:
        """A client of this server; of the whole cluster (``RedisCluster``) with ``cluster``."""
        if self.cluster:
            return self.cluster_client(options, **overrides)
        return redis.Redis(connection_pool=self.pool(options, **overrides))

    def cluster_client(self, options: Options, **overrides) -> RedisCluster:
        """A ``RedisCluster`` that starts from the seed nodes.

        It keeps redis-py's own retries (a few, with a short backoff): they are
        how it follows a failover or a slot move, re-reading the topology. A
        seed that cannot be reached, or is no cluster node, is one line.
        """
        arguments = self.pool_arguments(options, **overrides)
        for name in ('host', 'port', 'db', 'retry'):
            arguments.pop(name, None)
        if arguments.pop('connection_class', None) is not None:
            arguments['ssl'] = True
        try:
            return RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in self.seeds],
                                **arguments)
        except RedisClusterException as exc:   # not a RedisError: said here in one line
            text = one_line(exc)
            reason = text.rpartition('reachable node: ')[2]
            if any(word in reason for word in _REFUSED_CREDENTIALS):
                raise ConfigurationError('Redis refused the credentials for %s: %s'
                                         % (self.where, reason)) from None
            if 'cannot be connected' in text and 'not enabled' not in text:   # none answered
                raise redis.ConnectionError(text) from None
            raise ConfigurationError('the seed nodes %s are not a usable Redis Cluster: %s'
                                     % (','.join('%s:%s' % s for s in self.seeds),
                                        text.rpartition('reachable node: ')[2])) from None


#: What a node says of a wrong or missing password (``AUTH``, ``HELLO``).
_REFUSED_CREDENTIALS = ('username-password', 'WRONGPASS', 'NOAUTH', 'must be called with the client '
                        'already authenticated', 'Authentication required')


def socket_timeout(options: Options) -> float:
    """Seconds a command waits for its reply: ``socket_timeout``, else
    :data:`DEFAULT_SOCKET_TIMEOUT`, or longer where Redis itself may rightly wait longer
    before it replies (a reader's ``BLOCK`` of ``polling_interval``, read at close; a
    ``WAIT`` of ``publish_wait_timeout``), by :data:`REPLY_MARGIN`."""
    if options.socket_timeout is not None:
        return options.socket_timeout
    longest = max(options.polling_interval, options.publish_wait_timeout)
    return max(DEFAULT_SOCKET_TIMEOUT, longest + REPLY_MARGIN)


def keepalive_options() -> dict:
    """:data:`DEFAULT_KEEPALIVE` as ``{socket constant: value}``, the ones this platform has
    (macOS names the idle time ``TCP_KEEPALIVE``)."""
    names = dict(DEFAULT_KEEPALIVE)
    if not hasattr(socket, 'TCP_KEEPIDLE') and hasattr(socket, 'TCP_KEEPALIVE'):
        names['TCP_KEEPALIVE'] = names.pop('TCP_KEEPIDLE')
    return {getattr(socket, name): value for name, value in names.items() if hasattr(socket, name)}


def client_from_url(url: Any, *, ssl: Any = None,
                    transport_options: Mapping[str, Any] | None = None) -> redis.Redis | RedisCluster:
    """A client for an operator command: text replies, no retries, a connect timeout.

    ``url`` may be Celery's ``broker_url`` as it is (``a;b`` or a list): see
    :meth:`Address.from_url`. ``ssl`` is Celery's ``broker_use_ssl``;
    ``ssl_*`` query arguments of the URL are used too. The client does not
    retry: a command fails at once and says why.
    """
    options = Options.from_transport_options(transport_options)
    return Address.from_url(url, ssl, options).client(
        options, max_connections=None, health_check_interval=None, decode_responses=True,
        socket_connect_timeout=options.socket_connect_timeout or DEFAULT_CONNECT_TIMEOUT,
        retry=Retry(NoBackoff(), 0))


def connection_kwargs(client) -> Mapping[str, Any]:
    """The connection settings of a client (host, password...), of a cluster's nodes too."""
    if isinstance(client, RedisCluster):
        return client.nodes_manager.connection_kwargs
    return client.connection_pool.connection_kwargs
