"""The Celery app of the Sentinel tests (``tests/test_sentinel.py``), run in real workers.

Configured from the environment:

* ``SENTINEL_BROKER``  -- ``sentinel-streams://s1;sentinel-streams://s2;...``
* ``SENTINEL_MASTER``  -- ``master_name``
* ``SENTINEL_JOURNAL`` -- a plain ``redis://`` URL on a server outside the
  Sentinel topology, where tasks record what they did (a failover never
  touches the records)
* ``SENTINEL_PREFIX``  -- ``global_keyprefix``, also the journal's namespace
* ``SENTINEL_VT``      -- ``visibility_timeout`` (seconds)

The task ``record(token, seconds)`` appends ``token`` to the journal list
``sentinel:<prefix>:ran`` (one item per execution) and ``token time`` to
``sentinel:<prefix>:at`` (the worker's clock), after sleeping ``seconds``.
"""
import os
import time

import redis
from celery import Celery

import celery_streams  # noqa: F401  (registers sentinel-streams://)

PREFIX = os.environ.get('SENTINEL_PREFIX', '')
JOURNAL_URL = os.environ.get('SENTINEL_JOURNAL', 'redis://127.0.0.1:6390/1')

app = Celery('sentinel')
app.conf.update(
    broker_url=os.environ.get('SENTINEL_BROKER', 'sentinel-streams://127.0.0.1:26379/0'),
    broker_transport_options={
        'global_keyprefix': PREFIX,
        'master_name': os.environ.get('SENTINEL_MASTER', 'mymaster'),
        'visibility_timeout': float(os.environ.get('SENTINEL_VT', '300')),
    },
    broker_connection_retry_on_startup=True,
    broker_connection_max_retries=None,
    task_ignore_result=True,
    worker_prefetch_multiplier=4,
    worker_hijack_root_logger=False,
    worker_send_task_events=False,
)

_journal = None


def journal():
    global _journal
    if _journal is None:
        _journal = redis.Redis.from_url(JOURNAL_URL)
    return _journal


def journal_key(what, prefix=PREFIX):
    return 'sentinel:%s:%s' % (prefix, what)


@app.task
def record(token, seconds=0.0):
    if seconds:
        time.sleep(seconds)
    with journal().pipeline() as pipe:
        pipe.rpush(journal_key('ran'), token)
        pipe.rpush(journal_key('at'), '%s %.6f' % (token, time.time()))
        pipe.execute()
    return token
