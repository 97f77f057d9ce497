"""The ledger on a Redis Cluster: each queue's ledger lives in its slot, on its master, and is
counted there by the same scripts and commands; the audit reads each on its own node."""
from __future__ import annotations

import socket
import time

import pytest
from kombu import Connection, Exchange, Producer, Queue

import celery_streams  # noqa: F401  (registers the schemes)
from celery_streams import admin, ledger
from tests.test_cluster import spread_names

pytestmark = pytest.mark.needs_server


@pytest.fixture
def rc(cluster):
    client = cluster.client()
    yield client
    client.close()


def test_the_ledger_balances_on_every_master(cluster, rc, keys, prefix):
    names = spread_names(cluster, per_master=1, stem=prefix.rstrip(':') + 'l')
    assert len({cluster.master_for(keys.ledger(name)).port for name in names}) == len(names)
    for name in names:   # the ledger shares the slot of the queue's streams
        assert cluster.master_for(keys.ledger(name)).port == cluster.master_for(keys.stream(name)).port
    exchange = Exchange(prefix + 'x', 'direct')
    queues = [Queue(name, exchange, name) for name in names]
    with Connection(cluster.urls(), transport_options={'global_keyprefix': prefix}) as conn:
        producer = Producer(conn)
        for queue in queues:
            for n in range(5):   # the direct exchange: routed in the client on a cluster
                producer.publish({'n': n}, exchange=exchange, routing_key=queue.name, declare=[queue])
            producer.publish({'n': 'hot'}, routing_key=queue.name)   # the default exchange
        got = []
        consumer = conn.Consumer(queues[:-1], callbacks=[lambda body, message: got.append(message)])
        consumer.consume()
        deadline = time.monotonic() + 15
        while len(got) < 6 * (len(names) - 1) and time.monotonic() < deadline:
            try:
                conn.drain_events(timeout=0.2)
            except socket.timeout:
                pass
        assert len(got) == 6 * (len(names) - 1)
        got[0].reject()
        for message in got[1:]:
            message.ack()
        consumer.cancel()
    admin.drain(rc, global_keyprefix=prefix, queues=[names[-1]])   # nobody consumed it
    found = {q.queue: q for q in ledger.audit(rc, global_keyprefix=prefix, queues=names)}
    for name in names[:-1]:
        assert found[name].count('published') == 6 and found[name].unaccounted == 0
    assert sum(found[name].count('acked') for name in names) == 6 * (len(names) - 1) - 1
    assert sum(found[name].count('rejected') for name in names) == 1
    last = found[names[-1]]
    assert (last.count('published'), last.count('drained'), last.unaccounted) == (6, 6, 0)
