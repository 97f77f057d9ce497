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

from dataclasses import dataclass, field
from typing import Any, Mapping
from urllib.parse import urlsplit

import redis
from kombu.utils.url import parse_url
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import RedisClusterException
from redis.retry import Retry

from .errors import ConfigurationError, one_line
from .options import Options
from .sentinel import SentinelPool, Sentinels, sentinel_arguments

#: The name kombu's ``broker_transport`` setting gives this transport.
TRANSPORT_PATH = 'celery_streams.transport:Transport'
#: The scheme of URLs that name Sentinels (registered by ``import celery_streams``).
SENTINEL_SCHEME = 'sentinel-streams'
#: The schemes of URLs that name Redis Cluster seed nodes (plain and TLS).
CLUSTER_SCHEME = 'redis-streams+cluster'
CLUSTER_TLS_SCHEME = 'rediss-streams+cluster'
CLUSTER_SCHEMES = (CLUSTER_SCHEME, CLUSTER_TLS_SCHEME)
#: URL schemes this transport answers to (registered by ``import celery_streams``).
SCHEMES = ('redis-streams', 'rediss-streams', SENTINEL_SCHEME) + CLUSTER_SCHEMES
#: Every scheme :meth:`Address.from_url` accepts.
REDIS_SCHEMES = ('redis', 'rediss') + SCHEMES
TLS_SCHEMES = ('rediss', 'rediss-streams', CLUSTER_TLS_SCHEME)
DEFAULT_PORT = 6379
DEFAULT_SENTINEL_PORT = 26379
DEFAULT_HOST = '127.0.0.1'
#: Seconds an operator command waits for a TCP connection when the options do not say.
DEFAULT_CONNECT_TIMEOUT = 10.0


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
        sentinel = conninfo.transport_cls == SENTINEL_SCHEME
        port = conninfo.port or (DEFAULT_SENTINEL_PORT if sentinel else DEFAULT_PORT)
        address = cls(host=conninfo.hostname or DEFAULT_HOST, port=port,
                      db=database(conninfo.virtual_host), username=conninfo.userid,
                      password=conninfo.password,
                      tls=bool(ssl) or conninfo.transport_cls in TLS_SCHEMES,
                      ssl=ssl_arguments(ssl) if isinstance(ssl, Mapping) else None,
                      sentinels=sentinel_addresses(conninfo.alt or [], (conninfo.hostname, port))
                      if sentinel else ())
        return address.check(options) if options is not None else address

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
        """Keyword arguments of a ``redis.ConnectionPool`` to this server."""
        params = {
            'host': self.host, 'port': self.port, 'db': self.db,
            'username': self.username, 'password': self.password,
            'max_connections': options.max_connections,
            'socket_timeout': options.socket_timeout,
            'socket_connect_timeout': options.socket_connect_timeout,
            'socket_keepalive': options.socket_keepalive,
            'socket_keepalive_options': options.socket_keepalive_options,
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


def database(virtual_host: Any) -> int:
    """The database number of a URL's path (``/0``, ``0``, ``/0/``; none: 0)."""
    if virtual_host in (None, '', '/'):
        return 0
    text = str(virtual_host).strip('/')
    try:
        return int(text)
    except ValueError:
        raise ConfigurationError(
            'the database in a redis URL is a number (as in redis://host:6379/0), not %r'
            % text) from None


def ssl_arguments(settings: Mapping[str, Any]) -> dict:
    """redis-py's ``ssl_*`` arguments (the names ``broker_use_ssl`` takes for Redis)."""
    wrong = sorted(str(k) for k in settings if not str(k).startswith('ssl_'))
    if wrong:
        raise ConfigurationError(
            'broker_use_ssl for Redis takes ssl_cert_reqs, ssl_ca_certs, ssl_certfile, '
            'ssl_keyfile...; not %s' % ', '.join(wrong))
    return dict(settings)


def first_url(broker_url: Any) -> str | None:
    """The first URL of Celery's ``broker_url`` (a string, ``a;b`` or a list)."""
    urls = broker_urls(broker_url)
    return urls[0] if urls else None


def broker_urls(broker_url: Any) -> list[str]:
    """Every URL of Celery's ``broker_url`` (a string, ``a;b`` or a list), in order."""
    items = list(broker_url) if isinstance(broker_url, (list, tuple)) else [broker_url]
    urls: list[str] = []
    for item in items:
        if isinstance(item, str):
            urls.extend(part.strip() for part in item.split(';') if part.strip())
    return urls


def sentinel_addresses(urls, default: tuple) -> tuple:
    """``(host, port)`` of every ``sentinel-streams://`` URL (kombu reads its Sentinel
    transport's from ``Connection.alt`` alike); ``default`` when there is none."""
    found = []
    for url in urls:
        if isinstance(url, str) and url.split('://', 1)[0] == SENTINEL_SCHEME:
            parts = _parse(url)
            found.append((parts['hostname'] or DEFAULT_HOST, parts['port'] or DEFAULT_SENTINEL_PORT))
    return tuple(found) or ((default[0] or DEFAULT_HOST, default[1]),)


def safe_url(url: Any) -> str:
    """The URL with its password masked (``redis://user:**@host/0``), whatever it looks like.

    Everything between ``://`` and the last ``@`` is credentials, even when a
    password holds ``/``, ``@`` or ``:`` and no URL parser makes sense of it.
    """
    text = str(url)
    scheme, sep, rest = text.partition('://')
    if not sep or '@' not in rest:
        return text
    credentials, _, host = rest.rpartition('@')
    user, colon, _ = credentials.partition(':')
    return '%s://%s@%s' % (scheme, user + ':**' if colon else '**', host)


def refuse_foreign_alternates(client) -> None:
    """Failover URLs must select this transport too, or kombu switches to another one.

    Sentinel URLs go together or not at all: a list of them names Sentinels
    (every one is asked), a list of Redis URLs names servers (kombu tries
    them in turn); a list of both means neither.
    """
    for url in client.alt or ():
        if not isinstance(url, str) or '://' not in url:
            continue
        scheme = url.split('://', 1)[0]
        if scheme not in SCHEMES and scheme != TRANSPORT_PATH:
            raise ConfigurationError(
                'failover URL %s://... would switch to another transport on failover; '
                'write every broker URL as redis-streams:// (or rediss-streams://, or '
                'sentinel-streams:// for Sentinels) and import celery_streams where the app '
                'is created' % scheme)
    _refuse_mixed(client.alt or ())


def _refuse_mixed(urls) -> None:
    kinds = {_kind(url) for url in urls if isinstance(url, str) and '://' in url}
    if 'sentinel' in kinds and len(kinds) > 1:
        raise ConfigurationError(
            'the broker URLs mix sentinel-streams:// (Sentinels) with Redis servers; '
            'list either Sentinels only (sentinel-streams://s1:26379;sentinel-streams://s2:26379) '
            'or Redis servers only')
    if len(kinds) > 1:
        raise ConfigurationError(
            'the broker URLs mix redis-streams+cluster:// (Redis Cluster nodes) with other '
            'servers; list the nodes of one cluster only '
            '(redis-streams+cluster://h1:7000,h2:7001)')


def _scheme(url: Any) -> str:
    return url.split('://', 1)[0] if isinstance(url, str) else ''


def _kind(url: str) -> str:
    scheme = _scheme(url)
    return 'sentinel' if scheme == SENTINEL_SCHEME else \
        'cluster' if scheme in CLUSTER_SCHEMES else 'server'


def _ssl_settings(parts: Mapping[str, Any], ssl: Any) -> dict:
    """The ``ssl_*`` arguments of a parsed URL's query and of ``broker_use_ssl``."""
    settings: dict = {}
    for extra in (parts.get('ssl'), ssl):
        if isinstance(extra, Mapping):
            settings.update(ssl_arguments(extra))
    return settings


def _parse_cluster(url: str) -> tuple[dict, list]:
    """``(parts, seeds)`` of one ``redis-streams+cluster://`` URL: ``parts`` as
    :func:`_parse` gives them for its first host, ``seeds`` every ``(host, port)``."""
    scheme, _, rest = url.partition('://')
    if scheme not in CLUSTER_SCHEMES:
        raise ConfigurationError(
            'broker URL %s is not a Redis Cluster URL: list the nodes of one cluster as '
            '%s://h1:7000,h2:7001 (or ;-separated %s:// URLs)'
            % (safe_url(url), CLUSTER_SCHEME, CLUSTER_SCHEME))
    hosts = urlsplit('//' + rest).netloc.rpartition('@')[2]
    seeds = [_seed(url, host) for host in hosts.split(',')]
    plain = 'rediss' if scheme == CLUSTER_TLS_SCHEME else 'redis'
    parts = _parse(plain + '://' + first_seed(url).partition('://')[2])
    return parts, seeds


def first_seed(url: str) -> str:
    """``url`` with only the first of its hosts: a cluster URL's seed list (``h1:7000,h2:7001``)
    cut to ``h1:7000``, credentials, database and query kept; other URLs as they are."""
    scheme, sep, rest = url.partition('://')
    netloc = urlsplit('//' + rest).netloc
    credentials, at, hosts = netloc.rpartition('@')
    return scheme + sep + credentials + at + hosts.split(',')[0] + rest[len(netloc):]


def _seed(url: str, host: str) -> tuple[str, int]:
    """``(host, port)`` of one seed node of a cluster URL (``host`` or ``host:port``)."""
    try:
        split = urlsplit('//' + host)
        name, port = split.hostname, split.port
    except ValueError:   # a port that is not a number, or out of range
        name = port = None
    if not name or port == 0:
        raise ConfigurationError(
            'broker URL %s: seed node %r is not host or host:port (a port is a number); list '
            'the nodes as %s://h1:7000,h2:7001' % (safe_url(url), host, CLUSTER_SCHEME))
    return name, port or DEFAULT_PORT


def _parse(url: str) -> dict:
    if not isinstance(url, str) or '://' not in url:
        raise ConfigurationError('not a broker URL: %r (expected redis://host:6379/0)'
                                 % safe_url(url))
    scheme = url.split('://', 1)[0]
    if scheme not in REDIS_SCHEMES:
        raise ConfigurationError(
            'broker URL %s is not a Redis URL: use %s'
            % (safe_url(url), ', '.join(s + '://' for s in REDIS_SCHEMES)))
    try:
        return parse_url(url)
    except ValueError:   # a port that is not a number... (its text may quote the password)
        raise ConfigurationError(
            'cannot parse broker URL %s: the port must be a number, and a password holding '
            '/, @ or : must be percent-encoded (%%2F, %%40, %%3A)' % safe_url(url)) from None
    except KeyError as exc:     # kombu's parse_ssl_cert_reqs
        raise ConfigurationError('broker URL %s: ssl_cert_reqs is required, optional or none, not %s'
                                 % (safe_url(url), exc)) from None
