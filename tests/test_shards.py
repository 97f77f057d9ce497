"""Sharded queues (:mod:`celery_streams.shards`) on one server, kombu-level: the option and its
errors, the registry and placement, publishing (round robin, ``shard_key``, delayed, priority,
exchanges, batches, uniqueness keys), consuming every shard under the queue's name, a live change
of N while publishing, reclaim of a killed consumer's messages from every shard, a queue's rate
limit over its shards, the transport's ACL rules, the CLI, and the operator's view of one queue
(size, purge, status, Flower, audit, drain, scheduled, dead letters).

The Redis Cluster half (shards on distinct masters) is ``tests/test_shards_cluster.py``; real
workers on a cluster are in ``tests/test_shards_worker.py``.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import datetime, timedelta, timezone

import pytest
from kombu import Connection, Exchange, Producer, Queue

import celery_streams  # noqa: F401  (registers the schemes)
from celery_streams import admin, ledger, shards
from celery_streams.errors import ConfigurationError
from celery_streams.flower import queue_rows
from celery_streams.keys import acl_rules, origin_of, shard_name
from celery_streams.options import Options
from tests.helpers import streams_url

pytestmark = [pytest.mark.needs_server, pytest.mark.timeout(90)]


def conn_of(server, prefix, **options):
    return Connection(streams_url(server), transport_options={'global_keyprefix': prefix, **options})


def lengths(r, keys, names, bucket=0):
    """XLEN of each shard's stream (of ``bucket``)."""
    return [r.xlen(keys.stream(name, bucket)) if r.exists(keys.stream(name, bucket)) else 0
            for name in names]


def consume_all(conn, queue, count, timeout=10):
    """Consume ``count`` messages of ``queue`` (acked); ``[message]`` in delivery order."""
    got = []

    def on_message(body, message):
        got.append(message)
        message.ack()

    with conn.Consumer([queue], callbacks=[on_message]):
        deadline = time.monotonic() + timeout
        while len(got) < count and time.monotonic() < deadline:
            try:
                conn.drain_events(timeout=0.2)
            except TimeoutError:
                pass
    return got


@pytest.fixture
def queue(unique_name):
    return unique_name + 'q'


# -- the option, the names, the registry -----------------------------------------------------

@pytest.mark.parametrize('bad', [['celery'], {'celery': 0}, {'celery': '3'}, {'celery': True},
                                 {'celery': 2.5}, {'a{b': 2}, {'': 2}, {'celery': 1000}])
def test_bad_option_is_one_line(bad):
    with pytest.raises(ConfigurationError) as info:
        Options.from_transport_options({'sharded_queues': bad})
    assert '\n' not in str(info.value)
    assert str(info.value).startswith('transport option sharded_queues must be a dict of queue name')
    assert Options.from_transport_options({'sharded_queues': {'b': 2, 'a': 1}}).sharded_queues == (
        ('a', 1), ('b', 2))


def test_names():
    assert shard_name('celery', 7) == 'celery{7'
    assert origin_of('celery{7') == 'celery' and origin_of('celery') == 'celery'
    with pytest.raises(ConfigurationError):
        shards.check_count('celery', 0)


def test_set_count_places_and_keeps_every_shard(r, keys, queue):
    assert shards.read(r, keys) == {}
    three = shards.set_count(r, keys, queue, 3)
    assert three == shards.Placement(3, (queue, queue + '{1', queue + '{2'))
    assert r.hexists(keys.shards, queue)
    two = shards.set_count(r, keys, queue, 2)   # lowering: publishers use 2, consumers read 3
    assert two.publishing == (queue, queue + '{1') and two.names == three.names
    four = shards.set_count(r, keys, queue, 4)   # raising: the placed ones come back, one more
    assert four.names == (*three.names, queue + '{3')
    assert shards.read(r, keys) == {queue: four}


# -- publishing and consuming ----------------------------------------------------------------

