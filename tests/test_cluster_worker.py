"""Redis Cluster, for real: ``celery worker`` processes on 3 masters and 3 replicas.

One cluster (:class:`~tests.servers.ClusterTopology`) per server kind that runs one
(Redis 7, Valkey 8), started once for the module. Workers run
``tests/apps/cluster.py``; its task records every execution into a journal on a
server outside the cluster. Each test consumes queues whose slots lie on every
master, and the worker is running before anything is published, from this
process. The tests that move a slot or fail a master over come last; each test
finds where its queues live anew. Figures are printed: run with ``-s``.
"""
from __future__ import annotations

import os
import re
import threading
import time
from collections import Counter

import pytest
from celery import Celery
from redis.crc import key_slot

import celery_streams  # noqa: F401  (registers redis-streams+cluster://)
from celery_streams import errors
from celery_streams.keys import Keys
from tests import servers
from tests.workers import ROOT, Worker, clean_env, stop_all

pytestmark = [pytest.mark.needs_server, pytest.mark.slow]

APP = 'tests.apps.cluster'
TASK = 'tests.apps.cluster.record'
WORKER_FLAGS = ('--without-mingle', '--without-gossip', '--without-heartbeat')
#: A publish is retried for up to ~10 s: longer than a failover here (node timeout 1.5 s).
PUBLISH_RETRY = {'max_retries': 40, 'interval_start': 0, 'interval_step': 0.1, 'interval_max': 0.25}


@pytest.fixture(scope='module')
def journal_server(preferred_server_binary):
    with servers.RedisServer(binary=preferred_server_binary.path,
                             name=preferred_server_binary.name) as server:
        yield server


class Rig:
    """A cluster, a journal, a key prefix, and the workers and client apps of one test."""

    def __init__(self, cluster, journal_server, prefix):
        self.cluster = cluster
        self.prefix = prefix
        self.keys = Keys(prefix)
        self.journal = journal_server.client()
        self.journal_url = 'redis://127.0.0.1:%d/0' % journal_server.port
        self.workers, self.apps = [], []

    def queues(self, per_master=2, stem='q'):
        """Queue names, ``per_master`` on each master now (their hash tags decide where)."""
        wanted = {s.port: per_master for s in self.cluster.primaries()}
        names, i = [], 0
        while any(wanted.values()):
            name = '%s%s%d' % (self.prefix.rstrip(':'), stem, i)
            owner = self.master_of(name).port
            if wanted.get(owner):
                wanted[owner] -= 1
                names.append(name)
            i += 1
        return names

    def master_of(self, queue):
        return self.cluster.master_for(self.keys.stream(queue))

    def worker(self, queues, *args, name='w1'):
        env = clean_env()
        env.update({'CLUSTER_BROKER': self.cluster.urls(), 'CLUSTER_JOURNAL': self.journal_url,
                    'CLUSTER_PREFIX': self.prefix,
                    'PYTHONPATH': str(ROOT) + os.pathsep + env.get('PYTHONPATH', ''),
                    'PYTHONUNBUFFERED': '1'})
        worker = Worker(env, '-Q', ','.join(queues), *args, *WORKER_FLAGS, name=name, app=APP)
        self.workers.append(worker)
        return worker.start()

    def client_app(self):
        app = Celery('cluster-client', broker=self.cluster.urls(), set_as_current=False)
        app.conf.broker_transport_options = {'global_keyprefix': self.prefix}
        app.conf.task_ignore_result = True
        app.conf.task_publish_retry_policy = PUBLISH_RETRY
        self.apps.append(app)
        return app

    def ran(self) -> Counter:
        return Counter(t.decode() for t in self.journal.lrange('cluster:%s:ran' % self.prefix, 0, -1))

    def longest_pause(self, start, end) -> float:
        """The longest stretch of ``[start, end]`` (``time.time()``) in which no task ran."""
        marks = sorted(float(t) for t in self.journal.lrange('cluster:%s:at' % self.prefix, 0, -1))
        marks = [start] + [t for t in marks if start < t < end] + [end]
        return max(b - a for a, b in zip(marks, marks[1:]))

    def wait_ran(self, tokens, timeout=60) -> bool:
        tokens = set(tokens)
        deadline = time.monotonic() + timeout
        while tokens - set(self.ran()):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def pending(self, queues) -> int:
        """Entries delivered and not acked, over every stream of ``queues``."""
        client = self.cluster.client()
        try:
            return sum(client.xpending(stream, 'celery')['pending']
                       for queue in queues for stream in self.keys.streams(queue)
                       if client.exists(stream))
        finally:
            client.close()

    def close(self):
        stop_all(self.workers)
        for app in self.apps:
            app.close()
        self.journal.close()


