"""Operator functions over a redis client: drain, nuke and status.

They back the ``celery streams`` command (:mod:`celery_streams.cli`) and work
from Python as well::

    from celery_streams import admin

    client = admin.client_from_url('redis-streams://localhost:6379/0')
    admin.status(client, global_keyprefix='proj:')
    admin.drain(client, global_keyprefix='proj:', queues=['celery'], dry_run=True)

Every function returns what it did (with ``dry_run=True``: what it would do,
counted the same way, with nothing changed). Only keys under
``<global_keyprefix>celery-streams:`` are ever read or written (see
:mod:`celery_streams.keys`), found with ``SCAN MATCH``, never ``KEYS``.

* :func:`drain` empties queue streams with the ``drain`` script (``XTRIM MAXLEN 0``
  and ``XACK`` of every pending entry): the keys and every consumer group stay,
  so running workers read on (``DEL`` would destroy the groups).
* :func:`nuke` destroys every consumer group (``XGROUP DESTROY``: a worker blocked
  on it is woken with ``NOGROUP``), then deletes every key of the prefix.
* :func:`status` describes each queue: kind, lengths, groups, consumers, the age
  of the oldest pending entry and the dead-letter count, as a JSON-ready dict.

Clients may be made with ``decode_responses`` on or off (RESP2).
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import redis
from kombu.utils.url import maybe_sanitize_url, parse_url
from redis.backoff import NoBackoff
from redis.retry import Retry

from .errors import ConfigurationError, StreamsError
from .keys import FANOUT, TASK, Keys, glob_escape
from .options import Options
from .scripts import source

logger = logging.getLogger(__name__)

SCHEMES = ('redis', 'rediss', 'redis-streams', 'rediss-streams')
TLS_SCHEMES = ('rediss', 'rediss-streams')
DEFAULT_PORT = 6379
#: Seconds to wait for a TCP connection when the options do not say.
DEFAULT_CONNECT_TIMEOUT = 10.0
SCAN_COUNT = 1000


class UnknownQueue(StreamsError):
    """A queue named by the operator has neither a registry entry nor a stream."""


class BroadcastQueue(StreamsError):
    """A broadcast queue was named for a drain that leaves broadcast queues alone."""


@dataclass
class DrainedQueue:
    """What draining one queue removed (or, in a dry run, would remove)."""

    queue: str
    kind: str | None              # 'task', 'fanout', or None when not in the registry
    removed: int                  # stream entries trimmed
    pending_cleared: int          # PEL entries acked, summed over the groups
    groups_kept: list[str] = field(default_factory=list)
    dead_letters_removed: int | None = None   # None: dead letters left alone


@dataclass
class NukeResult:
    """What :func:`nuke` destroyed (or, in a dry run, would destroy)."""

    groups: list[tuple[str, str]] = field(default_factory=list)   # (stream key, group)
    streams: list[str] = field(default_factory=list)
    other_keys: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)                  # dead-letter streams kept

    @property
    def deleted_keys(self) -> list[str]:
        return self.streams + self.other_keys


# -- connecting ---------------------------------------------------------------

def first_url(broker_url: Any) -> str | None:
    """The first URL of Celery's ``broker_url`` (a string, ``a;b`` or a list)."""
    if isinstance(broker_url, (list, tuple)):
        broker_url = broker_url[0] if broker_url else None
    if isinstance(broker_url, str):
        broker_url = broker_url.split(';')[0].strip()
    return broker_url or None


def safe_url(url: str) -> str:
    """The URL with its password masked (``redis://user:**@host/0``), as kombu prints it."""
    try:
        return maybe_sanitize_url(url)
    except ValueError:   # kombu could not parse it (a port that is not a number...)
        return re.sub(r'(://[^/@]*?:)[^/@]*@', r'\1**@', url)


def client_from_url(url: str, *, ssl: Any = None,
                    transport_options: Mapping[str, Any] | None = None) -> redis.Redis:
    """A redis client for a broker URL, as the transport would connect.

    Accepts ``redis://``, ``rediss://``, ``redis-streams://`` and
    ``rediss-streams://`` with user, password and database. ``ssl`` is Celery's
    ``broker_use_ssl`` (``True`` or a dict of redis-py ``ssl_*`` arguments);
    ``ssl_*`` query arguments of the URL are used too. The client does not
    retry: an operator command fails at once and says why.
    """
    parts = _parse(url)
    options = Options.from_transport_options(transport_options)
    params = {
        'host': parts['hostname'] or '127.0.0.1',
        'port': parts['port'] or DEFAULT_PORT,
        'db': _database(parts['virtual_host']),
        'username': parts['userid'],
        'password': parts['password'],
        'socket_timeout': options.socket_timeout,
        'socket_connect_timeout': options.socket_connect_timeout or DEFAULT_CONNECT_TIMEOUT,
        'client_name': options.client_name,
        'decode_responses': True,
        'retry': Retry(NoBackoff(), 0),
    }
    if parts['transport'] in TLS_SCHEMES or ssl or parts.get('ssl'):
        params['ssl'] = True
        for extra in (parts.get('ssl'), ssl):
            if isinstance(extra, Mapping):
                params.update(_ssl_arguments(extra))
    return redis.Redis(**{k: v for k, v in params.items() if v is not None})


