"""The silent wrong transport: notes that say where the messages really go.

A Celery app with ``broker_url = 'redis://...'`` and no ``broker_transport``
runs on kombu's Redis *list* transport, not on this one, and nothing says so:
``celery streams status`` finds no queues, ``drain`` nothing to drain, and a
web process on ``redis://`` feeds lists that workers on streams never read.

- :func:`list_transport_warning` is one line when Celery's settings resolve
  to kombu's list transport (a ``redis://``, ``rediss://`` or
  ``sentinel://`` URL and no ``broker_transport``); the ``celery streams``
  commands print it (:func:`warn_command`) and a worker or ``celery beat``
  logs it at start-up (:func:`warn_worker`, a ``celeryd_after_setup`` and
  ``beat_init`` receiver the CLI plugin connects). An explicit
  ``broker_transport = 'redis'`` keeps the lists and silences it. A worker
  that *is* on streams logs, once, what kombu's lists hold under its prefix
  (:func:`warn_kombu_lists`, in a thread): the web process on ``redis://``.
- :func:`status_notes` is the lines ``status`` (and an empty ``drain``) add:
  kombu's list queues and bindings beside (or instead of) the streams under
  this prefix, and, when nothing of this transport is here, the databases and
  prefixes that hold its keys. Every look is bounded (:data:`SCAN_BUDGET` keys
  per database) and best effort: a refused command costs a note, never the
  command.
"""
from __future__ import annotations

import logging
import threading
from typing import Any

import redis
from redis.cluster import RedisCluster

from .connection import client_from_url, connection_kwargs
from .keys import NAMESPACE, Keys, glob_escape, parse_binding
from .urls import CLUSTER_SCHEMES, SCHEMES, TRANSPORT_PATH, broker_urls, safe_url

logger = logging.getLogger('celery_streams')

#: kombu's list-transport schemes, each with the scheme of this transport that replaces it.
LIST_SCHEMES = {'redis': 'redis-streams', 'rediss': 'rediss-streams', 'sentinel': 'sentinel-streams'}
#: The settings that name a broker, in the order Celery uses them.
URL_SETTINGS = ('broker_url', 'broker_write_url', 'broker_read_url')
#: kombu's binding sets are ``<prefix>_kombu.binding.<exchange>``.
KOMBU_BINDING = '_kombu.binding.'
#: Keys one look at a database reads at most (SCAN ... COUNT SCAN_COUNT).
SCAN_BUDGET = 10_000
SCAN_COUNT = 1_000
#: Binding sets read at most; databases looked at at most.
MAX_BINDINGS = 50
MAX_DATABASES = 16
#: kombu's priority lists of queue Q are ``Q<sep>N``: N in 1..9 covers every step.
PRIORITIES = range(1, 10)
KOMBU_SEP = '\x06\x16'
SHOWN = 4   # names listed in a note, the rest counted


def _setting(conf: Any, name: str) -> Any:
    """A Celery setting as Celery reads it (its properties read the environment too)."""
    try:
        return getattr(conf, name)
    except (AttributeError, KeyError):
        return conf.get(name) if hasattr(conf, 'get') else None


def list_transport_url(conf: Any) -> tuple[str, str] | None:
    """``(setting, url)`` when Celery settings ``conf`` resolve to kombu's Redis list transport:
    no ``broker_transport``, and a broker URL of a scheme in :data:`LIST_SCHEMES`."""
    if _setting(conf, 'broker_transport'):
        return None
    for name in URL_SETTINGS:
        for url in broker_urls(_setting(conf, name))[:1]:
            if url.split('://', 1)[0].split('+', 1)[0].lower() in LIST_SCHEMES:
                return name, url
    return None


def streams_url(url: str) -> str | None:
    """``url`` with this transport's scheme (``redis://h`` -> ``redis-streams://h``), or None."""
    scheme, _, rest = url.partition('://')
    replacement = LIST_SCHEMES.get(scheme.lower())
    return '%s://%s' % (replacement, rest) if replacement and rest else None


def list_transport_warning(conf: Any) -> str | None:
    """One line when ``conf`` resolves to kombu's list transport, saying how to fix it; else None."""
    found = list_transport_url(conf)
    if found is None:
        return None
    name, url = found
    fixed = streams_url(url)
    return ("%s %s selects kombu's Redis list transport, not celery_streams (Redis Streams): "
            "use %s or set broker_transport = %r (broker_transport = 'redis' keeps the lists "
            "and silences this)" % (name, safe_url(url),
                                    safe_url(fixed) if fixed else 'a redis-streams:// URL',
                                    TRANSPORT_PATH))


