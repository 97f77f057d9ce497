"""The Celery app the end-to-end tests run in real ``celery worker`` processes.

Configured from the environment so one module serves every server and prefix:
``E2E_BROKER`` (a redis-streams:// URL), ``E2E_BACKEND``, ``E2E_PREFIX``, and
``E2E_MASTER_NAME`` for a ``sentinel-streams://`` URL.
"""
import os
import time

import redis
from celery import Celery

import celery_streams  # noqa: F401  (registers redis-streams://)

app = Celery('e2e')
app.conf.update(
    broker_url=os.environ.get('E2E_BROKER', 'redis-streams://127.0.0.1:6390/0'),
    result_backend=os.environ.get('E2E_BACKEND', 'redis://127.0.0.1:6390/1'),
    broker_transport_options={'global_keyprefix': os.environ.get('E2E_PREFIX', ''),
                              **({'master_name': os.environ['E2E_MASTER_NAME']}
                                 if os.environ.get('E2E_MASTER_NAME') else {})},
    broker_connection_retry_on_startup=True,
    worker_prefetch_multiplier=int(os.environ.get('E2E_PREFETCH', '4')),
    task_acks_late=os.environ.get('E2E_ACKS_LATE') == '1',
    worker_hijack_root_logger=False,
)


def _journal():
    return redis.Redis.from_url(app.conf.result_backend)


@app.task
def add(x, y):
    return x + y


@app.task
def record(token):
    """Append ``token`` to a list, so tests can count every execution."""
    _journal().rpush('e2e:ran:' + os.environ.get('E2E_PREFIX', ''), token)
    return token


@app.task
def sleep_then_record(seconds, token):
    _journal().rpush('e2e:started:' + os.environ.get('E2E_PREFIX', ''), token)
    time.sleep(seconds)
    return record(token)
