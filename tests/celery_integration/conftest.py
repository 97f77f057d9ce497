"""Celery's own integration tests, run against this transport.

``t/integration/test_tasks.py`` and ``t/integration/test_inspect.py`` of the
**Celery 5.7.0** sdist, with what they import (``conftest.py``, ``tasks.py``), are
vendored unchanged (but for a license header) in ``t/integration/`` here. The
folder keeps Celery's package name ``t.integration``: this directory has no
``__init__.py``, so pytest puts it on ``sys.path`` and the task names are the
ones the tests assert (``t.integration.tasks.sleeping``).

Celery's conftest reads its broker and backend from ``TEST_BROKER`` /
``TEST_BACKEND`` (set here to placeholders on a closed port, never 6379) and runs
one in-process ``celery_session_worker`` (prefork, concurrency 1) for the whole
session. Here:

* a private server of the first kind available (``CELERY_STREAMS_TEST_SERVERS``
  narrows it, see ``tests/conftest.py``) is started for the session, and the
  session's ``celery_config`` is pointed at it before any app is made: broker
  ``redis-streams://127.0.0.1:<port>/0`` under a ``global_keyprefix`` of its own,
  result backend ``redis://127.0.0.1:<port>/1``. Once, not per server kind: the
  transport is the subject here, and a session worker cannot change server;
* ``TEST_BROKER`` (also read by Celery's testing worker) and ``REDIS_HOST`` /
  ``REDIS_PORT`` (read by Celery's ``tasks.get_redis_connection``, which defaults
  to localhost:6379) point at that server too, for the session;
* the worker logs at INFO, as ``test_trace_log_arguments`` needs (Celery's testing
  worker defaults to ``$WORKER_LOGLEVEL`` or ``error``);
* every test gets ``TIMEOUT`` seconds, setup and teardown included, in place of
  Celery's own marks (20 to 300 s), ``TIMEOUTS`` less where a regression would
  hang. Celery's
  20 s for ``test_revoked_by_headers_complex_canvas`` is too short on 2 cores at
  concurrency 1: ~20 s of canvases then ~18 s of teardown, on kombu's Redis
  transport too;
* ``XFAIL`` marks the known failures, each with its reason (not strict).

They run in a pytest process of their own, as Celery runs them: its in-process
session worker lives until the session ends and sets the current app, and two
such workers in one process break each other. ``t/`` is collected only when
pytest is given paths in this directory alone
(``pytest tests/celery_integration [-k ...]``); the whole suite runs it through
``tests/test_celery_integration.py``, which starts that command.

``CELERY_STREAMS_INTEGRATION_TRANSPORT=redis`` runs the same tests on kombu's
own Redis transport (``redis://``), to tell this transport's defects from
Celery's or the environment's.

They need ``pydantic`` (``tasks.py`` imports it; in the ``test`` extra) and
pytest's ``subtests`` fixture (pytest 9, or the pytest-subtests plugin).

Celery marks many tests ``flaky`` (pytest-rerunfailures' reruns), for races in
the tests themselves (``test_trace_log_arguments`` waits 10 ms for a log line
the worker writes after the result); the plugin is in the ``test`` extra, so
they are rerun as in Celery's own CI, and a rerun shows as ``R`` in the output.
"""
from __future__ import annotations

import os
import secrets
from pathlib import Path

import pytest

import celery_streams  # noqa: F401  (registers redis-streams://)
from tests import servers
from tests.servers import RedisServer

HERE = Path(__file__).resolve().parent
TRANSPORT_ENV = 'CELERY_STREAMS_INTEGRATION_TRANSPORT'
#: Seconds at most for one test, its fixtures included (the first test starts the worker).
TIMEOUT = 90

#: Shorter limits where a regression would hang: test id -> seconds.
TIMEOUTS: dict[str, int] = {
    # ~16 s; hung (result.get() without timeout) while the transport dropped expired tasks
    'test_tasks.py::test_tasks::test_expired': 45,
}

#: Known failures: test id (after ``t/integration/``) -> reason. Not strict: a fix shows as XPASS.
XFAIL: dict[str, str] = {
    'test_tasks.py::test_task_replacement::test_replaced_task_nesting_level_0': (
        'race in the test (Celery\'s): it sets assertion_result = False after .delay(), so when '
        'the in-process worker\'s task_received handler sets it True first, the test overwrites '
        'it; fails now and then on kombu\'s Redis transport as on this one'),
    'test_inspect.py::test_Inspect::test_scheduled': (
        'by design: with delayed delivery (the default) a task with an ETA 5 s ahead waits in '
        'Redis, not in the worker, so `inspect scheduled` lists nothing; `celery streams '
        'scheduled` lists it (docs/guarantees.md)'),
}