def warn_worker(sender=None, instance=None, conf=None, **kwargs) -> None:
    """``celeryd_after_setup`` (a worker) and ``beat_init`` (``celery beat``, the sender its
    service) receiver: the process logs :func:`list_transport_warning`."""
    try:
        if conf is None:
            conf = (instance if instance is not None else sender).app.conf
        line = list_transport_warning(conf)
    except Exception:   # a diagnosis never stops a worker
        return
    if line:
        logger.warning('celery_streams: %s', line)
    elif on_streams(conf):   # the split: is anyone feeding kombu's lists beside this worker?
        threading.Thread(target=warn_kombu_lists, args=(conf,), daemon=True,
                         name='celery_streams-diagnose').start()


def on_streams(conf: Any) -> bool:
    """Whether ``conf`` runs on this transport, on one server or Sentinels (not a cluster)."""
    urls = broker_urls(_setting(conf, 'broker_url'))
    scheme = urls[0].split('://', 1)[0].lower() if urls else ''
    if scheme in CLUSTER_SCHEMES:
        return False
    return _setting(conf, 'broker_transport') == TRANSPORT_PATH or scheme in SCHEMES


def warn_kombu_lists(conf: Any) -> None:
    """Log, in one line, what kombu's list transport keeps under this app's prefix (messages
    that no worker on streams reads). Runs in a thread: start-up never waits for it."""
    try:
        options = dict(_setting(conf, 'broker_transport_options') or {})
        client = client_from_url(_setting(conf, 'broker_url'), ssl=_setting(conf, 'broker_use_ssl'),
                                 transport_options=options)
        try:
            notes = kombu_notes(client, options.get('global_keyprefix') or '')
        finally:
            client.close()
    except Exception:   # Redis away, options the worker reports itself...
        return
    if notes:
        logger.warning("celery_streams: %s Processes on a redis:// broker_url without "
                       "broker_transport send there; this worker never reads it.",
                       notes[0][len('Note: '):])


def warn_command(ctx) -> None:
    """A ``celery streams`` command prints :func:`list_transport_warning` on stderr, unless
    ``--broker`` named the URL (then it only says where to look, not how the app runs)."""
    import click
    app = getattr(ctx.obj, 'app', None)
    if app is None or ctx.find_root().params.get('broker'):
        return
    line = list_transport_warning(app.conf)
    if line:
        click.echo('Warning: %s' % line, err=True)


def echo_notes(client, global_keyprefix: str = '') -> None:
    """Print :func:`status_notes`, one per line."""
    import click
    for line in status_notes(client, global_keyprefix):
        click.echo(line)


# -- what the server holds ------------------------------------------------------

def status_notes(client, global_keyprefix: str = '') -> list[str]:
    """Notes for ``status`` / an empty ``drain``: kombu's lists and bindings under this prefix;
    and, when nothing of this transport is here, where its keys are. [] on a cluster (kombu's
    list transport has no cluster mode) and on any refusal."""
    if isinstance(client, RedisCluster):
        return []
    notes: list[str] = []
    try:
        notes += kombu_notes(client, global_keyprefix)
        if not has_streams(client, global_keyprefix):
            notes += elsewhere_notes(client, global_keyprefix)
    except redis.RedisError:
        pass
    return notes


def has_streams(client, global_keyprefix: str) -> bool:
    """Whether this transport has its registry, its schema key or any key under the prefix."""
    keys = Keys(global_keyprefix)
    if client.exists(keys.queues, keys.schema):
        return True
    return bool(bounded_scan(client, keys.match_all, budget=SCAN_COUNT))


def bounded_scan(client, match: str | None = None, budget: int = SCAN_BUDGET) -> list[str]:
    """The keys one SCAN pass finds in about ``budget`` keys looked at (not all of a big db)."""
    found: list[str] = []
    cursor, looked = 0, 0
    while True:
        cursor, batch = client.scan(cursor, match=match, count=SCAN_COUNT)
        found.extend(_text(key) for key in batch)
        looked += SCAN_COUNT
        if not int(cursor) or looked >= budget:
            return sorted(set(found))


def _text(value) -> str:
    return value.decode('utf-8', 'replace') if isinstance(value, bytes) else str(value)


def _where(global_keyprefix: str, client) -> str:
    return 'under prefix %r in db %s' % (global_keyprefix, connection_kwargs(client).get('db', 0))


def _count(n: int, word: str) -> str:
    return '%d %s%s' % (n, word, '' if n == 1 else 's')


def _names(names: list[str]) -> str:
    shown = ', '.join(names[:SHOWN])
    return shown + (' and %d more' % (len(names) - SHOWN) if len(names) > SHOWN else '')


def kombu_notes(client, global_keyprefix: str) -> list[str]:
    """What kombu's list transport keeps under this prefix (bindings, lists, unacked), in two
    lines, or [] when it keeps nothing here."""
    prefix = global_keyprefix or ''
    exchanges = kombu_exchanges(client, prefix)
    waiting = kombu_lists(client, prefix, kombu_queues(client, prefix, exchanges))
    unacked = _int(_safe(client.hlen, prefix + 'unacked'))
    if not (exchanges or waiting or unacked):
        return []
    found = []
    if waiting:
        found.append('%s in its lists (%s)' % (_count(sum(waiting.values()), 'message'), _names(
            ['%s: %d' % (queue, n) for queue, n in sorted(waiting.items())])))
    if unacked:
        found.append('%d unacked' % unacked)
    if exchanges:
        found.append('bindings of %s (%s)' % (_count(len(exchanges), 'exchange'), _names(exchanges)))
    return ["Note: kombu's Redis list transport has keys %s: %s."
            % (_where(prefix, client), ', '.join(found)),
            'Note: processes on a redis:// broker_url without broker_transport send there, and '
            'workers on Redis Streams never read it: see "The wrong transport" in docs/operations.md.']


