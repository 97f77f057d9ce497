"""Global rate limits on a Redis Cluster: one limit over queues whose slots are on different
masters, its state in a slot of its own (``{limits}``), reserved there and held in each
queue's slot."""
from __future__ import annotations

import time

import pytest
from kombu import Connection, Producer, Queue

import celery_streams  # noqa: F401  (registers the schemes)
from celery_streams import ledger, limits
from tests.test_cluster import spread_names

pytestmark = pytest.mark.needs_server


def test_one_limit_paces_queues_on_every_master(cluster, keys, prefix):
    names = spread_names(cluster, per_master=1, stem=prefix.rstrip(':') + 'rl')
    assert len({cluster.master_for(keys.stream(name)).port for name in names}) > 1
    queues = [Queue(name, routing_key=name) for name in names]
    got = []
    with Connection(cluster.urls(), transport_options={
            'global_keyprefix': prefix, 'rate_limits': {'t.limited': '10/s'}}) as conn:
        producer = Producer(conn)
        for n in range(8):
            for queue in queues:
                producer.publish({'n': n}, routing_key=queue.name, declare=[queue],
                                 headers={'task': 't.limited', 'id': '%s-%d' % (queue.name, n)})
        total = 8 * len(queues)
        start = time.monotonic()
        consumer = conn.Consumer(queues, callbacks=[
            lambda body, message: (got.append(time.monotonic() - start), message.ack())])
        consumer.consume()
        deadline = start + 20
        while len(got) < total and time.monotonic() < deadline:
            try:
                conn.drain_events(timeout=0.2)
            except TimeoutError:
                pass
    assert len(got) == total
    assert got[-1] - got[0] > (total - 1) / 10 * 0.9   # one limit over all the queues
    assert min(b - a for a, b in zip(got, got[1:])) > 0.05
    rc = cluster.client()
    try:
        assert limits.read(rc, keys)['task:t.limited'].rate == '10/s'
        found = ledger.audit(rc, global_keyprefix=prefix, queues=names)
        assert sum(q.count('throttled') for q in found) >= total - len(names) - 1
        assert all(q.unaccounted == 0 for q in found)
    finally:
        rc.close()
