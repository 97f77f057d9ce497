"""Unique tasks on a Redis Cluster (the cluster rig): each queue's uniqueness keys lie in its
slot, on its master, checked with the append there; a real worker runs one task per key on
queues of every master, holds the key while the task runs (early acks) and frees it after;
the listing, a drain and a nuke see the keys on every master.
"""
from __future__ import annotations

import time

import pytest

from celery_streams import admin
from celery_streams.unique_tasks import unique_headers
from tests import rigs
from tests.helpers import wait_until
from tests.rigs import RECORD, ClusterRig

pytestmark = [pytest.mark.needs_server, pytest.mark.timeout(180)]
journal_server = rigs.journal_server   # the fixture


@pytest.fixture
def rig(cluster, journal_server, unique_name):
    with ClusterRig(cluster, journal_server, unique_name + ':', vt=2) as rig:
        yield rig


def held(rig):
    return {(h.queue, h.key): h for h in admin.unique_keys(rig.redis(), global_keyprefix=rig.prefix)}


def test_one_task_per_key_on_every_master(rig):
    queues = rig.queues(per_master=1)
    assert len({rig.master_of(q).port for q in queues}) == 3
    for queue in queues:   # the key in the slot of the queue's streams
        assert (rig.cluster.master_for(rig.keys.unique(queue, 'job')).port
                == rig.master_of(queue).port)
    app = rig.client_app()
    idle = rig.queues(per_master=1, stem='idle')   # nobody consumes them: drained
    for queue in queues:
        for n in range(3):   # one runs, two are dropped
            app.send_task(RECORD, args=('%s-%d' % (queue, n), 2.0), queue=queue,
                          headers=unique_headers('job'))
    for queue in idle:
        app.send_task(RECORD, args=(queue + '-now',), queue=queue, headers=unique_headers('now'))
        app.send_task(RECORD, args=(queue + '-later',), queue=queue, countdown=60,
                      headers=unique_headers('later'))
    assert set(held(rig)) == ({(q, 'job') for q in queues}
                              | {(q, k) for q in idle for k in ('now', 'later')})
    drained = admin.drain(rig.redis(), global_keyprefix=rig.prefix, queues=idle)
    assert [(d.removed, d.scheduled_removed) for d in drained] == [(1, 1)] * 3
    assert set(held(rig)) == {(q, 'job') for q in queues}
    rig.worker('-c', '3', queues=queues)
    wait_until(lambda: len(rig.listed('started')) == 3, 30, what='the three tasks to start')
    time.sleep(0.5)   # acked as they start (early acks): the keys stay held while they run
    for queue in queues:
        app.send_task(RECORD, args=(queue + '-dup',), queue=queue, headers=unique_headers('job'))
    assert rig.wait_ran(['%s-0' % q for q in queues], timeout=30) is not None
    wait_until(lambda: not held(rig), 5, what='the keys to be released')
    for queue in queues:
        app.send_task(RECORD, args=(queue + '-after',), queue=queue, headers=unique_headers('job'))
    assert rig.wait_ran(['%s-after' % q for q in queues], timeout=30) is not None
    time.sleep(0.5)
    assert rig.ran() == {token: 1 for q in queues for token in ('%s-0' % q, '%s-after' % q)}
    admin.nuke(rig.redis(), global_keyprefix=rig.prefix)
    assert held(rig) == {}
