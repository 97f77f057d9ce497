"""Operator functions over a redis client: drain, nuke, status and dead letters.

They back the ``celery streams`` command (:mod:`celery_streams.cli`) and work
from Python as well::

    from celery_streams import admin

    client = admin.client_from_url('redis-streams://localhost:6379/0')
    admin.status(client, global_keyprefix='proj:')
    admin.drain(client, global_keyprefix='proj:', queues=['celery'], dry_run=True)
    admin.dead_letters(client, global_keyprefix='proj:', limit=10)
    admin.requeue_dead_letters(client, global_keyprefix='proj:', ids=['1700000000000-0'])

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
* :func:`dead_letters` lists the dead letters of queues (:class:`DeadLetterQueue`),
  :func:`requeue_dead_letters` moves them back to their queue streams without
  their delivery count (the ``requeue_dead`` script, one entry at a time,
  atomically), :func:`purge_dead_letters` deletes dead-letter streams. Without
  ``queues`` they work on every queue with a dead-letter stream (``SCAN``).

Clients may be made with ``decode_responses`` on or off (RESP2).
"""
from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping

import redis
from kombu.utils.json import loads
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


#: Every command these functions send (the drain script's included), for a Redis ACL.
COMMANDS = (
    'scan', 'type', 'exists', 'get', 'hgetall', 'del', 'time', 'info', 'client|setname',
    'xlen', 'xinfo|groups', 'xinfo|consumers', 'xpending', 'xtrim', 'xack', 'xgroup|destroy',
    'eval', 'evalsha', 'script|load', 'script|exists',
    'xrange', 'xadd', 'xdel', 'multi', 'exec',   # dead letters: list, requeue, purge
)


def acl_rules(global_keyprefix: str = '') -> list[str]:
    """``ACL SETUSER`` rules for an operator: these commands, on the keys of the prefix only."""
    return ['~' + Keys(global_keyprefix).match_all, '-@all', *('+' + c for c in COMMANDS)]


class UnknownQueue(StreamsError):
    """A queue named by the operator has neither a registry entry nor a stream."""


class BroadcastQueue(StreamsError):
    """A broadcast queue was named for a drain that leaves broadcast queues alone."""


class UnknownDeadLetter(StreamsError):
    """A dead-letter id named by the operator is in none of the selected dead-letter streams."""


@dataclass
class DrainedQueue:
    """What draining one queue removed (or, in a dry run, would remove)."""

    queue: str
    kind: str | None              # 'task', 'fanout', or None when not in the registry
    removed: int                  # stream entries trimmed
    pending_cleared: int          # PEL entries acked, summed over the groups
    groups_kept: list[str] = field(default_factory=list)
    streams: list[str] = field(default_factory=list)   # bucket 0 first, then priority buckets
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

@dataclass
class QueueKeys:
    """The keys of one queue found under the prefix (see :mod:`celery_streams.keys`)."""

    queue: str
    streams: dict[int, str] = field(default_factory=dict)   # priority bucket -> stream key
    dead_letters: str | None = None
    alive: dict[str, str] = field(default_factory=dict)     # consumer -> liveness key

    @property
    def found(self) -> bool:
        """Whether the queue has a stream or dead letters (liveness keys alone do not count)."""
        return bool(self.streams) or self.dead_letters is not None


_BUCKET = re.compile(r'(.*)\}:p(\d+)$', re.S)


def queue_key_head(keys: Keys) -> str:
    """What every per-queue key starts with (``<prefix>celery-streams:q:{``)."""
    return keys.queue('\0').split('\0')[0]


