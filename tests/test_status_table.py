"""``celery streams status`` as an operator first sees it, with real ``celery worker``
processes: one line per task queue (ready, unacked, consumers), Celery's own queues hidden
behind ``-v``, and the consumer of a killed worker marked stale once its liveness key expired."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from celery_streams import admin
from tests import rigs
from tests.helpers import streams_url, wait_until
from tests.rigs import RECORD, ServerRig
from tests.workers import clean_env

pytestmark = pytest.mark.one_server   # nothing here depends on the server kind

journal_server = rigs.journal_server


@pytest.fixture
def rig(redis_server, journal_server, prefix):
    with ServerRig(redis_server, journal_server, prefix, vt=2, prefetch=4) as made:
        yield made


def streams_status(server, prefix, *args) -> str:
    done = subprocess.run([sys.executable, '-m', 'celery', '--broker', streams_url(server),
                           'streams', '--prefix', prefix, 'status', *args], env=clean_env(),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def celery_queue(server, prefix) -> admin.QueueStatus:
    with server.client() as client:
        [queue] = admin.status(client, global_keyprefix=prefix, queues=['celery']).queues
    return queue


def busy_worker(rig, redis_server, prefix, tasks=6):
    """A ``-c 1`` worker running one long task (acked as it started: no ``acks_late``) and
    holding 4 more (prefetch 4, unacked); 1 waits."""
    worker = rig.worker('-c', '1', name='w1')
    app = rig.client_app()
    for n in range(tasks):
        app.send_task(RECORD, args=('t%d' % n,), kwargs={'seconds': 60})
    wait_until(lambda: counts(celery_queue(redis_server, prefix)) == (1, 4), timeout=20,
               what='one task running (acked), 4 held by the worker, 1 waiting')
    return worker, app


def counts(queue: admin.QueueStatus) -> tuple:
    return queue.waiting, queue.pending


def table(output: str) -> dict:
    """The header (under 'QUEUE') and the row of queue 'celery' of a status table, as cells."""
    rows = [line.split() for line in output.splitlines()]
    return {row[0]: row for row in rows if row and row[0] in ('QUEUE', 'celery')}


def test_one_line_per_task_queue_internal_ones_behind_verbose(rig, redis_server, prefix):
    worker, app = busy_worker(rig, redis_server, prefix)
    app.control.ping(timeout=1)   # a reply queue (<uuid>.reply.celery.pidbox)
    try:
        default = streams_status(redis_server, prefix)
        verbose = streams_status(redis_server, prefix, '-v')
        doc = json.loads(streams_status(redis_server, prefix, '--json'))
    finally:
        worker.kill()
    rows = table(default)
    assert rows['QUEUE'] == ['QUEUE', 'READY', 'UNACKED', 'CONSUMERS', 'OLDEST', 'SCHED', 'DEAD']
    assert rows['celery'][:4] == ['celery', '1', '4', '1'], default
    assert '.pidbox' not in default and 'group celery' not in default, default
    mailbox = [q['name'] for q in doc['queues'] if q['internal'] and q['name'].startswith('w1@')]
    assert mailbox and mailbox[0].endswith('.celery.pidbox'), doc['queues']
    assert re.search(r'^\(\d+ queues? hidden: internal and broadcast; -v shows them\)$', default,
                     re.MULTILINE), default   # the mailbox, and the reply queue while it lasts
    assert mailbox[0] in verbose, verbose
    assert 'consumer w1@' in verbose and 'group celery' in verbose, verbose


def test_a_killed_workers_consumer_is_marked_stale_once_its_liveness_expired(rig, redis_server,
                                                                             prefix):
    worker, _ = busy_worker(rig, redis_server, prefix)
    [consumer] = celery_queue(redis_server, prefix).alive_consumers
    worker.kill()   # SIGKILL: no goodbye, its consumer stays in the group with 4 pending
    wait_until(lambda: not celery_queue(redis_server, prefix).alive_consumers, timeout=15,
               what='the liveness key expired (visibility_timeout 2 s)')

    default = streams_status(redis_server, prefix)
    queue = celery_queue(redis_server, prefix)

    assert (queue.consumers, queue.stale_consumers, queue.pending) == (0, [consumer], 4)
    assert table(default)['celery'][:4] == ['celery', '1', '4', '0'], default
    assert '1 stale consumer' in default and consumer + ' on celery' in default, default
    assert 'STALE' in streams_status(redis_server, prefix, '-v')


def test_no_task_queue_says_so_and_what_it_hid(redis_server, prefix, keys, r):
    assert streams_status(redis_server, prefix).splitlines()[1:2] == ['No queues.']   # then notes
    r.hset(keys.queues, 'w9@host.celery.pidbox', 'fanout')   # a mailbox, not yet read
    try:
        assert streams_status(redis_server, prefix).splitlines()[1:3] == [
            'No task queues.', '(1 queue hidden: internal and broadcast; -v shows them)']
        verbose = streams_status(redis_server, prefix, '-v').splitlines()
        assert verbose[2].split() == ['w9@host.celery.pidbox', 'internal', '0', '0', '0', '0', '-',
                                      '0', '0'] and verbose[3] == '    (no stream)', verbose
    finally:
        r.delete(keys.queues)
