"""The Celery app the rate-limit benchmark's workers run (:mod:`benchmarks.rate_limits`),
configured from the environment.

* ``LIMITS_BROKER``  -- the broker URL (``redis-streams://...``)
* ``LIMITS_RECORD``  -- a plain ``redis://`` URL where every start is recorded (the
  benchmark's private server, another database)
* ``LIMITS_KEY``     -- the key prefix of one run
* ``LIMITS_OPTIONS`` -- the transport options (JSON), e.g. ``{"rate_limits": {"limits.run": "50/s"}}``

Each task pushes one item ``'<start> <sent> <hostname> <task id>'`` (``time.time()`` at its start, the
publisher's ``time.time()`` when it sent it, or 0) onto ``KEY:<task>`` (``run``, ``a``, ``b``,
``slow``) in one round trip. No result backend, acks early (Celery's defaults).
"""
import json
import os
import time

import redis
from celery import Celery

import celery_streams  # noqa: F401  registers redis-streams://

app = Celery('cslimits')
app.conf.update(
    broker_url=os.environ.get('LIMITS_BROKER', 'redis-streams://127.0.0.1:6379/0'),
    broker_transport_options=json.loads(os.environ.get('LIMITS_OPTIONS') or '{}'),
    broker_connection_retry_on_startup=True,
    task_ignore_result=True,
    worker_hijack_root_logger=False,
    worker_send_task_events=False,
)

KEY = os.environ.get('LIMITS_KEY', 'cslimits')
_client = None


def recorder():
    global _client
    if _client is None:   # one client per pool process (or thread pool), made after the fork
        _client = redis.Redis.from_url(os.environ.get('LIMITS_RECORD', 'redis://127.0.0.1:6379/15'))
    return _client


def _record(kind, hostname, task_id, sent_at):
    started = time.time()
    recorder().rpush('%s:%s' % (KEY, kind),
                     '%.6f %.6f %s %s' % (started, sent_at or 0, hostname or '?', task_id))


@app.task(bind=True, name='limits.run')
def run(self, sent_at=0):
    """The task of the global-rate part (limited to 50/s by task name)."""
    _record('run', self.request.hostname, self.request.id, sent_at)


@app.task(bind=True, name='limits.a')
def task_a(self, sent_at=0):
    """The limited task of the mixed queue."""
    _record('a', self.request.hostname, self.request.id, sent_at)


@app.task(bind=True, name='limits.b')
def task_b(self, sent_at=0):
    """The unlimited task of the mixed queue."""
    _record('b', self.request.hostname, self.request.id, sent_at)


@app.task(bind=True, name='limits.slow')
def slow(self, sent_at=0):
    """The task of the idle-throttled part (1/m: all but the first wait in the schedule)."""
    _record('slow', self.request.hostname, self.request.id, sent_at)
