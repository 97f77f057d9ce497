"""Sharded queues on a Redis Cluster (the ``cluster`` fixture), kombu-level: the shards of a
queue are placed on distinct masters; publishing (round robin, ``shard_key``, delayed,
priority, a direct exchange) and consuming every shard under the queue's name; a live change
of N while publishing loses nothing; the operator sees one queue."""
from __future__ import annotations

import threading
import time
from collections import Counter
from datetime import datetime, timedelta, timezone

import pytest
from kombu import Connection, Exchange, Producer, Queue

import celery_streams  # noqa: F401  (registers the schemes)
from celery_streams import admin, shards

pytestmark = [pytest.mark.needs_server, pytest.mark.timeout(120)]


@pytest.fixture
def rc(cluster):
    client = cluster.client()
    yield client
    client.close()


@pytest.fixture
def queue(unique_name):
    return unique_name + 'q'


def conn_of(cluster, prefix, **options):
    return Connection(cluster.urls(), transport_options={'global_keyprefix': prefix, **options})


def consume(conn, queues, count, timeout=15, until=None):
    got = []
    with conn.Consumer(queues, callbacks=[lambda body, m: (got.append(m), m.ack())]):
        deadline = time.monotonic() + timeout
        while len(got) < count and time.monotonic() < deadline:
            if until is not None:
                until(got)
            try:
                conn.drain_events(timeout=0.2)
            except TimeoutError:
                pass
    return got


def test_shards_lie_on_distinct_masters(cluster, rc, keys, queue):
    placement = shards.set_count(rc, keys, queue, 3)
    masters = [cluster.master_for(keys.stream(name)).port for name in placement.names]
    assert len(set(masters)) == 3   # one per master: the hot queue is spread
    assert shards.masters(rc, keys, placement.names) == ['127.0.0.1:%d' % p for p in masters]
    more = shards.set_count(rc, keys, queue, 5)   # more shards than masters: the least used
    assert more.names[:3] == placement.names
    assert sorted(Counter(cluster.master_for(keys.stream(n)).port for n in more.names).values()) == [
        1, 2, 2]


def test_publish_and_consume_every_shard(cluster, rc, keys, prefix, queue):
    eta = (datetime.now(timezone.utc) + timedelta(seconds=1.5)).isoformat()
    exchange = Exchange(queue + 'x', 'direct')
    bound = Queue(queue, exchange, routing_key='rk')
    with conn_of(cluster, prefix, sharded_queues={queue: 3}) as worker:
        with worker.Consumer([bound], callbacks=[]):   # consuming starts: the option is written
            pass
        placement = shards.read(rc, keys)[queue]
        assert placement.number == 3
        with conn_of(cluster, prefix) as client:
            producer = Producer(client)
            for n in range(30):
                producer.publish({'n': n, 'key': 'k%d' % (n % 3)}, routing_key=queue,
                                 headers={'shard_key': 'k%d' % (n % 3)})
            for n in range(30, 36):
                producer.publish({'n': n}, exchange=exchange, routing_key='rk', priority=9)
            for n in range(36, 39):
                producer.publish({'n': n}, routing_key=queue,
                                 headers={'task': 'demo', 'id': 'd%d' % n, 'eta': eta})
        assert [rc.xlen(keys.stream(name, 9)) for name in placement.names] == [2, 2, 2]
        assert sum(rc.zcard(keys.scheduled(name)) for name in placement.names) == 3
        got = consume(worker, [bound], 39)
    assert sorted(m.payload['n'] for m in got) == list(range(39))
    by_key: dict = {}
    for message in got:
        if 'key' in message.payload:
            by_key.setdefault(message.payload['key'], []).append(message.payload['n'])
            shard = message.delivery_tag.rsplit('/', 1)[1]
            assert shard == shards.Route(placement.names).pick(
                {'headers': {'shard_key': message.payload['key']}})
    assert all(ns == sorted(ns) for ns in by_key.values()) and len(by_key) == 3
    assert {m.delivery_tag.rsplit('/', 1)[1] for m in got} == set(placement.names)


def test_live_count_change_while_publishing(cluster, rc, keys, prefix, queue):
    total, done = 300, threading.Event()
    changed: list = []

    def publish():
        with conn_of(cluster, prefix) as client:
            producer = Producer(client)
            for n in range(total):
                producer.publish({'n': n}, routing_key=queue)
                time.sleep(0.01)
        done.set()

    def change(got):
        if not changed and len(got) > 60:
            changed.append(shards.set_count(rc, keys, queue, 3))
        elif len(changed) == 1 and (done.is_set() or any(   # once the third shard is read
                m.delivery_tag.endswith('/' + changed[0].names[2]) for m in got[-20:])):
            changed.append(shards.set_count(rc, keys, queue, 2))

    with conn_of(cluster, prefix, sharded_queues={queue: 1}) as worker:
        publisher = threading.Thread(target=publish)
        with worker.Consumer([Queue(queue)], callbacks=[]):
            publisher.start()
        got = consume(worker, [Queue(queue)], total, timeout=30, until=change)
        publisher.join(10)
    change(got)   # the third shard was read in the last batch: 2 now
    assert done.is_set() and len(changed) == 2
    assert sorted(m.payload['n'] for m in got) == list(range(total))
    assert {m.delivery_tag.rsplit('/', 1)[1] for m in got} == set(changed[0].names)
    assert len({cluster.master_for(keys.stream(n)).port for n in changed[0].names}) == 3


def test_operator_sees_one_queue(cluster, rc, keys, prefix, queue):
    placement = shards.set_count(rc, keys, queue, 3)
    with conn_of(cluster, prefix) as conn:
        producer = Producer(conn)
        for n in range(12):
            producer.publish({'n': n}, routing_key=queue, declare=[Queue(queue)])
        assert conn.default_channel._size(queue) == 12
        [seen] = admin.status(rc, global_keyprefix=prefix, queues=[queue]).queues
        assert (seen.name, seen.waiting, [s['waiting'] for s in seen.shards]) == (queue, 12, [4, 4, 4])
        assert [q.name for q in admin.status(rc, global_keyprefix=prefix).queues] == [queue]
        [drained] = admin.drain(rc, global_keyprefix=prefix, queues=[queue])
        assert (drained.queue, drained.removed) == (queue, 12)
        assert conn.default_channel._size(queue) == 0
        assert all(rc.xlen(keys.stream(name)) == 0 for name in placement.names)