def kombu_exchanges(client, prefix: str) -> list[str]:
    """Exchanges with a kombu binding set under ``prefix`` (``celery``'s looked up directly)."""
    head = prefix + KOMBU_BINDING
    keys = set(bounded_scan(client, glob_escape(head) + '*'))
    if client.exists(head + 'celery'):
        keys.add(head + 'celery')
    return sorted(key[len(head):] for key in keys if key.startswith(head))


def kombu_queues(client, prefix: str, exchanges: list[str]) -> list[str]:
    """The queues kombu's bindings of ``exchanges`` name (of at most :data:`MAX_BINDINGS`),
    ``celery`` always."""
    queues = {'celery'}
    pipe = client.pipeline(transaction=False)
    for exchange in exchanges[:MAX_BINDINGS]:
        pipe.smembers(prefix + KOMBU_BINDING + exchange)
    for members in pipe.execute(raise_on_error=False):
        if isinstance(members, (set, list)):
            queues.update(parse_binding(member)[2] for member in members)
    return sorted(q for q in queues if q)


def kombu_lists(client, prefix: str, queues: list[str]) -> dict[str, int]:
    """Queue -> messages in its kombu lists (every priority bucket), for those holding any."""
    pipe = client.pipeline(transaction=False)
    for queue in queues:
        pipe.llen(prefix + queue)
        for n in PRIORITIES:
            pipe.llen('%s%s%s%d' % (prefix, queue, KOMBU_SEP, n))
    replies = pipe.execute(raise_on_error=False)   # WRONGTYPE: not a list, not kombu's
    per_queue = len(PRIORITIES) + 1
    counts = {queue: sum(_int(r) for r in replies[i * per_queue:(i + 1) * per_queue])
              for i, queue in enumerate(queues)}
    return {queue: n for queue, n in counts.items() if n}


def _safe(call, *args):
    try:
        return call(*args)
    except redis.ResponseError:
        return None


def _int(value) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def elsewhere_notes(client, global_keyprefix: str) -> list[str]:
    """When nothing of this transport is under this prefix and db: the dbs and prefixes where
    its keys (or kombu's bindings) are, found in a bounded look at each db ``INFO keyspace``
    lists."""
    here = connection_kwargs(client).get('db', 0) or 0
    streams, kombu = set(), set()
    for db in databases(client)[:MAX_DATABASES]:
        for key in keys_of_db(client, db, here):
            if NAMESPACE in key:
                streams.add((db, key[:key.index(NAMESPACE)]))
            elif KOMBU_BINDING in key:
                kombu.add((db, key[:key.index(KOMBU_BINDING)]))
    kombu.discard((here, global_keyprefix or ''))   # kombu_notes told of those
    notes = []
    if streams:
        notes.append('Note: nothing of celery_streams %s, but its keys are in %s: check the '
                     'database in broker_url and global_keyprefix in broker_transport_options.'
                     % (_where(global_keyprefix or '', client), _places(streams)))
    if kombu:
        notes.append("Note: kombu's Redis list transport has bindings in %s." % _places(kombu))
    return notes


def _places(found: set) -> str:
    return _names(['db %d (prefix %r)' % place for place in sorted(found)])


def databases(client) -> list[int]:
    """The databases holding keys, by ``INFO keyspace`` ([] when INFO is refused)."""
    info = _safe(client.info, 'keyspace') or {}
    return sorted(int(name[2:]) for name in info if name.startswith('db') and name[2:].isdigit())


def keys_of_db(client, db: int, here: int) -> list[str]:
    """A bounded SCAN of database ``db``: this client's own, or one connection of its pool
    moved there with ``SELECT`` (dropped afterwards, so the pool never reuses it elsewhere)."""
    if db == here:
        return bounded_scan(client)
    pool = client.connection_pool
    connection = pool.get_connection()
    try:
        connection.send_command('SELECT', db)
        connection.read_response()
        found: list[str] = []
        cursor = 0
        for _ in range(SCAN_BUDGET // SCAN_COUNT):
            connection.send_command('SCAN', cursor, 'COUNT', SCAN_COUNT)
            cursor, batch = connection.read_response()
            found.extend(_text(key) for key in batch)
            if not int(cursor):
                break
        return found
    except redis.ResponseError:   # SELECT refused (ACL, a server with one db...)
        return []
    finally:
        connection.disconnect()
        pool.release(connection)