def test_worker_writes_option_and_reads_every_shard(redis_server, r, keys, prefix, queue):
    with conn_of(redis_server, prefix, sharded_queues={queue: 3}) as worker:
        got = []
        with worker.Consumer([Queue(queue)], callbacks=[lambda body, m: (got.append(m), m.ack())]):
            placement = shards.read(r, keys)[queue]   # written when consuming starts
            assert placement.number == 3
            with conn_of(redis_server, prefix) as client:
                producer = Producer(client)
                for n in range(30):
                    producer.publish({'n': n}, routing_key=queue)
            assert lengths(r, keys, placement.names) == [10, 10, 10]   # round robin
            deadline = time.monotonic() + 10
            while len(got) < 30 and time.monotonic() < deadline:
                try:
                    worker.drain_events(timeout=0.2)
                except TimeoutError:
                    pass
    assert sorted(m.payload['n'] for m in got) == list(range(30))
    assert {m.delivery_info['routing_key'] for m in got} == {queue}   # as for the queue
    assert lengths(r, keys, placement.names) == [0, 0, 0]   # acked


def test_shard_key_keeps_order_within_a_shard(redis_server, r, keys, prefix, queue):
    placement = shards.set_count(r, keys, queue, 3)
    with conn_of(redis_server, prefix) as conn:
        producer = Producer(conn)
        for n in range(60):
            key = 'k%d' % (n % 6)
            producer.publish({'n': n, 'key': key}, routing_key=queue, declare=[Queue(queue)],
                             headers={'shard_key': key})
        for name in placement.names:   # every message of a key in one shard
            found = [json.loads(f[b'payload'])['body'] for _, f in r.xrange(keys.stream(name))]
            assert all(shards.Route(placement.names).pick({'headers': {'shard_key': key}}) == name
                       for key in {json.loads(b)['key'] for b in found})
        assert sum(lengths(r, keys, placement.names)) == 60
        assert sum(1 for n in lengths(r, keys, placement.names) if n) > 1   # spread
        got = consume_all(conn, Queue(queue), 60)
    assert len(got) == 60
    by_key: dict = {}
    for message in got:
        by_key.setdefault(message.payload['key'], []).append(message.payload['n'])
    assert all(ns == sorted(ns) for ns in by_key.values())


def test_delayed_and_priority_go_to_the_shard(redis_server, r, keys, prefix, queue):
    placement = shards.set_count(r, keys, queue, 2)
    eta = (datetime.now(timezone.utc) + timedelta(seconds=1.5)).isoformat()
    with conn_of(redis_server, prefix) as conn:
        producer = Producer(conn)
        for n in range(4):
            producer.publish({'n': n}, routing_key=queue, declare=[Queue(queue)],
                             headers={'task': 'demo', 'id': 'd%d' % n, 'eta': eta})
        for n in range(4, 8):
            producer.publish({'n': n}, routing_key=queue, priority=9)
        assert [r.zcard(keys.scheduled(name)) for name in placement.names] == [2, 2]
        assert lengths(r, keys, placement.names, bucket=9) == [2, 2]
        got = consume_all(conn, Queue(queue), 8)
    assert sorted(m.payload['n'] for m in got) == list(range(8))
    assert {m.payload['n'] for m in got[-4:]} == {0, 1, 2, 3}   # the delayed ones, once due


def test_exchange_and_batch_reach_the_shards(redis_server, r, keys, prefix, queue):
    placement = shards.set_count(r, keys, queue, 3)
    exchange = Exchange(queue + 'x', 'direct')
    bound = Queue(queue, exchange, routing_key='rk')
    with conn_of(redis_server, prefix) as conn:
        producer = Producer(conn)
        for n in range(6):
            producer.publish({'n': n}, exchange=exchange, routing_key='rk', declare=[bound])
        assert lengths(r, keys, placement.names) == [2, 2, 2]
        with conn_of(redis_server, prefix) as other:   # bound by another process
            other_producer = Producer(other)
            for n in range(6, 9):
                other_producer.publish({'n': n}, exchange=exchange, routing_key='rk')
        assert lengths(r, keys, placement.names) == [3, 3, 3]
        with producer.batch(max_size=4):   # Producer.batch: one write per 4 publishes
            for n in range(9, 15):
                producer.publish({'n': n}, routing_key=queue)
        assert lengths(r, keys, placement.names) == [5, 5, 5]
        got = consume_all(conn, bound, 15)
    assert sorted(m.payload['n'] for m in got) == list(range(15))


