"""Unique tasks with real ``celery worker`` processes (the rig of ``tests/rigs.py``), on each
server kind: a key held while its task runs after an early ack and freed when it finished, a
worker killed while running a unique task (the key held until the task taken over finished),
a period and a debounce as a worker runs them, and a dead-lettered task freeing its key.
"""
from __future__ import annotations

import time

import pytest

from celery_streams import admin, unique
from celery_streams.unique_tasks import unique_headers
from tests import rigs
from tests.helpers import wait_until
from tests.rigs import ServerRig

pytestmark = [pytest.mark.timeout(180)]
journal_server = rigs.journal_server   # the fixture

RECORD = rigs.RECORD
POISON = rigs.POISON


@pytest.fixture
def make_rig(redis_server, journal_server, unique_name):
    made = []

    def make(**settings):
        rig = ServerRig(redis_server, journal_server, unique_name + ':', **settings)
        made.append(rig)
        return rig

    yield make
    for rig in made:
        rig.close()


def held(rig):
    return {h.key: h for h in admin.unique_keys(rig.redis(), global_keyprefix=rig.prefix)}


def test_the_key_is_held_while_the_task_runs_after_an_early_ack(make_rig):
    """Celery acks before it runs a task (``acks_late`` off): the key is released once the
    task finished, not at the ack."""
    rig = make_rig(vt=2)
    app = rig.client_app()
    rig.worker('-c', '1')
    app.send_task(RECORD, args=('long', 3.0), headers=unique_headers('job'))
    wait_until(lambda: 'long' in rig.listed('started'), 20, what='the task to start')
    time.sleep(0.5)   # acked by now: the early ack happens as the task starts
    r = rig.redis()
    assert sum(g['pending'] for g in r.xinfo_groups(rig.keys.stream('celery'))) == 0
    app.send_task(RECORD, args=('dropped',), headers=unique_headers('job'))
    assert held(rig)['job'].mode == 'until_done'
    assert rig.wait_ran(['long'], timeout=20) is not None
    wait_until(lambda: 'job' not in held(rig), 5, what='the key to be released')
    app.send_task(RECORD, args=('after',), headers=unique_headers('job'))
    assert rig.wait_ran(['after'], timeout=20) is not None
    time.sleep(0.5)
    assert rig.ran() == {'long': 1, 'after': 1}


def test_a_killed_worker_keeps_the_key_until_the_task_taken_over_finished(make_rig, report):
    """The key is held for 2 s while the message waits (``unique_for``); the worker holding
    the message renews it, so it outlives the killed worker until another took the task over
    and finished it, and never by more than the lease."""
    rig = make_rig(vt=2, acks_late=1)
    app = rig.client_app()
    w1 = rig.worker('-c', '1', name='w1')
    headers = unique_headers('job', unique_for=2)
    app.send_task(RECORD, args=('held', 4.0), headers=headers)
    wait_until(lambda: 'held' in rig.listed('started'), 20, what='w1 to start the task')
    time.sleep(2.5)   # past unique_for: only the renewal keeps the key
    assert 'job' in held(rig)
    w1.kill()
    killed = time.monotonic()
    rig.worker('-c', '1', name='w2')
    lease = unique.lease_ms(2000) / 1000
    sent, ttls = 0, []
    while rig.listed('ran').count('held') == 0:
        assert time.monotonic() - killed < 40, 'the task was not taken over'
        found = held(rig).get('job')
        assert found is not None, 'the key lapsed while its task was not done'
        ttls.append(found.ttl)
        app.send_task(RECORD, args=('dup%d' % sent,), headers=headers)
        sent += 1
        time.sleep(0.3)
    wait_until(lambda: 'job' not in held(rig), 5, what='the key to be released with the ack')
    app.send_task(RECORD, args=('after',), headers=headers)
    assert rig.wait_ran(['after'], timeout=20) is not None
    time.sleep(0.5)
    report(duplicates_sent=sent, longest_ttl=max(ttls), lease=lease)
    assert sent >= 10 and max(ttls) <= lease
    assert {t: n for t, n in rig.ran().items()} == {'held': 1, 'after': 1}
    assert 'held' in rig.listed('redelivered')


def test_a_period_and_a_debounce_as_a_worker_runs_them(make_rig):
    rig = make_rig(vt=2)
    app = rig.client_app()
    rig.worker('-c', '2')
    tick = unique_headers('tick', 'period', 1.5)
    started = time.monotonic()
    for n in range(3):   # at 0, 0.5 and 1.0 s: one per period
        app.send_task(RECORD, args=('p%d' % n,), headers=tick)
        time.sleep(0.5)
    time.sleep(max(0.0, 1.6 - (time.monotonic() - started)))
    app.send_task(RECORD, args=('p3',), headers=tick)
    save = unique_headers('save', 'debounce')
    for n in range(3):   # last arguments win
        app.send_task(RECORD, args=('d%d' % n,), headers=save, countdown=2)
    assert rig.wait_ran(['p0', 'p3', 'd2'], timeout=30) is not None
    # acked early: the key goes once the task ran, at the worker's next renewal tick (~1 s)
    wait_until(lambda: 'save' not in held(rig), 5, what='the key to be released after the task ran')
    time.sleep(0.5)
    assert rig.ran() == {'p0': 1, 'p3': 1, 'd2': 1}


def test_a_dead_lettered_task_frees_its_key(make_rig):
    rig = make_rig(vt=2, acks_late=1, max_deliveries=1)
    app = rig.client_app()
    rig.worker('-c', '1')
    app.send_task(POISON, args=('pill',), headers=unique_headers('pill'))
    r = rig.redis()
    wait_until(lambda: r.exists(rig.keys.dead_letters('celery')) and
               r.xlen(rig.keys.dead_letters('celery')) == 1, 60, what='the poison task')
    assert 'pill' not in held(rig)
    app.send_task(RECORD, args=('after',), headers=unique_headers('pill'))
    assert rig.wait_ran(['after'], timeout=20) is not None