def parse_queue_key(keys: Keys, key: str) -> tuple[str, str, Any] | None:
    """``(queue, role, detail)`` of a per-queue key, or None for another key.

    Roles: ``('stream', bucket)``, ``('dead', None)``, ``('alive', consumer)``.
    """
    head = queue_key_head(keys)
    if not key.startswith(head):
        return None
    body = key[len(head):]
    if body.endswith('}'):
        return body[:-1], 'stream', 0
    if '}:alive:' in body:
        queue, _, consumer = body.partition('}:alive:')
        return queue, 'alive', consumer
    if body.endswith('}:dead'):
        return body[:-len('}:dead')], 'dead', None
    bucket = _BUCKET.match(body)
    if bucket:
        return bucket.group(1), 'stream', int(bucket.group(2))
    return None


def scan_keys(client: redis.Redis, pattern: str) -> list[str]:
    """Every key matching ``pattern``, each once, in a stable order."""
    return sorted({_text(key) for key in client.scan_iter(match=pattern, count=SCAN_COUNT)})


def scan_queue_keys(client: redis.Redis, keys: Keys) -> dict[str, QueueKeys]:
    """Queue name -> its keys, for every queue with a key under the prefix (one SCAN)."""
    found: dict[str, QueueKeys] = {}
    for key in scan_keys(client, glob_escape(queue_key_head(keys)) + '*'):
        parsed = parse_queue_key(keys, key)
        if parsed is None:
            continue
        queue, role, detail = parsed
        entry = found.setdefault(queue, QueueKeys(queue))
        if role == 'stream':
            entry.streams[detail] = key
        elif role == 'dead':
            entry.dead_letters = key
        else:
            entry.alive[detail] = key
    return found


def registered_queues(client: redis.Redis, keys: Keys) -> dict[str, str]:
    """The queue registry: queue name -> kind (``task`` / ``fanout``)."""
    return {_text(q): _text(kind) for q, kind in client.hgetall(keys.queues).items()}


def queue_streams(keys: Keys, queue: str, found: QueueKeys | None) -> list[str]:
    """The streams of ``queue``: bucket 0 (even if missing), then the priority buckets found."""
    buckets = dict(found.streams) if found else {}
    buckets.setdefault(0, keys.queue(queue))
    return [buckets[b] for b in sorted(buckets)]


class Inventory:
    """The registry and the per-queue keys under one prefix, read once."""

    def __init__(self, client: redis.Redis, keys: Keys):
        self.keys = keys
        self.registry = registered_queues(client, keys)
        self.found = scan_queue_keys(client, keys)

    def kind(self, queue: str) -> str | None:
        return self.registry.get(queue)

    def streams(self, queue: str) -> list[str]:
        return queue_streams(self.keys, queue, self.found.get(queue))

    def all_queues(self) -> list[str]:
        """Registered queues plus every queue with a stream or dead letters."""
        return sorted(set(self.registry) | {q for q, f in self.found.items() if f.found})

    def check_known(self, names: Iterable[str]) -> list[str]:
        """``names`` without duplicates; raises :class:`UnknownQueue` for any never seen."""
        names = list(dict.fromkeys(names))
        unknown = [q for q in names
                   if q not in self.registry and not (q in self.found and self.found[q].found)]
        if unknown:
            raise UnknownQueue('unknown queue%s %s under prefix %r: no registry entry and no stream'
                               % ('s' if len(unknown) > 1 else '', ', '.join(map(repr, unknown)),
                                  self.keys.prefix))
        return names

    def select(self, names: Iterable[str] | None = None, include_broadcast: bool = False) -> list[str]:
        """The queues a drain works on.

        Without ``names``: every ``task`` queue of the registry (and ``fanout``
        ones with ``include_broadcast``). With ``names``: those queues; raises
        :class:`UnknownQueue`, or :class:`BroadcastQueue` for a broadcast queue
        without ``include_broadcast``.
        """
        if not names:
            wanted = (TASK, FANOUT) if include_broadcast else (TASK,)
            return sorted(q for q, kind in self.registry.items() if kind in wanted)
        names = self.check_known(names)
        broadcast = [q for q in names if self.kind(q) == FANOUT]
        if broadcast and not include_broadcast:
            raise BroadcastQueue('%s %s a broadcast queue; add --include-broadcast to drain it'
                                 % (', '.join(map(repr, broadcast)),
                                    'are' if len(broadcast) > 1 else 'is'))
        return names


