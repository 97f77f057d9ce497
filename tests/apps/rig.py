"""The Celery app of the rigs (``tests/rigs.py``): the fault suite (``tests/test_faults.py``),
the Sentinel tests (``tests/test_sentinel.py``) and the Redis Cluster worker tests
(``tests/test_cluster_worker.py``) run it in real workers.

Configured from the environment, so one module serves every server kind and test
(:meth:`tests.rigs.Rig.worker` sets it: its setting ``vt=2`` is ``RIG_VT=2``):

* ``RIG_BROKER``  -- the broker URL: ``redis-streams://...``, ``sentinel-streams://...``
  or ``redis-streams+cluster://...``
* ``RIG_JOURNAL`` -- a plain ``redis://`` URL where tasks record what they did, on a
  server outside the broker (outside the Sentinel topology or the cluster): killing,
  restarting, ``CLIENT KILL``ing or failing over the broker never touches the records
* ``RIG_PREFIX``  -- ``global_keyprefix``, also the namespace of the journal
* ``RIG_MASTER``  -- ``master_name``, for a ``sentinel-streams://`` broker
* ``RIG_TRANSPORT`` -- ``broker_transport`` (the README's first way:
  ``celery_streams.transport:Transport``)
* ``RIG_WAIT_REPLICAS`` -- ``publish_wait_replicas`` (not set: the transport's default)
* ``RIG_VT``      -- ``visibility_timeout`` (seconds)
* ``RIG_MAX_DELIVERIES``, ``RIG_PREFETCH`` (``worker_prefetch_multiplier``),
  ``RIG_POLLING`` (``polling_interval``)
* ``RIG_ACKS_LATE=1`` -- ``task_acks_late`` and ``task_reject_on_worker_lost``
* ``RIG_ROUTES=1`` -- two task queues, one on a direct exchange, one on a topic exchange
* ``RIG_RATE_LIMITS`` -- ``rate_limits`` (JSON); ``RIG_GLOBAL_TASK_RATE_LIMITS=1`` --
  ``global_task_rate_limits`` (the task ``paced`` has ``rate_limit='10/s'``)

No result backend: tasks record into the journal lists ``rig:<prefix>:<what>``
(:func:`journal_key`), so a test counts runs, losses and duplicates.
"""
import json
import os
import time

import redis
from celery import Celery
from kombu import Exchange, Queue

import celery_streams  # noqa: F401  (registers the transport's URL schemes)

PREFIX = os.environ.get('RIG_PREFIX', '')
JOURNAL_URL = os.environ.get('RIG_JOURNAL', 'redis://127.0.0.1:6390/1')

#: The queues of ``RIG_ROUTES=1``.
DIRECT = Exchange('faults-direct', type='direct')
TOPIC = Exchange('faults-topic', type='topic')
ROUTED_QUEUES = (
    Queue('direct_q', DIRECT, routing_key='direct.key'),
    Queue('topic_q', TOPIC, routing_key='jobs.#'),
)

transport_options = {
    'global_keyprefix': PREFIX,
    'visibility_timeout': float(os.environ.get('RIG_VT', '300')),
    'max_deliveries': int(os.environ.get('RIG_MAX_DELIVERIES', '10')),
    'polling_interval': float(os.environ.get('RIG_POLLING', '1.0')),
}
if os.environ.get('RIG_MASTER'):
    transport_options['master_name'] = os.environ['RIG_MASTER']
if os.environ.get('RIG_RATE_LIMITS'):
    transport_options['rate_limits'] = json.loads(os.environ['RIG_RATE_LIMITS'])
if os.environ.get('RIG_GLOBAL_TASK_RATE_LIMITS') == '1':
    transport_options['global_task_rate_limits'] = True
if os.environ.get('RIG_WAIT_REPLICAS'):
    transport_options['publish_wait_replicas'] = int(os.environ['RIG_WAIT_REPLICAS'])

# Not the current app of a process that imports this module for its names (the tests):
# the in-process CLI tests would take its options. A worker makes it current.
app = Celery('rig', set_as_current=False)
app.conf.update(
    broker_url=os.environ.get('RIG_BROKER', 'redis-streams://127.0.0.1:6390/0'),
    broker_transport_options=transport_options,
    broker_connection_retry_on_startup=True,
    broker_connection_max_retries=None,
    task_ignore_result=True,
    worker_prefetch_multiplier=int(os.environ.get('RIG_PREFETCH', '4')),
    task_acks_late=os.environ.get('RIG_ACKS_LATE') == '1',
    task_reject_on_worker_lost=os.environ.get('RIG_ACKS_LATE') == '1',
    worker_hijack_root_logger=False,
    worker_send_task_events=False,
)
if os.environ.get('RIG_TRANSPORT'):
    app.conf.broker_transport = os.environ['RIG_TRANSPORT']
if os.environ.get('RIG_ROUTES') == '1':
    app.conf.task_queues = ROUTED_QUEUES
    app.conf.task_default_queue = 'direct_q'

_journal = None


def journal():
    global _journal
    if _journal is None:
        _journal = redis.Redis.from_url(JOURNAL_URL)
    return _journal


def journal_key(what, prefix=PREFIX):
    return 'rig:%s:%s' % (prefix, what)


@app.task(bind=True)
def record(self, token, seconds=0.0):
    """Sleep ``seconds``, then list ``token`` under ``ran`` and ``token time`` (this
    worker's clock) under ``at``: one item per execution.

    With ``seconds``, each execution is also listed under ``started``, ``started@<worker
    hostname>`` and ``finished@<worker hostname>``. An execution of a message
    delivered before (reclaimed, restored) is also listed under ``redelivered``: a
    duplicate without it was published twice.
    """
    if (self.request.delivery_info or {}).get('redelivered'):
        journal().rpush(journal_key('redelivered'), token)
    if seconds:
        journal().rpush(journal_key('started'), token)
        journal().rpush(journal_key('started@' + (self.request.hostname or '')), token)
        time.sleep(seconds)
        journal().rpush(journal_key('finished@' + (self.request.hostname or '')), token)
    with journal().pipeline() as pipe:
        pipe.rpush(journal_key('ran'), token)
        pipe.rpush(journal_key('at'), '%s %.6f' % (token, time.time()))
        pipe.execute()
    return token


@app.task(bind=True)
def other(self, token, seconds=0.0):
    """``record`` under another task name (a rate limit on one does not hold the other)."""
    return record(token, seconds)


@app.task(bind=True, rate_limit='10/s')
def paced(self, token, seconds=0.0):
    """``record`` with a task rate limit of its own (``global_task_rate_limits``)."""
    return record(token, seconds)


@app.task
def poison(token):
    """Kill the process running it, every time (a prefork child dies with SIGKILL)."""
    journal().rpush(journal_key('poison'), token)
    os.kill(os.getpid(), 9)
