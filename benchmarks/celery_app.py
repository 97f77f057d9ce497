"""The Celery app the benchmark workers run, configured from the environment.

``BENCH_BROKER`` is the broker URL, ``BENCH_REDIS`` the Redis that counts
finished tasks (no result backend), ``BENCH_KEY`` the key prefix of one run,
``BENCH_TARGET`` the task count after which the last task records the time,
``BENCH_ACKS_LATE=1`` turns on acks_late, ``BENCH_TRANSPORT_OPTIONS`` (JSON) the
transport options.
"""
import json
import os
import time
from datetime import datetime, timezone

import redis
from celery import Celery

import celery_streams  # noqa: F401  registers redis-streams://

app = Celery('csbench')
app.conf.update(
    broker_url=os.environ.get('BENCH_BROKER', 'redis-streams://127.0.0.1:6379/0'),
    broker_transport_options=json.loads(os.environ.get('BENCH_TRANSPORT_OPTIONS') or '{}'),
    broker_connection_retry_on_startup=True,
    task_ignore_result=True,
    task_acks_late=os.environ.get('BENCH_ACKS_LATE') == '1',
    worker_hijack_root_logger=False,
)

KEY = os.environ.get('BENCH_KEY', 'csbench')
TARGET = int(os.environ.get('BENCH_TARGET') or 0)
_client = None


def counter():
    global _client
    if _client is None:   # one client per pool process, made after the fork
        _client = redis.Redis.from_url(os.environ.get('BENCH_REDIS', 'redis://127.0.0.1:6379/15'))
    return _client


@app.task
def noop():
    """Count one run; the first run records when it started, the TARGET-th when it ended."""
    now = time.time()
    pipe = counter().pipeline(transaction=False)
    pipe.set(KEY + ':first', now, nx=True)
    pipe.incr(KEY + ':done')
    _, done = pipe.execute()
    if done == TARGET:
        counter().set(KEY + ':last', time.time())


@app.task
def latency(sent_at):
    """Record the seconds from enqueue to start."""
    counter().rpush(KEY + ':latency', time.time() - sent_at)


@app.task(bind=True)
def eta_lateness(self):
    """Record the seconds from the task's ETA to its start (``KEY:lateness``)."""
    started = time.time()
    eta = self.request.eta
    if isinstance(eta, str):
        eta = datetime.fromisoformat(eta)
    if eta is not None and eta.tzinfo is None:
        eta = eta.replace(tzinfo=timezone.utc)
    counter().rpush(KEY + ':lateness', started - eta.timestamp() if eta is not None else 'nan')


@app.task(bind=True)
def eta_run(self):
    """Record, in one round trip: the seconds from the task's ETA to its start (``KEY:lateness``),
    one more run for this worker (``KEY:hosts``, by hostname) and its start time (``KEY:started``)."""
    started = time.time()
    eta = self.request.eta
    if isinstance(eta, str):
        eta = datetime.fromisoformat(eta)
    if eta is not None and eta.tzinfo is None:
        eta = eta.replace(tzinfo=timezone.utc)
    pipe = counter().pipeline(transaction=False)
    pipe.rpush(KEY + ':lateness', started - eta.timestamp() if eta is not None else 'nan')
    pipe.hincrby(KEY + ':hosts', self.request.hostname or '?', 1)
    pipe.rpush(KEY + ':started', started)
    pipe.execute()