# -- drain --------------------------------------------------------------------

def drain(client: redis.Redis, *, global_keyprefix: str = '', queues: Iterable[str] | None = None,
          include_broadcast: bool = False, dead_letters: bool = False,
          dry_run: bool = False) -> list[DrainedQueue]:
    """Empty queues (every priority bucket) and their PELs, keeping every consumer group.

    ``queues`` defaults to every task queue of the registry (see
    :meth:`Inventory.select`); all names are checked before anything changes.
    ``dead_letters`` empties the queues' dead-letter streams too.
    """
    inventory = Inventory(client, Keys(global_keyprefix))
    return [drain_queue(client, inventory.keys, queue, kind=inventory.kind(queue),
                        streams=inventory.streams(queue), dead_letters=dead_letters, dry_run=dry_run)
            for queue in inventory.select(queues, include_broadcast)]


def drain_queue(client: redis.Redis, keys: Keys, queue: str, *, kind: str | None = None,
                streams: list[str] | None = None, dead_letters: bool = False,
                dry_run: bool = False) -> DrainedQueue:
    """Drain the ``streams`` of one queue (default: every bucket of ``keys``) with the ``drain`` script."""
    streams = streams or keys.queue_streams(queue)
    dead = keys.dead_letters(queue)
    if dry_run:
        groups = {s: stream_groups(client, s) for s in streams}
        result = DrainedQueue(queue, kind, sum(client.xlen(s) for s in streams),
                              sum(g['pending'] for gs in groups.values() for g in gs),
                              _names(groups), streams)
        if dead_letters:
            result.dead_letters_removed = client.xlen(dead)
        return result
    script = client.register_script(source('drain'))
    with client.pipeline(transaction=False) as pipe:
        for stream in streams + ([dead] if dead_letters else []):
            script(keys=[stream], client=pipe)
        counts = pipe.execute()
    result = DrainedQueue(queue, kind, sum(c[0] for c in counts[:len(streams)]),
                          sum(c[1] for c in counts[:len(streams)]),
                          _names({s: stream_groups(client, s) for s in streams}), streams)
    if dead_letters:
        result.dead_letters_removed = counts[-1][0]
    logger.info('celery_streams: drained queue %r: %s entries removed, %s pending cleared',
                queue, result.removed, result.pending_cleared)
    return result


def _is_dead_letters(keys: Keys, key: str) -> bool:
    parsed = parse_queue_key(keys, key)
    return parsed is not None and parsed[1] == 'dead'


def _names(groups: Mapping[str, list[dict]]) -> list[str]:
    return sorted({g['name'] for gs in groups.values() for g in gs})


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
        if kind != 'stream':
            result.other_keys.append(key)
        elif keep_dead_letters and _is_dead_letters(keys, key):
            result.kept.append(key)
        else:
            result.streams.append(key)
            result.groups += [(key, g['name']) for g in stream_groups(client, key)]
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
    inventory = Inventory(client, Keys(global_keyprefix))
    names = inventory.check_known(queues) if queues else inventory.all_queues()
    seconds, micros = client.time()
    now_ms = int(seconds) * 1000 + int(micros) // 1000
    schema = client.get(inventory.keys.schema)
    return {
        'server': server_version(client),
        'global_keyprefix': global_keyprefix or '',
        'namespace': inventory.keys.prefix,
        'consumer_group': consumer_group,
        'schema': int(schema) if schema is not None else None,
        'queues': [queue_status(client, inventory, queue, consumer_group, now_ms) for queue in names],
    }


def server_version(client: redis.Redis) -> dict:
    info = client.info('server')
    flavor = 'valkey' if 'valkey_version' in info else 'redis'
    return {'flavor': flavor, 'version': str(info.get('valkey_version') or info['redis_version'])}