def _ssl_arguments(settings: Mapping[str, Any]) -> dict:
    """redis-py's ``ssl_*`` arguments (the names ``broker_use_ssl`` takes for Redis)."""
    wrong = sorted(k for k in settings if not str(k).startswith('ssl_'))
    if wrong:
        raise ConfigurationError(
            'broker_use_ssl for Redis takes ssl_cert_reqs, ssl_ca_certs, ssl_certfile, '
            'ssl_keyfile...; not %s' % ', '.join(map(str, wrong)))
    return dict(settings)


def _parse(url: str) -> dict:
    if not isinstance(url, str) or '://' not in url:
        raise ConfigurationError('not a broker URL: %r (expected redis://host:6379/0)'
                                 % safe_url(url))
    scheme = url.split('://', 1)[0]
    if scheme not in SCHEMES:
        raise ConfigurationError(
            'broker URL %s is not a Redis URL: use %s'
            % (safe_url(url), ', '.join(s + '://' for s in SCHEMES)))
    try:
        return parse_url(url)
    except ValueError as exc:   # a port that is not a number...
        raise ConfigurationError('cannot parse broker URL %s: %s' % (safe_url(url), exc)) from None
    except KeyError as exc:     # kombu's parse_ssl_cert_reqs
        raise ConfigurationError('broker URL %s: ssl_cert_reqs is required, optional or none, not %s'
                                 % (safe_url(url), exc)) from None


def _database(virtual_host: str | None) -> int:
    if virtual_host in (None, '', '/'):
        return 0
    try:
        return int(str(virtual_host).strip('/'))
    except ValueError:
        raise ConfigurationError(
            'the database in a redis URL is a number (as in redis://host:6379/0), not %r'
            % virtual_host) from None


# -- finding queues -----------------------------------------------------------

def registered_queues(client: redis.Redis, keys: Keys) -> dict[str, str]:
    """The queue registry: queue name -> kind (``task`` / ``fanout``)."""
    return {_text(q): _text(kind) for q, kind in client.hgetall(keys.queues).items()}


def scan_keys(client: redis.Redis, pattern: str) -> list[str]:
    """Every key matching ``pattern``, each once, in a stable order."""
    return sorted({_text(key) for key in client.scan_iter(match=pattern, count=SCAN_COUNT)})


def scan_queue_streams(client: redis.Redis, keys: Keys) -> tuple[set[str], set[str]]:
    """The queues that have a stream, and those that have a dead-letter stream."""
    queues, dead = set(), set()
    for key in scan_keys(client, glob_escape(keys.queue('\0').split('\0')[0]) + '*'):
        queue, is_dead = parse_stream_key(keys, key)
        if queue is not None:
            (dead if is_dead else queues).add(queue)
    return queues, dead


def parse_stream_key(keys: Keys, key: str) -> tuple[str | None, bool]:
    """``(queue, is_dead_letters)`` for a queue or dead-letter stream key, else ``(None, False)``."""
    head, queue_tail = keys.queue('\0').split('\0')
    dead_tail = keys.dead_letters('\0').split('\0')[1]
    if not key.startswith(head):
        return None, False
    if key.endswith(dead_tail):
        return key[len(head):-len(dead_tail)], True
    if key.endswith(queue_tail):
        return key[len(head):-len(queue_tail)], False
    return None, False


def known_queues(client: redis.Redis, keys: Keys) -> dict[str, str | None]:
    """Every queue of the registry or with a (dead-letter) stream -> its kind (None if unregistered)."""
    registry = registered_queues(client, keys)
    streams, dead = scan_queue_streams(client, keys)
    found = {queue: registry.get(queue) for queue in streams | dead}
    found.update(registry)
    return dict(sorted(found.items()))