def test_live_count_change_while_publishing_loses_nothing(redis_server, r, keys, prefix, queue):
    """1 -> 3 -> 2 shards while a publisher publishes and a worker consumes: every message comes
    once, the new shards were used (the worker attached them without a restart)."""
    total, got, done = 450, [], threading.Event()
    with conn_of(redis_server, prefix, sharded_queues={queue: 1}) as worker:
        consumer = worker.Consumer([Queue(queue)],
                                   callbacks=[lambda body, m: (got.append(m), m.ack())])
        consumer.consume()
        assert shards.read(r, keys)[queue] == shards.Placement(1, (queue,))

        def publish():
            with conn_of(redis_server, prefix) as client:
                producer = Producer(client)
                for n in range(total):
                    producer.publish({'n': n}, routing_key=queue)
                    time.sleep(0.01)
            done.set()

        publisher = threading.Thread(target=publish)
        publisher.start()
        deadline, changed = time.monotonic() + 30, []
        while (len(got) < total or not done.is_set() or len(changed) < 2) and \
                time.monotonic() < deadline:
            if not changed and len(got) > 100:
                changed.append(shards.set_count(r, keys, queue, 3))
            elif len(changed) == 1 and (done.is_set() or any(   # once the third shard is read
                    m.delivery_tag.endswith('/' + changed[0].names[2]) for m in got[-20:])):
                changed.append(shards.set_count(r, keys, queue, 2))
            try:
                worker.drain_events(timeout=0.2)
            except TimeoutError:
                pass
        publisher.join(10)
        consumer.cancel()
    assert sorted(m.payload['n'] for m in got) == list(range(total))   # each once
    used = Counter(m.delivery_tag.rsplit('/', 1)[1] for m in got)
    assert set(used) == set(changed[0].names) and len(used) == 3   # every shard was read
    assert {m.delivery_info['routing_key'] for m in got} == {queue}
    assert shards.read(r, keys)[queue] == shards.Placement(2, changed[0].names)


def test_operator_sees_one_queue(redis_server, r, keys, prefix, queue):
    placement = shards.set_count(r, keys, queue, 3)
    eta = (datetime.now(timezone.utc) + timedelta(seconds=600)).isoformat()
    with conn_of(redis_server, prefix) as conn:
        producer = Producer(conn)
        for n in range(9):
            producer.publish({'n': n}, routing_key=queue, declare=[Queue(queue)])
        for n in range(2):
            producer.publish({'n': n}, routing_key=queue,
                             headers={'task': 'demo', 'id': 'later%d' % n, 'eta': eta})
        r.xadd(keys.dead_letters(placement.names[2]), {'reason': 'test', 'queue': placement.names[2]})
        channel = conn.default_channel
        assert channel._size(queue) == 9
        assert Queue(queue, channel=channel).queue_declare(passive=True).message_count == 9

        found = admin.status(r, global_keyprefix=prefix).queues
        assert [q.name for q in found] == [queue]   # no shard listed alone
        [seen] = admin.status(r, global_keyprefix=prefix, queues=[queue]).queues
        assert (seen.waiting, seen.length, seen.scheduled, seen.dead_letters) == (9, 9, 2, 1)
        assert [s['name'] for s in seen.shards] == list(placement.names)
        assert [s['waiting'] for s in seen.shards] == [3, 3, 3]

        assert [row['messages'] for row in queue_rows(r, keys, 'celery', [queue])] == [9]

        [listed] = admin.scheduled(r, global_keyprefix=prefix, queues=[queue])
        assert (listed.queue, listed.scheduled, len(listed.messages)) == (queue, 2, 2)
        [dead] = admin.dead_letters(r, global_keyprefix=prefix, queues=[queue])
        assert (dead.queue, dead.count) == (queue, 1)

        [audited] = ledger.audit(r, global_keyprefix=prefix, queues=[queue])
        assert (audited.queue, audited.count('published'), audited.waiting) == (queue, 11, 9)
        assert audited.unaccounted == 0
        assert [a.queue for a in ledger.audit(r, global_keyprefix=prefix)] == [queue]

        [planned] = admin.drain(r, global_keyprefix=prefix, queues=[queue], dry_run=True)
        assert (planned.queue, planned.removed, planned.scheduled_removed) == (queue, 9, 2)
        assert Queue(queue, channel=channel).purge() == 11   # kombu's purge: every shard
        for n in range(6):
            producer.publish({'n': n}, routing_key=queue)
        [drained] = admin.drain(r, global_keyprefix=prefix, queues=[queue])
        assert (drained.queue, drained.removed, len(drained.shards)) == (queue, 6, 3)
        assert channel._size(queue) == 0
        assert drained.groups_kept == ['celery'] and r.xinfo_groups(keys.stream(queue))


