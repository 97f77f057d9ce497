"""The Celery app of ``tests/test_celery_features.py``, run by real ``celery worker`` processes.

Configured from the environment, so one module serves every server and key prefix:

* ``FEAT_BROKER`` -- a ``redis-streams://`` URL
* ``FEAT_BACKEND`` -- the result backend (``redis://``, db 1 of the same server)
* ``FEAT_PREFIX`` -- the transport's ``global_keyprefix`` (isolates one test group)
* ``FEAT_PREFETCH`` -- ``worker_prefetch_multiplier`` (default 4)
* ``FEAT_CLIENT_NAME`` -- ``CLIENT SETNAME`` of the broker connections (to find them)

Tasks write what they did into Redis lists of the result-backend database
(:func:`journal_key`), so a test can see which worker ran what, in which order
and when.
"""
import os
import socket
import time

import redis
from celery import Celery
from kombu import Queue
from kombu.common import Broadcast

import celery_streams  # noqa: F401  (registers redis-streams://)

TASKS = 'tests.apps.features.'


def journal_key(prefix, what='ran'):
    """The Redis list (in the result-backend db) the tasks of ``prefix`` append to."""
    return 'feat:%s:%s' % (what, prefix)


def make_app(broker, backend, prefix, prefetch=4, client_name=None, name='features'):
    """A Celery app configured like the workers' (also used as the tests' client)."""
    app = Celery(name)
    options = {'global_keyprefix': prefix}
    if client_name:
        options['client_name'] = client_name
    app.conf.update(
        broker_url=broker,
        result_backend=backend,
        broker_transport_options=options,
        broker_connection_retry_on_startup=True,
        worker_prefetch_multiplier=prefetch,
        worker_hijack_root_logger=False,
        task_queues=[Queue('celery'), Broadcast('bcast')],
        task_routes={TASKS + 'bcast_record': {'queue': 'bcast'}},
        result_expires=600,
    )
    return app


PREFIX = os.environ.get('FEAT_PREFIX', '')
app = make_app(
    os.environ.get('FEAT_BROKER', 'redis-streams://127.0.0.1:6390/0'),
    os.environ.get('FEAT_BACKEND', 'redis://127.0.0.1:6390/1'),
    PREFIX,
    prefetch=int(os.environ.get('FEAT_PREFETCH', '4')),
    client_name=os.environ.get('FEAT_CLIENT_NAME') or None,
)


def _journal():
    return redis.Redis.from_url(app.conf.result_backend)


def _write(what, *fields):
    _journal().rpush(journal_key(PREFIX, what), '|'.join(str(f) for f in fields))


@app.task
def add(x, y):
    return x + y


@app.task
def mul(x, y):
    return x * y


@app.task
def xsum(numbers):
    return sum(numbers)


@app.task(bind=True)
def record(self, token):
    """Journal ``token|worker|time``: one line per execution."""
    _write('ran', token, self.request.hostname, time.time())
    return token


@app.task(bind=True)
def bcast_record(self, token):
    """Routed to the Broadcast queue ``bcast``: every worker runs it once."""
    _write('ran', token, self.request.hostname, time.time())
    return token


@app.task(bind=True)
def block(self, seconds, token):
    """Keep the worker busy; journal ``started`` at once and ``ran`` at the end."""
    _write('started', token, self.request.hostname, time.time())
    time.sleep(seconds)
    _write('ran', token, self.request.hostname, time.time())
    return token


@app.task(bind=True, max_retries=5)
def flaky(self, token, failures=2):
    """Fail ``failures`` times (retrying after 0.5 s), then succeed."""
    attempt = _journal().incr('feat:attempts:%s:%s' % (PREFIX, token))
    _write('attempt', token, self.request.hostname, time.time(), attempt)
    if attempt <= failures:
        raise self.retry(exc=RuntimeError('attempt %d fails' % attempt), countdown=0.5)
    return 'ok after %d attempts' % attempt


@app.task(bind=True, rate_limit='10/s')
def limited(self, token):
    _write('ran', token, self.request.hostname, time.time())
    return token


@app.task(bind=True)
def throttled(self, token):
    """No rate limit of its own: the test sets one with ``celery control rate_limit``."""
    _write('ran', token, self.request.hostname, time.time())
    return token


@app.task
def whoami():
    return '%s:%d' % (socket.gethostname(), os.getpid())
