"""The ledger with real ``celery worker`` processes: a worker killed with SIGKILL while it holds
tasks, a poison task dead-lettered after ``max_deliveries``, a queue drained by an operator --
and the audit balances, every counter as expected.

Redis 7 only: billiard takes ~5 s to report each lost child, so this test is slow.
"""
from __future__ import annotations

import time

import pytest

from celery_streams import admin, ledger
from tests import rigs
from tests.rigs import ServerRig

journal_server = rigs.journal_server   # the fixture

RECORD = 'tests.apps.rig.record'
POISON = 'tests.apps.rig.poison'


@pytest.fixture
def rig(fresh_redis_server, journal_server, unique_name):
    made = ServerRig(fresh_redis_server('redis7'), journal_server, unique_name + ':',
                     vt=2, acks_late=1, max_deliveries=2, prefetch=2)
    yield made
    made.close()


def wait_for(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, 'timed out waiting for ' + what
        time.sleep(0.05)


def test_the_audit_balances_after_a_kill_a_poison_task_and_a_drain(rig, report):
    app = rig.client_app()
    r = rig.redis()
    held = ['held%d' % i for i in range(4)]
    w1 = rig.worker('-c', '2', name='w1')
    for token in held:
        app.send_task(RECORD, args=(token, 8.0))   # long: still running when w1 is killed
    wait_for(lambda: len(rig.listed('started')) >= 2, 20, 'w1 to start two tasks')
    w1.kill()   # SIGKILL of the worker and its pool: its tasks stay pending
    w2 = rig.worker('-c', '2', name='w2')
    fast = ['ok%d' % i for i in range(30)]
    for token in fast:
        app.send_task(RECORD, args=(token,))
    app.send_task(POISON, args=('pill',))
    for i in range(5):
        app.send_task(RECORD, args=('idle%d' % i,), queue='idle')   # nobody consumes it
    assert rig.wait_ran(fast, timeout=30) is not None
    wait_for(lambda: r.xlen(rig.keys.dead_letters('celery')) == 1, 40, 'the poison task')
    # the held tasks: reclaimed by w2 once w1's liveness lapsed (vt=2), run to the end there
    assert rig.wait_ran(held, timeout=60) is not None
    [drained] = admin.drain(r, global_keyprefix=rig.prefix, queues=['idle'])
    assert w2.stop() == 0
    celery_q, idle = ledger.audit(r, global_keyprefix=rig.prefix, queues=['celery', 'idle'])
    report(published=celery_q.count('published'), acked=celery_q.count('acked'),
           redelivered=celery_q.count('redelivered'), requeued=celery_q.count('requeued'),
           dead_lettered=celery_q.count('dead_lettered'), delivered=celery_q.count('delivered'),
           unaccounted=celery_q.unaccounted, idle_drained=idle.count('drained'),
           taken_over=w2.taken_over())
    assert celery_q.count('published') == len(held) + len(fast) + 1
    assert celery_q.count('acked') == len(held) + len(fast)
    assert celery_q.count('dead_lettered') == 1
    assert celery_q.count('requeued') == 2   # the poison task, back after each lost child
    assert celery_q.count('redelivered') == w2.taken_over() >= 2
    assert celery_q.count('rejected') == celery_q.count('expired') == 0
    assert (celery_q.waiting, celery_q.pending, celery_q.scheduled) == (0, 0, 0)
    assert celery_q.unaccounted == 0
    assert (idle.count('published'), idle.count('drained'), idle.unaccounted) == (5, 5, 0)
    assert drained.removed == 5
