"""Redis Cluster, for real: ``celery worker`` processes on 3 masters and 3 replicas.

One cluster (:class:`~tests.servers.ClusterTopology`) per server kind that runs one
(Redis 7, Valkey 8), started once for the module. Each test has a
:class:`~tests.rigs.ClusterRig`: workers run ``tests/apps/rig.py``, whose task
records every execution into a journal on a server outside the cluster. Each test
consumes queues whose slots lie on every master, and the worker is running before
anything is published, from this process. The tests that move a slot or fail a
master over come last; each test finds where its queues live anew. Figures are
printed: run with ``-s``.
"""
from __future__ import annotations

import re
import time

import pytest
from redis.crc import key_slot

import celery_streams  # noqa: F401  (registers redis-streams+cluster://)
from tests import rigs
from tests.rigs import RECORD, ClusterRig, Publisher

pytestmark = [pytest.mark.needs_server, pytest.mark.slow]

journal_server = rigs.journal_server   # the fixture


@pytest.fixture
def rig(cluster, journal_server, unique_name):
    with ClusterRig(cluster, journal_server, unique_name + ':') as rig:
        yield rig


def to_each(queues):
    """A :class:`~tests.rigs.Publisher`'s routes: to each of ``queues`` in turn."""
    return [{'queue': queue} for queue in queues]


def test_a_running_worker_runs_what_another_process_publishes_on_every_master(rig, report):
    queues = rig.queues(per_master=2)
    assert len({rig.master_of(q).port for q in queues}) == 3
    worker = rig.worker('-P', 'threads', '-c', '4', queues=queues)
    app = rig.client_app()
    odd = rig.cluster.master_for(rig.keys.stream(queues[-1])).client()
    odd.xadd(rig.keys.stream(queues[-1]), {'payload': b'\xff\x00 not json'})   # arbitrary bytes
    tokens = []
    for i in range(240):   # plain, with a priority, with a countdown (delayed delivery)
        token = 't%d' % i
        options = {'priority': 9} if i % 3 == 1 else {'countdown': 1} if i % 3 == 2 else {}
        app.send_task(RECORD, args=(token,), queue=queues[i % len(queues)], **options)
        tokens.append(token)
    started = time.monotonic()
    assert rig.wait_ran(tokens, timeout=60) is not None, sorted(set(tokens) - set(rig.ran()))[:10]
    took = time.monotonic() - started
    ran = rig.ran()
    assert [t for t in tokens if ran[t] != 1] == []
    deadline = time.monotonic() + 10
    while rig.pending(queues) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert rig.pending(queues) == 0
    assert odd.xlen(rig.keys.dead_letters(queues[-1])) == 1   # the odd entry, and only it
    odd.close()
    assert 'Traceback' not in worker.text()
    report(queues=len(queues), tasks=len(tokens), seconds=took)


def test_a_broadcast_and_a_queue_on_another_master_reach_a_running_worker(rig):
    """Remote control (a fanout exchange, its reply queue) works across masters: the
    worker's broadcast queue and this client's reply queue lie in slots of their own."""
    queues = rig.queues(per_master=1)
    rig.worker('-P', 'solo', queues=queues)
    app = rig.client_app()
    replies = app.control.ping(timeout=5)
    assert len(replies) == 1 and list(replies[0].values())[0] == {'ok': 'pong'}
    assert app.control.inspect(timeout=5).active_queues()


def test_a_busy_queue_whose_slot_moves_under_a_running_worker_loses_nothing(rig, report):
    queues = rig.queues(per_master=1)
    busy = queues[0]
    source = rig.master_of(busy)
    target = next(m for m in rig.cluster.primaries() if m.port != source.port)
    worker = rig.worker('-P', 'threads', '-c', '4', queues=queues)
    publisher = Publisher(rig.client_app(), routes=to_each([busy, busy, busy, queues[1]]), interval=0.005)
    publisher.start()
    time.sleep(1.5)
    moved_at = time.monotonic()
    rig.cluster.migrate_slot(key_slot(rig.keys.stream(busy).encode()), target)
    moved_in = time.monotonic() - moved_at
    time.sleep(1.5)
    publisher.stop()
    tokens = publisher.tokens()
    assert rig.master_of(busy).port == target.port
    assert rig.wait_ran(tokens, timeout=60) is not None, sorted(set(tokens) - set(rig.ran()))[:10]
    ran = rig.ran()
    twice = [t for t in tokens if ran[t] > 1]
    report(published=len(tokens), failed=len(publisher.failed), ran_twice=len(twice),
           migration=moved_in)
    assert publisher.failed == []
    assert twice == []
    assert rig.pending(queues) == 0 or not time.sleep(3) and rig.pending(queues) == 0
    moves = [line for line in worker.text().splitlines() if ' of queue(s) ' in line]
    assert moves and all(re.search(r'(moved|is moving) to 127\.0\.0\.1:%d' % target.port, line)
                         for line in moves), moves
    assert 'Traceback' not in worker.text()


@pytest.mark.parametrize('how', ['cluster-failover', 'kill-master'])
def test_a_master_failing_over_under_a_running_worker_loses_nothing(rig, report, how):
    queues = rig.queues(per_master=1)
    victim_queue = queues[0]
    victim = rig.master_of(victim_queue)
    rig.worker('-P', 'threads', '-c', '4', queues=queues)
    publisher = Publisher(rig.client_app(), routes=to_each(queues), interval=0.005)
    publisher.start()
    time.sleep(1.5)
    failed_at, failed_wall = time.monotonic(), time.time()
    if how == 'kill-master':
        promoted = rig.cluster.kill(victim)
    else:
        promoted = rig.cluster.fail_over(victim)
    failover = time.monotonic() - failed_at
    time.sleep(2)
    publisher.stop()
    stopped_wall = time.time()
    tokens = publisher.tokens()
    assert rig.master_of(victim_queue).port == promoted.port
    assert rig.wait_ran(tokens, timeout=90) is not None, sorted(set(tokens) - set(rig.ran()))[:10]
    ran = rig.ran()
    after = publisher.returned_after(failed_at)
    report(how=how, published=len(tokens), after_failover=len(after), failed=len(publisher.failed),
           ran_twice=sum(1 for t in tokens if ran[t] > 1), failover=failover,
           worker_ran_nothing_for=rig.longest_pause(failed_wall, stopped_wall))
    assert after, 'nothing was published after the failover: the test proves nothing'
