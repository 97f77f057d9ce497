"""The Celery app of the fault suite (``tests/test_faults.py``), run in real workers.

Configured from the environment, so one module serves every server and test:

* ``FAULTS_BROKER``   -- the broker URL (``redis-streams://...``)
* ``FAULTS_JOURNAL``  -- a plain ``redis://`` URL where tasks record what they did;
  a separate server from the broker where a test kills, restarts or
  ``CLIENT KILL``s the broker, so the records survive
* ``FAULTS_PREFIX``   -- ``global_keyprefix``, also the namespace of the journal
* ``FAULTS_VT``       -- ``visibility_timeout`` (seconds)
* ``FAULTS_MAX_DELIVERIES``, ``FAULTS_PREFETCH`` (``worker_prefetch_multiplier``),
  ``FAULTS_POLLING`` (``polling_interval``)
* ``FAULTS_ACKS_LATE=1`` -- ``task_acks_late`` and ``task_reject_on_worker_lost``
* ``FAULTS_ROUTES=1`` -- two task queues, one on a direct exchange, one on a topic exchange

No result backend: tasks record into the journal list ``faults:<prefix>:ran``
(one item per execution), so a test counts runs, losses and duplicates.
"""
import os
import time

import redis
from celery import Celery
from kombu import Exchange, Queue

import celery_streams  # noqa: F401  (registers redis-streams://)

PREFIX = os.environ.get('FAULTS_PREFIX', '')
JOURNAL_URL = os.environ.get('FAULTS_JOURNAL', 'redis://127.0.0.1:6390/1')

#: The queues of ``FAULTS_ROUTES=1``.
DIRECT = Exchange('faults-direct', type='direct')
TOPIC = Exchange('faults-topic', type='topic')
ROUTED_QUEUES = (
    Queue('direct_q', DIRECT, routing_key='direct.key'),
    Queue('topic_q', TOPIC, routing_key='jobs.#'),
)

transport_options = {
    'global_keyprefix': PREFIX,
    'visibility_timeout': float(os.environ.get('FAULTS_VT', '300')),
    'max_deliveries': int(os.environ.get('FAULTS_MAX_DELIVERIES', '10')),
    'polling_interval': float(os.environ.get('FAULTS_POLLING', '1.0')),
}

app = Celery('faults')
app.conf.update(
    broker_url=os.environ.get('FAULTS_BROKER', 'redis-streams://127.0.0.1:6390/0'),
    broker_transport_options=transport_options,
    broker_connection_retry_on_startup=True,
    broker_connection_max_retries=None,
    task_ignore_result=True,
    worker_prefetch_multiplier=int(os.environ.get('FAULTS_PREFETCH', '4')),
    task_acks_late=os.environ.get('FAULTS_ACKS_LATE') == '1',
    task_reject_on_worker_lost=os.environ.get('FAULTS_ACKS_LATE') == '1',
    worker_hijack_root_logger=False,
    worker_send_task_events=False,
)
if os.environ.get('FAULTS_ROUTES') == '1':
    app.conf.task_queues = ROUTED_QUEUES
    app.conf.task_default_queue = 'direct_q'

_journal = None


def journal():
    global _journal
    if _journal is None:
        _journal = redis.Redis.from_url(JOURNAL_URL)
    return _journal


def journal_key(what, prefix=PREFIX):
    return 'faults:%s:%s' % (prefix, what)


@app.task(bind=True)
def record(self, token, seconds=0.0):
    """Mark ``token`` started, sleep ``seconds``, mark it ran (one item per execution).

    With ``seconds``, each execution is also listed under ``started@<worker
    hostname>`` and ``finished@<worker hostname>``. An execution of a message
    delivered before (reclaimed, restored) is also listed under
    ``redelivered``: a duplicate without it was published twice.
    """
    if (self.request.delivery_info or {}).get('redelivered'):
        journal().rpush(journal_key('redelivered'), token)
    if seconds:
        journal().rpush(journal_key('started'), token)
        journal().rpush(journal_key('started@' + (self.request.hostname or '')), token)
        time.sleep(seconds)
        journal().rpush(journal_key('finished@' + (self.request.hostname or '')), token)
    journal().rpush(journal_key('ran'), token)
    return token


@app.task
def poison(token):
    """Kill the process running it, every time (a prefork child dies with SIGKILL)."""
    journal().rpush(journal_key('poison'), token)
    os.kill(os.getpid(), 9)