def named_queues(client: redis.Redis, keys: Keys, names: Iterable[str]) -> dict[str, str | None]:
    """``names`` -> their kind.

    Raises :class:`UnknownQueue` for a name with neither registry entry nor stream.
    """
    names = list(dict.fromkeys(names))
    registry = registered_queues(client, keys)
    with client.pipeline(transaction=False) as pipe:
        for queue in names:
            pipe.exists(keys.queue(queue), keys.dead_letters(queue))
        exists = dict(zip(names, pipe.execute()))
    unknown = [q for q in names if q not in registry and not exists[q]]
    if unknown:
        raise UnknownQueue('unknown queue%s %s under prefix %r: no registry entry and no stream'
                           % ('s' if len(unknown) > 1 else '', ', '.join(map(repr, unknown)),
                              keys.prefix))
    return {q: registry.get(q) for q in names}


def select_queues(client: redis.Redis, keys: Keys, names: Iterable[str] | None = None, *,
                  include_broadcast: bool = False) -> dict[str, str | None]:
    """The queues a drain works on -> their kind.

    Without ``names``: every ``task`` queue of the registry (and ``fanout`` ones
    with ``include_broadcast``). With ``names``: those queues (see
    :func:`named_queues`); raises :class:`BroadcastQueue` for a broadcast queue
    without ``include_broadcast``.
    """
    if not names:
        wanted = (TASK, FANOUT) if include_broadcast else (TASK,)
        return {q: kind for q, kind in sorted(registered_queues(client, keys).items())
                if kind in wanted}
    selected = named_queues(client, keys, names)
    broadcast = [q for q, kind in selected.items() if kind == FANOUT]
    if broadcast and not include_broadcast:
        raise BroadcastQueue('%s %s a broadcast queue; add --include-broadcast to drain it'
                             % (', '.join(map(repr, broadcast)), 'are' if len(broadcast) > 1 else 'is'))
    return selected


# -- drain --------------------------------------------------------------------

def drain(client: redis.Redis, *, global_keyprefix: str = '', queues: Iterable[str] | None = None,
          include_broadcast: bool = False, dead_letters: bool = False,
          dry_run: bool = False) -> list[DrainedQueue]:
    """Empty queues and their pending entries lists, keeping every consumer group.

    ``queues`` defaults to every task queue of the registry (see
    :func:`select_queues`); all names are checked before anything changes.
    ``dead_letters`` empties the queues' dead-letter streams too.
    """
    keys = Keys(global_keyprefix)
    selected = select_queues(client, keys, queues, include_broadcast=include_broadcast)
    return [drain_queue(client, keys, queue, kind=kind, dead_letters=dead_letters, dry_run=dry_run)
            for queue, kind in selected.items()]


def drain_queue(client: redis.Redis, keys: Keys, queue: str, *, kind: str | None = None,
                dead_letters: bool = False, dry_run: bool = False) -> DrainedQueue:
    """Drain one queue with the ``drain`` script; the key and its groups stay."""
    stream = keys.queue(queue)
    if dry_run:
        groups = stream_groups(client, stream)
        result = DrainedQueue(queue, kind, client.xlen(stream),
                              sum(g['pending'] for g in groups), [g['name'] for g in groups])
        if dead_letters:
            result.dead_letters_removed = client.xlen(keys.dead_letters(queue))
        return result
    script = client.register_script(source('drain'))
    removed, cleared = script(keys=[stream])
    result = DrainedQueue(queue, kind, removed, cleared,
                          [g['name'] for g in stream_groups(client, stream)])
    if dead_letters:
        result.dead_letters_removed = script(keys=[keys.dead_letters(queue)])[0]
    logger.info('celery_streams: drained queue %r: %s entries removed, %s pending cleared',
                queue, removed, cleared)
    return result


def stream_groups(client: redis.Redis, stream: str) -> list[dict]:
    """``XINFO GROUPS`` with text names; empty when the stream does not exist."""
    try:
        groups = client.xinfo_groups(stream)
    except redis.ResponseError as exc:
        if 'no such key' in str(exc).lower():
            return []
        raise
    return [dict(g, name=_text(g['name'])) for g in groups]


# -- nuke ---------------------------------------------------------------------