@pytest.fixture
def rig(cluster, journal_server, unique_name):
    rig = Rig(cluster, journal_server, unique_name + ':')
    yield rig
    rig.close()


class Publisher(threading.Thread):
    """Sends a task to ``queues`` in turn every ``interval`` seconds until stopped; records the
    tokens whose publish returned."""

    def __init__(self, app, queues, interval=0.01):
        super().__init__(daemon=True)
        self.app, self.queues, self.interval = app, queues, interval
        self.returned = []      # (token, time.monotonic() when its publish returned)
        self.failed = []        # (token, error)
        self.stopping = threading.Event()

    def run(self):
        n = 0
        while not self.stopping.is_set():
            token = 'p%d' % n
            try:
                self.app.send_task(TASK, args=(token,), queue=self.queues[n % len(self.queues)])
            except Exception as exc:
                self.failed.append((token, errors.one_line(exc)))
            else:
                self.returned.append((token, time.monotonic()))
            n += 1
            self.stopping.wait(self.interval)

    def stop(self):
        self.stopping.set()
        self.join(30)

    def tokens(self):
        return [token for token, _ in self.returned]


def test_a_running_worker_runs_what_another_process_publishes_on_every_master(rig, report):
    queues = rig.queues(per_master=2)
    assert len({rig.master_of(q).port for q in queues}) == 3
    worker = rig.worker(queues, '-P', 'threads', '-c', '4')
    app = rig.client_app()
    odd = rig.cluster.master_for(rig.keys.stream(queues[-1])).client()
    odd.xadd(rig.keys.stream(queues[-1]), {'payload': b'\xff\x00 not json'})   # arbitrary bytes
    tokens = []
    for i in range(240):   # plain, with a priority, with a countdown (delayed delivery)
        token = 't%d' % i
        options = {'priority': 9} if i % 3 == 1 else {'countdown': 1} if i % 3 == 2 else {}
        app.send_task(TASK, args=(token,), queue=queues[i % len(queues)], **options)
        tokens.append(token)
    started = time.monotonic()
    assert rig.wait_ran(tokens, timeout=60), sorted(set(tokens) - set(rig.ran()))[:10]
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
    rig.worker(queues, '-P', 'solo')
    app = rig.client_app()
    replies = app.control.ping(timeout=5)
    assert len(replies) == 1 and list(replies[0].values())[0] == {'ok': 'pong'}
    assert app.control.inspect(timeout=5).active_queues()


def test_a_busy_queue_whose_slot_moves_under_a_running_worker_loses_nothing(rig, report):
    queues = rig.queues(per_master=1)
    busy = queues[0]
    source = rig.master_of(busy)
    target = next(m for m in rig.cluster.primaries() if m.port != source.port)
    worker = rig.worker(queues, '-P', 'threads', '-c', '4')
    publisher = Publisher(rig.client_app(), [busy, busy, busy, queues[1]], interval=0.005)
    publisher.start()
    time.sleep(1.5)
    moved_at = time.monotonic()
    rig.cluster.migrate_slot(key_slot(rig.keys.stream(busy).encode()), target)
    moved_in = time.monotonic() - moved_at
    time.sleep(1.5)
    publisher.stop()
    tokens = publisher.tokens()
    assert rig.master_of(busy).port == target.port
    assert rig.wait_ran(tokens, timeout=60), sorted(set(tokens) - set(rig.ran()))[:10]
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
    rig.worker(queues, '-P', 'threads', '-c', '4')
    publisher = Publisher(rig.client_app(), queues, interval=0.005)
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
    assert rig.wait_ran(tokens, timeout=90), sorted(set(tokens) - set(rig.ran()))[:10]
    ran = rig.ran()
    after = [t for t, at in publisher.returned if at > failed_at]
    report(how=how, published=len(tokens), after_failover=len(after), failed=len(publisher.failed),
           ran_twice=sum(1 for t in tokens if ran[t] > 1), failover=failover,
           worker_ran_nothing_for=rig.longest_pause(failed_wall, stopped_wall))
    assert after, 'nothing was published after the failover: the test proves nothing'