def test_cli_sets_and_lists(run, r, redis_server, keys, prefix, queue):
    url = streams_url(redis_server)
    result = run('--broker', url, 'streams', 'shards', 'set', queue, '3', '--prefix', prefix)
    assert result.exit_code == 0, result.output
    assert shards.read(r, keys)[queue].number == 3
    result = run('--broker', url, 'streams', 'shards', 'list', '--json', '--prefix', prefix)
    assert result.exit_code == 0, result.output
    [shown] = json.loads(result.output)
    assert (shown['queue'], shown['count'], [s['name'] for s in shown['shards']]) == (
        queue, 3, [queue, queue + '{1', queue + '{2'])
    with conn_of(redis_server, prefix) as conn:
        producer = Producer(conn)
        for n in range(3):
            producer.publish({'n': n}, routing_key=queue, declare=[Queue(queue)])
    result = run('--broker', url, 'streams', 'status', '-v', '-Q', queue, '--prefix', prefix)
    assert result.exit_code == 0, result.output
    assert 'shard %s{1: ready 1, unacked 0' % queue in result.output, result.output
    result = run('--broker', url, 'streams', 'shards', 'list', '--prefix', prefix)
    assert result.exit_code == 0 and '%s{1' % queue in result.output, result.output
    result = run('--broker', url, 'streams', 'shards', 'set', queue, '0', '--prefix', prefix)
    assert result.exit_code != 0 and 'from 1 to' in result.output
    result = run('--broker', url, 'streams', 'shards', 'set', queue, '2', '--prefix', prefix)
    assert result.exit_code == 0 and shards.read(r, keys)[queue] == shards.Placement(
        2, (queue, queue + '{1', queue + '{2'))


def test_queue_rate_limit_holds_over_every_shard(redis_server, r, keys, prefix, queue):
    """``queue:Q`` paces what is read from every shard of Q, not from shard 0 alone."""
    placement = shards.set_count(r, keys, queue, 3)
    with conn_of(redis_server, prefix, rate_limits={'queue:' + queue: '10/s'}) as conn:
        producer = Producer(conn)
        for n in range(9):
            producer.publish({'n': n}, routing_key=queue, declare=[Queue(queue)],
                             headers={'task': 'demo', 'id': 'r%d' % n})
        assert lengths(r, keys, placement.names) == [3, 3, 3]
        start = time.monotonic()
        got = consume_all(conn, Queue(queue), 9)
        took = time.monotonic() - start
    assert sorted(m.payload['n'] for m in got) == list(range(9))
    assert took > 0.65   # 9 starts at 10/s over all shards; shard 0 alone: 3 in 0.2 s


def test_an_acl_user_of_the_transport_shards(redis_server, r, keys, prefix, queue, unique_name):
    """``keys.acl_rules`` allow what sharding sends: the option written (a ``WATCH``ed
    transaction), publishes to every shard, consuming them."""
    r.execute_command('ACL', 'SETUSER', unique_name, 'reset', 'on', '>pw-' + unique_name,
                      *acl_rules(prefix))
    url = 'redis-streams://%s:pw-%s@127.0.0.1:%d/0' % (unique_name, unique_name, redis_server.port)
    try:
        with Connection(url, transport_options={'global_keyprefix': prefix,
                                                'sharded_queues': {queue: 3}}) as conn:
            with conn.Consumer([Queue(queue)], callbacks=[]):
                pass
            assert shards.read(r, keys)[queue].number == 3
            with Connection(url, transport_options={'global_keyprefix': prefix}) as client:
                producer = Producer(client)
                for n in range(6):
                    producer.publish({'n': n}, routing_key=queue)
            got = consume_all(conn, Queue(queue), 6)
        assert sorted(m.payload['n'] for m in got) == list(range(6))
        assert len({m.delivery_tag.rsplit('/', 1)[1] for m in got}) == 3
    finally:
        r.execute_command('ACL', 'DELUSER', unique_name)


