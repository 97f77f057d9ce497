"""The Celery app of the Redis Cluster worker tests (``tests/test_cluster_worker.py``).

Configured from the environment:

* ``CLUSTER_BROKER``  -- ``redis-streams+cluster://h1:p1,h2:p2,...``
* ``CLUSTER_JOURNAL`` -- a plain ``redis://`` URL on a server outside the
  cluster, where tasks record what they did (a failover never touches it)
* ``CLUSTER_PREFIX``  -- ``global_keyprefix``, also the journal's namespace

The task ``record(token, seconds)`` appends ``token`` to the journal list
``cluster:<prefix>:ran`` (one item per execution) and the worker's clock to
``cluster:<prefix>:at``, after sleeping ``seconds``.
"""
import os
import time

import redis
from celery import Celery

import celery_streams  # noqa: F401  (registers redis-streams+cluster://)

PREFIX = os.environ.get('CLUSTER_PREFIX', '')
JOURNAL_URL = os.environ.get('CLUSTER_JOURNAL', 'redis://127.0.0.1:6390/1')

app = Celery('cluster')
app.conf.update(
    broker_url=os.environ.get('CLUSTER_BROKER', 'redis-streams+cluster://127.0.0.1:7000'),
    broker_transport_options={'global_keyprefix': PREFIX, 'visibility_timeout': 300},
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


@app.task
def record(token, seconds=0.0):
    if seconds:
        time.sleep(seconds)
    with journal().pipeline() as pipe:
        pipe.rpush('cluster:%s:ran' % PREFIX, token)
        pipe.rpush('cluster:%s:at' % PREFIX, '%.6f' % time.time())
        pipe.execute()
    return token
