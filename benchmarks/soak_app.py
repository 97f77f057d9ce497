"""The Celery app the soak's workers run (:mod:`benchmarks.soak`), configured from the environment.

* ``SOAK_BROKER``   -- the broker URL (``redis-streams://...``)
* ``SOAK_JOURNAL``  -- a plain ``redis://`` URL on a *separate* server, where every
  execution is recorded: broker faults (kill, restart, ``CLIENT KILL``) never touch it
* ``SOAK_PREFIX``   -- ``global_keyprefix``
* ``SOAK_VT``       -- ``visibility_timeout`` (seconds)
* ``SOAK_PREFETCH`` -- ``worker_prefetch_multiplier``
* ``SOAK_MAX_DELIVERIES`` -- ``max_deliveries``
* ``SOAK_MASTER``   -- ``master_name``, with a ``sentinel-streams://`` broker (``--sentinel``)
* ``SOAK_RATE_LIMITS`` -- ``rate_limits`` (JSON): the task ``soak.limited`` (``record`` under
  another name) has a global rate limit

``task_acks_late`` and ``task_reject_on_worker_lost`` are on; no result backend.
"""
import json
import os
import time

import redis
from celery import Celery

import celery_streams  # noqa: F401  (registers redis-streams://)

TASK = 'soak.record'
LIMITED = 'soak.limited'
RUNS_KEY = 'soak:runs'   # one JSON item per execution, pushed when it starts
DONE_KEY = 'soak:done'   # one JSON item per execution, pushed when it returns

app = Celery('soak')
app.conf.update(
    broker_url=os.environ.get('SOAK_BROKER', 'redis-streams://127.0.0.1:6390/0'),
    broker_transport_options={
        'global_keyprefix': os.environ.get('SOAK_PREFIX', 'soak:'),
        'visibility_timeout': float(os.environ.get('SOAK_VT', '10')),
        'max_deliveries': int(os.environ.get('SOAK_MAX_DELIVERIES', '10')),
    },
    broker_connection_retry_on_startup=True,
    broker_connection_max_retries=None,
    task_ignore_result=True,
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=int(os.environ.get('SOAK_PREFETCH', '2')),
    worker_hijack_root_logger=False,
    worker_send_task_events=False,
)
if os.environ.get('SOAK_RATE_LIMITS'):
    app.conf.broker_transport_options['rate_limits'] = json.loads(os.environ['SOAK_RATE_LIMITS'])
if os.environ.get('SOAK_MASTER'):
    app.conf.broker_transport_options['master_name'] = os.environ['SOAK_MASTER']

_journal = None


def journal():
    global _journal
    if _journal is None:   # one client per pool process, made after the fork
        _journal = redis.Redis.from_url(os.environ.get('SOAK_JOURNAL', 'redis://127.0.0.1:6391/0'))
    return _journal


@app.task(bind=True, name=TASK)
def record(self, token, attempt, seconds):
    """Record ``[token, attempt, start time, hostname, pid, redelivered]``, sleep, record the end.

    ``attempt`` is the publisher's attempt that produced this message: two
    attempts of one token both running means a publish that raised had landed.
    """
    return _record(self.request, token, attempt, seconds)


@app.task(bind=True, name=LIMITED)
def limited(self, token, attempt, seconds):
    """``record`` under a name with a global rate limit (``--limit``)."""
    return _record(self.request, token, attempt, seconds)


def _record(request, token, attempt, seconds):
    started = time.time()
    redelivered = bool((request.delivery_info or {}).get('redelivered'))
    host = request.hostname or ''
    journal().rpush(RUNS_KEY, json.dumps([token, attempt, started, host, os.getpid(), redelivered]))
    time.sleep(seconds)
    journal().rpush(DONE_KEY, json.dumps([token, attempt, host, time.time()]))