def test_a_uniqueness_key_stays_unique_over_the_shards(redis_server, r, keys, prefix, queue):
    """A message with a uniqueness key goes to the shard of its key: a duplicate published
    next (round robin would pick another shard) is dropped; the listing names the queue."""
    placement = shards.set_count(r, keys, queue, 3)
    with conn_of(redis_server, prefix) as conn:
        producer = Producer(conn)
        for n in range(4):
            producer.publish({'n': n}, routing_key=queue, declare=[Queue(queue)],
                             headers={'task': 'demo', 'id': 'u%d' % n, 'unique_key': 'same'})
    assert sum(lengths(r, keys, placement.names)) == 1
    [held] = admin.unique_keys(r, global_keyprefix=prefix, queues=[queue])
    assert (held.queue, held.key, held.task_id) == (queue, 'same', 'u0')


HOLDER = '''
import sys, time, celery_streams
from kombu import Connection, Queue
url, prefix, queue = sys.argv[1], sys.argv[2], sys.argv[3]
conn = Connection(url, transport_options={'global_keyprefix': prefix, 'visibility_timeout': 1.0})
got = []
with conn.Consumer([Queue(queue)], callbacks=[lambda b, m: got.append(m)]):
    while len(got) < 6:
        conn.drain_events(timeout=10)
print('holding', len(got), sorted({m.delivery_tag.rsplit('/', 1)[1] for m in got}), flush=True)
time.sleep(600)
'''


def test_a_killed_consumers_messages_are_reclaimed_from_every_shard(redis_server, r, keys, prefix,
                                                                    queue):
    placement = shards.set_count(r, keys, queue, 3)
    with conn_of(redis_server, prefix, visibility_timeout=1.0) as conn:
        producer = Producer(conn)
        for n in range(6):
            producer.publish({'n': n}, routing_key=queue, declare=[Queue(queue)])
        child = subprocess.Popen([sys.executable, '-c', HOLDER, streams_url(redis_server), prefix,
                                  queue], stdout=subprocess.PIPE, text=True)
        try:
            line = child.stdout.readline()
            assert line.startswith('holding 6') and all(name in line for name in placement.names)
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
        got = consume_all(conn, Queue(queue), 6, timeout=15)
    assert sorted(m.payload['n'] for m in got) == list(range(6))
    assert all(m.delivery_info['redelivered'] for m in got)
    assert {m.delivery_tag.rsplit('/', 1)[1] for m in got} == set(placement.names)
    assert all(r.xpending(keys.stream(name), 'celery')['pending'] == 0 for name in placement.names)


def test_basic_get_and_delete_see_every_shard(redis_server, r, keys, prefix, queue):
    """``Queue.get()`` (kombu's ``basic_get``) takes the messages of every shard, and deleting
    the queue deletes every shard's keys."""
    placement = shards.set_count(r, keys, queue, 3)
    with conn_of(redis_server, prefix) as conn:
        bound = Queue(queue)(conn.default_channel)
        bound.declare()
        producer = Producer(conn)
        for n in range(6):
            producer.publish({'n': n}, routing_key=queue)
        assert lengths(r, keys, placement.names) == [2, 2, 2]
        got = []
        while (message := bound.get()) is not None:
            got.append(message.payload['n'])
            message.ack()
        assert sorted(got) == list(range(6)), 'basic_get read only some shards'
        producer.publish({'n': 6}, routing_key=queue)
        bound.delete()
    assert [r.exists(keys.stream(name)) for name in placement.names] == [0, 0, 0]