def _ours(node) -> bool:
    return HERE in Path(node.path).resolve().parents


def _targeted(config) -> bool:
    """Whether this pytest run was given only paths in this directory."""
    base = config.invocation_params.dir
    paths = [(base / arg.split('::', 1)[0]).resolve() for arg in config.args]
    return bool(paths) and all(path == HERE or HERE in path.parents for path in paths)


def pytest_ignore_collect(collection_path, config):
    """Celery's tests run in a pytest process of their own (see the docstring)."""
    if collection_path == HERE / 't' and not _targeted(config):
        return True
    return None


def pytest_configure(config):
    if _targeted(config):
        # Read by Celery's conftest when it is imported, next: placeholders on a port
        # nothing listens on (the session fixture sets the real URLs), so that neither
        # a developer's TEST_BROKER nor Celery's defaults (pyamqp://, redis:// on
        # localhost:6379) are ever used.
        os.environ['TEST_BROKER'] = 'redis-streams://127.0.0.1:1/0'
        os.environ['TEST_BACKEND'] = 'redis://127.0.0.1:1/1'
    config.addinivalue_line(
        'markers', 'flaky(reruns, reruns_delay, cause): pytest-rerunfailures mark of Celery\'s '
                   'integration tests; that plugin is not installed, so nothing is rerun')


def pytest_pycollect_makeitem(collector, name, obj):
    """Celery's classes are named ``test_*`` (its pyproject: ``python_classes = "test_*"``)."""
    if (isinstance(obj, type) and name.startswith('test_') and isinstance(collector, pytest.Module)
            and _ours(collector)):
        return pytest.Class.from_parent(collector, name=name, obj=obj)
    return None


def pytest_collection_modifyitems(config, items):
    for item in items:
        if not _ours(item):
            continue
        test_id = item.nodeid.split('t/integration/', 1)[-1]
        # first in the list: the mark pytest-timeout reads (Celery's own say 20 to 300 s)
        item.add_marker(pytest.mark.timeout(TIMEOUTS.get(test_id, TIMEOUT)), append=False)
        reason = XFAIL.get(test_id)
        if reason:
            item.add_marker(pytest.mark.xfail(strict=False, reason=reason))


def _broker_url(port: int) -> str:
    transport = os.environ.get(TRANSPORT_ENV, 'redis-streams')
    if transport not in ('redis-streams', 'redis'):
        raise pytest.UsageError(f'${TRANSPORT_ENV} must be redis-streams or redis, not {transport!r}')
    return f'{transport}://127.0.0.1:{port}/0'


@pytest.fixture(scope='session')
def celery_worker_parameters():
    """The session worker logs at INFO (``celery.contrib.testing`` defaults to
    ``$WORKER_LOGLEVEL`` or ``error``): ``test_trace_log_arguments`` reads its
    ``Task ... received`` / ``succeeded`` records."""
    return {'loglevel': 'INFO'}


@pytest.fixture(scope='session')
def celery_integration_server():
    """A private server for Celery's integration session (first kind available)."""
    server = RedisServer(binary=servers.find_server().path).start()
    yield server
    server.close()


@pytest.fixture(scope='session', autouse=True)
def _celery_integration_on_streams(celery_integration_server, celery_config):
    """Point Celery's session ``celery_config`` (a dict, still unused: autouse session
    fixtures run first) at the private server, and the variables read later too:
    ``TEST_BROKER`` by ``celery.contrib.testing.worker`` (its connection check),
    ``REDIS_HOST`` / ``REDIS_PORT`` by ``tasks.get_redis_connection``."""
    port = celery_integration_server.port
    broker, backend = _broker_url(port), f'redis://127.0.0.1:{port}/1'
    celery_config.update({
        'broker_url': broker,
        'broker_transport_options': {'global_keyprefix': f'celery-it-{secrets.token_hex(4)}:'},
        'result_backend': backend,
    })
    variables = {'TEST_BROKER': broker, 'TEST_BACKEND': backend,
                 'REDIS_HOST': '127.0.0.1', 'REDIS_PORT': str(port)}
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