def queue_status(client: redis.Redis, inventory: Inventory, queue: str, consumer_group: str,
                 now_ms: int) -> dict:
    """One queue, summed over its priority buckets; ``waiting`` as the transport counts it."""
    kind, keys = inventory.kind(queue), inventory.keys
    found = inventory.found.get(queue) or QueueKeys(queue)
    streams = [(bucket, found.streams[bucket]) for bucket in sorted(found.streams)]
    alive = None if kind == FANOUT else set(found.alive)
    groups: list[dict] = []
    length, pending = 0, 0
    waiting: int | None = 0
    for bucket, stream in streams:
        stream_length = client.xlen(stream)
        described = [group_status(client, stream, bucket, g, alive, now_ms)
                     for g in stream_groups(client, stream)]
        own = next((g for g in described if g['name'] == consumer_group), None)
        own_pending = own['pending'] if own else 0
        if kind == FANOUT:   # read entries stay until trimmed: what the group has not read yet
            lag = own['lag'] if own else None
            waiting = None if lag is None or waiting is None else waiting + min(lag, stream_length)
        else:
            waiting = (waiting or 0) + max(stream_length - own_pending, 0)
        groups += described
        length += stream_length
        pending += own_pending
    ages = [g['oldest_pending_age'] for g in groups if g['oldest_pending_age'] is not None]
    return {
        'name': queue,
        'kind': kind,
        'stream': keys.queue(queue),
        'streams': [stream for _, stream in streams],
        'exists': bool(streams),
        'length': length,
        'waiting': waiting,
        'pending': pending,
        'oldest_pending_age': max(ages) if ages else None,
        'dead_letters': client.xlen(found.dead_letters) if found.dead_letters else 0,
        'groups': groups,
    }


def group_status(client: redis.Redis, stream: str, bucket: int, group: Mapping,
                 alive: set | None, now_ms: int) -> dict:
    """One consumer group of one stream: counts, consumers, age of its oldest pending entry.

    ``alive``: the consumers with a liveness key, None where consumers keep none (broadcast).
    """
    name = group['name']
    with client.pipeline(transaction=False) as pipe:
        pipe.xinfo_consumers(stream, name)
        pipe.xpending(stream, name)
        consumers, summary = pipe.execute()
    oldest = summary.get('min') if summary.get('pending') else None
    return {
        'name': name,
        'stream': stream,
        'bucket': bucket,
        'consumers': [consumer_status(c, alive) for c in consumers],
        'pending': group['pending'],
        'last_delivered_id': _text(group['last-delivered-id']),
        'entries_read': group.get('entries-read'),
        'lag': group.get('lag'),
        'oldest_pending_age': _age_seconds(_text(oldest), now_ms) if oldest else None,
    }


def consumer_status(consumer: Mapping, alive: set | None) -> dict:
    name = _text(consumer['name'])
    return {'name': name, 'pending': consumer['pending'], 'idle_ms': consumer['idle'],
            'alive': None if alive is None else name in alive}


def _age_seconds(entry_id: str, now_ms: int) -> float:
    """Seconds since the entry was added (the time part of its id), by the server's clock."""
    return round(max(now_ms - int(entry_id.split('-', 1)[0]), 0) / 1000, 3)


