"""Where Redis is and how to reach it: one parser and one client builder.

Both the transport (from kombu's connection info) and the operator commands
(from a broker URL) go through :class:`Address`, so a URL means the same thing
to ``celery worker`` and to ``celery streams``: schemes, default port,
database, credentials and TLS are read in one place.

=============================  =============================================
URL                            meaning
=============================  =============================================
``redis-streams://h:6379/0``   this transport (once ``import celery_streams`` ran)
``rediss-streams://h:6380/0``  the same over TLS
``redis://h:6379/0``           with ``broker_transport`` set to this transport
``rediss://h:6380/0``          the same over TLS
=============================  =============================================

The database is a number (``/0``; a trailing slash is allowed); no database
means 0. ``broker_use_ssl`` (``True`` or a dict of redis-py ``ssl_*``
arguments) turns TLS on for any scheme.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import redis
from kombu.utils.url import parse_url
from redis.backoff import NoBackoff
from redis.retry import Retry

from .errors import ConfigurationError
from .options import Options

#: The name kombu's ``broker_transport`` setting gives this transport.
TRANSPORT_PATH = 'celery_streams.transport:Transport'
#: URL schemes this transport answers to (registered by ``import celery_streams``).
SCHEMES = ('redis-streams', 'rediss-streams')
#: Every scheme :meth:`Address.from_url` accepts.
REDIS_SCHEMES = ('redis', 'rediss') + SCHEMES
TLS_SCHEMES = ('rediss', 'rediss-streams')
DEFAULT_PORT = 6379
DEFAULT_HOST = '127.0.0.1'
#: Seconds an operator command waits for a TCP connection when the options do not say.
DEFAULT_CONNECT_TIMEOUT = 10.0


@dataclass(frozen=True)
class Address:
    """One Redis server and the credentials and TLS settings to reach it."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    ssl: Mapping[str, Any] | None = field(default=None, repr=False)   # redis-py ssl_* arguments

    @classmethod
    def from_kombu(cls, conninfo) -> Address:
        """From kombu's ``Connection`` (what a worker or producer connects with)."""
        ssl = conninfo.ssl
        return cls(host=conninfo.hostname or DEFAULT_HOST, port=conninfo.port or DEFAULT_PORT,
                   db=database(conninfo.virtual_host), username=conninfo.userid,
                   password=conninfo.password,
                   tls=bool(ssl) or conninfo.transport_cls in TLS_SCHEMES,
                   ssl=ssl_arguments(ssl) if isinstance(ssl, Mapping) else None)

    @classmethod
    def from_url(cls, url: str, ssl: Any = None) -> Address:
        """From a broker URL (any of :data:`REDIS_SCHEMES`) and Celery's ``broker_use_ssl``."""
        parts = _parse(url)
        settings: dict = {}
        for extra in (parts.get('ssl'), ssl):
            if isinstance(extra, Mapping):
                settings.update(ssl_arguments(extra))
        return cls(host=parts['hostname'] or DEFAULT_HOST, port=parts['port'] or DEFAULT_PORT,
                   db=database(parts['virtual_host']), username=parts['userid'],
                   password=parts['password'],
                   tls=parts['transport'] in TLS_SCHEMES or bool(ssl) or bool(parts.get('ssl')),
                   ssl=settings or None)

    @property
    def where(self) -> str:
        """``host:port``, for messages (never the password)."""
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

    def client(self, options: Options, **overrides) -> redis.Redis:
        return redis.Redis(connection_pool=redis.ConnectionPool(**self.pool_arguments(options, **overrides)))


def client_from_url(url: str, *, ssl: Any = None,
                    transport_options: Mapping[str, Any] | None = None) -> redis.Redis:
    """A client for an operator command: text replies, no retries, a connect timeout.

    ``ssl`` is Celery's ``broker_use_ssl``; ``ssl_*`` query arguments of the
    URL are used too. The client does not retry: a command fails at once and
    says why.
    """
    options = Options.from_transport_options(transport_options)
    return Address.from_url(url, ssl).client(
        options, max_connections=None, health_check_interval=None, decode_responses=True,
        socket_connect_timeout=options.socket_connect_timeout or DEFAULT_CONNECT_TIMEOUT,
        retry=Retry(NoBackoff(), 0))


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
    if isinstance(broker_url, (list, tuple)):
        broker_url = broker_url[0] if broker_url else None
    if isinstance(broker_url, str):
        broker_url = broker_url.split(';')[0].strip()
    return broker_url or None


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
    """Failover URLs must select this transport too, or kombu switches to another one."""
    for url in client.alt or ():
        if not isinstance(url, str) or '://' not in url:
            continue
        scheme = url.split('://', 1)[0]
        if scheme not in SCHEMES and scheme != TRANSPORT_PATH:
            raise ConfigurationError(
                'failover URL %s://... would switch to another transport on failover; '
                'write every broker URL as redis-streams:// (or rediss-streams://) '
                'and import celery_streams where the app is created' % scheme)


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
