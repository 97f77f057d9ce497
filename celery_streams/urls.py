"""Broker URLs as text: their schemes, their parts, their lists, and printing them safely.

:class:`celery_streams.connection.Address` builds on these; nothing here
connects to anything. ``safe_url`` masks a password whatever the URL looks
like; a URL list (Celery's ``broker_url`` as ``a;b`` or a list) is split by
:func:`broker_urls`.
"""
from __future__ import annotations

from typing import Any, Mapping
from urllib.parse import urlsplit

from kombu.utils.url import parse_url

from .errors import ConfigurationError

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