def _text(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


# -- dead letters ---------------------------------------------------------------

#: The full id of a stream entry (``<ms>-<seq>``).
ENTRY_ID = re.compile(r'\d+-\d+\Z')
FIELD = 'field:'
#: Entries read per XRANGE, and requeued per round trip.
PAGE = 500


@dataclass
class DeadLetter:
    """One entry of a dead-letter stream, as the transport wrote it (``Channel.dead_letter``)."""

    queue: str
    id: str                          # the dead letter's own entry id
    age: float | None                # seconds since it was dead-lettered (server clock)
    reason: str | None
    source_stream: str | None        # the queue stream it came from (its ``stream`` field)
    source_id: str | None            # its entry id there
    task: str | None                 # headers.task of a Celery message, else None
    task_id: str | None              # headers.id of a Celery message, else None
    payload_size: int | None         # bytes of the payload; None when it has no payload field
    deliveries: int | None           # the ``deliveries`` field it carried, None when absent
    decodable: bool                  # the payload is a kombu message a worker can read
    fields: list[str] = field(default_factory=list)   # names of the original entry's fields

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class DeadLetterQueue:
    """The dead letters of one queue: the oldest first, at most ``limit`` of them."""

    queue: str
    stream: str                      # the dead-letter stream key
    count: int                       # XLEN of that stream: every dead letter, listed or not
    dead_letters: list[DeadLetter] = field(default_factory=list)

    @property
    def truncated(self) -> bool:
        return self.count > len(self.dead_letters)

    def as_dict(self) -> dict:
        return {'name': self.queue, 'stream': self.stream, 'count': self.count,
                'truncated': self.truncated,
                'dead_letters': [d.as_dict() for d in self.dead_letters]}


@dataclass
class RequeuedDeadLetter:
    """One dead letter :func:`requeue_dead_letters` moved back (or, in a dry run, would move)."""

    dead_letter: DeadLetter
    stream: str                      # the queue stream it goes back to
    fallback: bool                   # its record named no stream of its queue: the main stream
    outcome: str                     # 'requeued', 'would requeue', 'gone' (requeued or purged
                                     # meanwhile) or 'empty' (no original field: left in place)
    new_id: str | None = None        # id of the new entry in ``stream`` once requeued


@dataclass
class PurgedDeadLetters:
    """What :func:`purge_dead_letters` removed from one queue (or, in a dry run, would remove)."""

    queue: str
    stream: str                      # the dead-letter stream, deleted
    removed: int


def dead_letter_queues(client: redis.Redis, keys: Keys, queues: Iterable[str] | None = None) -> list[str]:
    """The queues a dead-letter command works on.

    Without ``queues``: every queue with a dead-letter stream (``SCAN``). With
    ``queues``: those, checked like :meth:`Inventory.check_known` (a known queue
    without dead letters is fine; a name never seen raises :class:`UnknownQueue`).
    """
    if queues:
        return Inventory(client, keys).check_known(queues)
    return sorted(q for q, found in scan_queue_keys(client, keys).items() if found.dead_letters)


def dead_letters(client: redis.Redis, *, global_keyprefix: str = '',
                 queues: Iterable[str] | None = None, limit: int | None = None) -> list[DeadLetterQueue]:
    """The dead letters of ``queues`` (default: every queue that has some), oldest first.

    ``limit``: at most that many per queue (``None`` or 0: all); ``count`` is always the total.
    """
    keys = Keys(global_keyprefix)
    names = dead_letter_queues(client, keys, queues)
    now_ms = _now_ms(client)
    result = []
    for queue in names:
        stream = keys.dead_letters(queue)
        entries = _read_entries(client, stream, limit or None)
        result.append(DeadLetterQueue(queue, stream, client.xlen(stream),
                                      [describe_dead_letter(queue, entry_id, fields, now_ms)
                                       for entry_id, fields in entries]))
    return result


def requeue_dead_letters(client: redis.Redis, *, global_keyprefix: str = '',
                         queues: Iterable[str] | None = None, ids: Iterable[str] | None = None,
                         dry_run: bool = False) -> list[RequeuedDeadLetter]:
    """Move dead letters back to the stream they came from, without their delivery count.

    ``queues`` as for :func:`dead_letters`; ``ids`` selects dead letters by id
    among those queues (all of them must be found, or :class:`UnknownDeadLetter`
    is raised before anything changes). Each one goes to its ``stream`` field
    when that is a stream of its queue, else to the queue's main stream, with
    the original fields but ``deliveries``; then it is deleted from the
    dead-letter stream, atomically (the ``requeue_dead`` script). Undecodable
    entries are requeued too: a worker dead-letters them again.
    """
    keys = Keys(global_keyprefix)
    names = dead_letter_queues(client, keys, queues)
    now_ms = _now_ms(client)
    selected = _select_dead_letters(client, keys, names, ids)
    plan = []
    for queue, entry_id, fields in selected:
        letter = describe_dead_letter(queue, entry_id, fields, now_ms)
        stream, fallback = requeue_target(keys, queue, letter.source_stream)
        empty = not [f for f in letter.fields if f != 'deliveries']
        plan.append(RequeuedDeadLetter(letter, stream, fallback,
                                       'empty' if empty else 'would requeue'))
    return plan if dry_run else apply_requeue(client, plan, global_keyprefix=global_keyprefix)


def apply_requeue(client: redis.Redis, plan: list[RequeuedDeadLetter], *,
                  global_keyprefix: str = '') -> list[RequeuedDeadLetter]:
    """Requeue the dead letters of a dry run's ``plan``: exactly those, none dead-lettered since.

    Sets each item's ``outcome`` (``requeued``, or ``gone`` when it was
    requeued or purged meanwhile) and ``new_id``; returns ``plan``.
    """
    keys = Keys(global_keyprefix)
    script = client.register_script(source('requeue_dead'))
    todo = [item for item in plan if item.outcome != 'empty']
    for start in range(0, len(todo), PAGE):
        batch = todo[start:start + PAGE]
        with client.pipeline(transaction=False) as pipe:
            for item in batch:
                script(keys=[keys.dead_letters(item.dead_letter.queue), item.stream],
                       args=[item.dead_letter.id], client=pipe)
            replies = pipe.execute()
        for item, reply in zip(batch, replies):
            item.outcome = _text(reply[0])
            item.new_id = _text(reply[1]) if len(reply) > 1 else None
    requeued = [item for item in plan if item.outcome == 'requeued']
    if requeued:
        logger.info('celery_streams: requeued %d dead letters of %s', len(requeued),
                    ', '.join(repr(q) for q in dict.fromkeys(i.dead_letter.queue for i in requeued)))
    return plan


def purge_dead_letters(client: redis.Redis, *, global_keyprefix: str = '',
                       queues: Iterable[str] | None = None,
                       dry_run: bool = False) -> list[PurgedDeadLetters]:
    """Delete the dead-letter streams of ``queues`` (default: every queue that has one).

    Dead-letter streams have no consumer group, so ``DEL`` loses nothing else;
    ``removed`` is the stream's length read in the same transaction.
    """
    keys = Keys(global_keyprefix)
    result = []
    for queue in dead_letter_queues(client, keys, queues):
        stream = keys.dead_letters(queue)
        if dry_run:
            removed = client.xlen(stream)
        else:
            with client.pipeline(transaction=True) as pipe:
                pipe.xlen(stream)
                pipe.delete(stream)
                removed, _ = pipe.execute()
        result.append(PurgedDeadLetters(queue, stream, removed))
    if not dry_run and result:
        logger.info('celery_streams: purged %d dead letters of %d queues',
                    sum(p.removed for p in result), len(result))
    return result


def requeue_target(keys: Keys, queue: str, source_stream: str | None) -> tuple[str, bool]:
    """``(stream, fallback)``: where a dead letter of ``queue`` goes back to.

    Its recorded source stream when that is a stream (any priority bucket) of
    the same queue under this prefix; otherwise the queue's main stream, with
    ``fallback`` True. Never another queue's key, so one script call stays in
    one hash slot.
    """
    parsed = parse_queue_key(keys, source_stream) if source_stream else None
    if source_stream and parsed is not None and parsed[0] == queue and parsed[1] == 'stream':
        return source_stream, False
    return keys.queue(queue), True


def describe_dead_letter(queue: str, entry_id: str, fields: Mapping, now_ms: int) -> DeadLetter:
    """A :class:`DeadLetter` from the raw fields of a dead-letter entry (bytes or text)."""
    record = {_decode(k): v for k, v in fields.items()}
    original = {name[len(FIELD):]: value for name, value in record.items() if name.startswith(FIELD)}
    payload = original.get('payload')
    task = task_id = None
    try:
        envelope = loads(payload)
        decodable = isinstance(envelope['properties'], dict)
    except Exception:
        envelope, decodable = None, False
    headers = envelope.get('headers') if isinstance(envelope, dict) else None
    if isinstance(headers, dict):
        task, task_id = _text_or_none(headers.get('task')), _text_or_none(headers.get('id'))
    try:
        deliveries = int(original['deliveries'])
    except (KeyError, TypeError, ValueError):
        deliveries = None
    return DeadLetter(
        queue=queue, id=entry_id, age=_age_seconds(entry_id, now_ms),
        reason=_decode_or_none(record.get('reason')),
        source_stream=_decode_or_none(record.get('stream')),
        source_id=_decode_or_none(record.get('id')),
        task=task, task_id=task_id,
        payload_size=None if payload is None else len(_bytes(payload)),
        deliveries=deliveries, decodable=decodable, fields=list(original))


def _select_dead_letters(client: redis.Redis, keys: Keys, queues: list[str],
                         ids: Iterable[str] | None) -> list[tuple[str, str, dict]]:
    """``(queue, dead-letter id, raw fields)`` of the selected dead letters, in stream order."""
    if not ids:
        return [(queue, entry_id, fields) for queue in queues
                for entry_id, fields in _read_entries(client, keys.dead_letters(queue))]
    ids = list(dict.fromkeys(i.strip() for i in ids))
    malformed = [i for i in ids if not ENTRY_ID.match(i)]
    if malformed:
        raise UnknownDeadLetter('not a dead-letter id: %s (expected <milliseconds>-<sequence>, '
                                'as `dead-letters list` shows)' % ', '.join(map(repr, malformed)))
    found, seen = [], set()
    for queue in queues:
        stream = keys.dead_letters(queue)
        for entry_id in ids:
            for got_id, fields in _xrange(client, stream, entry_id, entry_id):
                found.append((queue, got_id, fields))
                seen.add(got_id)
    missing = [i for i in ids if i not in seen]
    if missing:
        raise UnknownDeadLetter('no dead letter %s in the dead letters of %s' % (
            ', '.join(map(repr, missing)),
            'queue%s %s' % ('s' if len(queues) > 1 else '', ', '.join(map(repr, queues)))
            if queues else 'any queue under prefix %r' % keys.prefix))
    return found


def _read_entries(client: redis.Redis, stream: str, limit: int | None = None) -> list[tuple[str, dict]]:
    """The entries of ``stream``, oldest first, at most ``limit``, read in pages."""
    entries: list[tuple[str, dict]] = []
    start = '-'
    while limit is None or len(entries) < limit:
        count = PAGE if limit is None else min(PAGE, limit - len(entries))
        page = _xrange(client, stream, start, '+', count)
        entries += page
        if len(page) < count:
            break
        ms, seq = page[-1][0].split('-')
        start = '%s-%d' % (ms, int(seq) + 1)   # the next possible id ('(' needs Redis 6.2)
    return entries


def _xrange(client: redis.Redis, stream: str, start: str, end: str,
            count: int | None = None) -> list[tuple[str, dict]]:
    """XRANGE without decoding the fields: a payload need not be UTF-8."""
    args = ['XRANGE', stream, start, end] + (['COUNT', count] if count else [])
    return [(_text(entry_id), fields or {})
            for entry_id, fields in client.execute_command(*args, NEVER_DECODE=[])]


def _now_ms(client: redis.Redis) -> int:
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def _bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def _decode(value: Any) -> str:
    return value.decode('utf-8', 'backslashreplace') if isinstance(value, bytes) else str(value)


def _decode_or_none(value: Any) -> str | None:
    return None if value is None else _decode(value)


def _text_or_none(value: Any) -> str | None:
    return None if value is None else str(value)