def nuke(client: redis.Redis, *, global_keyprefix: str = '', keep_dead_letters: bool = False,
         dry_run: bool = False) -> NukeResult:
    """Destroy every consumer group, then delete every key under the prefix.

    Groups go first, with ``XGROUP DESTROY``, so a worker blocked on one gets
    ``NOGROUP`` at once. Workers still running re-create their groups, registry
    entries and bindings on their next read: stop them first for a clean slate.
    """
    keys = Keys(global_keyprefix)
    result = NukeResult()
    found = scan_keys(client, keys.match_all)
    with client.pipeline(transaction=False) as pipe:
        for key in found:
            pipe.type(key)
        types = [_text(t) for t in pipe.execute()]
    for key, kind in zip(found, types):
        if kind == 'none':
            continue
        if kind == 'stream':
            if keep_dead_letters and parse_stream_key(keys, key)[1]:
                result.kept.append(key)
                continue
            result.streams.append(key)
            result.groups += [(key, g['name']) for g in stream_groups(client, key)]
        else:
            result.other_keys.append(key)
    if dry_run:
        return result
    with client.pipeline(transaction=False) as pipe:
        for stream, group in result.groups:
            pipe.xgroup_destroy(stream, group)
        pipe.execute()
    with client.pipeline(transaction=False) as pipe:
        for key in result.deleted_keys:
            pipe.delete(key)
        pipe.execute()
    logger.info('celery_streams: nuked prefix %r: %s groups, %s streams, %s other keys',
                keys.prefix, len(result.groups), len(result.streams), len(result.other_keys))
    return result


# -- status -------------------------------------------------------------------

def status(client: redis.Redis, *, global_keyprefix: str = '', consumer_group: str = 'celery',
           queues: Iterable[str] | None = None) -> dict:
    """A JSON-ready description of the queues (shape: see :mod:`celery_streams.cli`)."""
    keys = Keys(global_keyprefix)
    known = named_queues(client, keys, queues) if queues else known_queues(client, keys)
    seconds, micros = client.time()
    now_ms = int(seconds) * 1000 + int(micros) // 1000
    schema = client.get(keys.schema)
    return {
        'server': server_version(client),
        'global_keyprefix': global_keyprefix or '',
        'namespace': keys.prefix,
        'consumer_group': consumer_group,
        'schema': int(schema) if schema is not None else None,
        'queues': [queue_status(client, keys, queue, kind, consumer_group, now_ms)
                   for queue, kind in known.items()],
    }


def server_version(client: redis.Redis) -> dict:
    info = client.info('server')
    flavor = 'valkey' if 'valkey_version' in info else 'redis'
    return {'flavor': flavor, 'version': str(info.get('valkey_version') or info['redis_version'])}


def queue_status(client: redis.Redis, keys: Keys, queue: str, kind: str | None,
                 consumer_group: str, now_ms: int) -> dict:
    """The status of one queue; ``waiting`` as the transport counts it."""
    stream = keys.queue(queue)
    with client.pipeline(transaction=False) as pipe:
        pipe.type(stream)
        pipe.xlen(stream)
        pipe.xlen(keys.dead_letters(queue))
        key_type, length, dead = pipe.execute(raise_on_error=False)
    exists = _text(key_type) == 'stream'
    groups = [group_status(client, stream, g, now_ms)
              for g in stream_groups(client, stream)] if exists else []
    own = next((g for g in groups if g['name'] == consumer_group), None)
    pending = own['pending'] if own else 0
    length = length if exists else 0
    if kind == FANOUT:   # read entries stay until trimmed: what the group has not read yet
        lag = own['lag'] if own else None
        waiting = None if lag is None else min(lag, length)
    else:
        waiting = max(length - pending, 0)
    ages = [g['oldest_pending_age'] for g in groups if g['oldest_pending_age'] is not None]
    return {
        'name': queue,
        'kind': kind,
        'stream': stream,
        'exists': exists,
        'length': length,
        'waiting': waiting,
        'pending': pending,
        'oldest_pending_age': max(ages) if ages else None,
        'dead_letters': dead if isinstance(dead, int) else 0,
        'groups': groups,
    }


def group_status(client: redis.Redis, stream: str, group: Mapping, now_ms: int) -> dict:
    """One consumer group: counts, consumers, and the age of its oldest pending entry."""
    name = group['name']
    with client.pipeline(transaction=False) as pipe:
        pipe.xinfo_consumers(stream, name)
        pipe.xpending(stream, name)
        consumers, summary = pipe.execute()
    oldest = summary.get('min') if summary.get('pending') else None
    return {
        'name': name,
        'consumers': [{'name': _text(c['name']), 'pending': c['pending'], 'idle_ms': c['idle']}
                      for c in consumers],
        'pending': group['pending'],
        'last_delivered_id': _text(group['last-delivered-id']),
        'entries_read': group.get('entries-read'),
        'lag': group.get('lag'),
        'oldest_pending_age': _age_seconds(_text(oldest), now_ms) if oldest else None,
    }


def _age_seconds(entry_id: str, now_ms: int) -> float:
    """Seconds since the entry was added (the time part of its id), by the server's clock."""
    return round(max(now_ms - int(entry_id.split('-', 1)[0]), 0) / 1000, 3)


def _text(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value
