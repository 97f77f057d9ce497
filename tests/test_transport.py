"""Kombu-level contract of the transport, on every server of the matrix.

Each test uses its own key prefix (``unique_name``), so no test sees another's
keys and no test needs FLUSHALL.
"""
from __future__ import annotations

import logging
import socket

import pytest
import redis
from kombu import Connection, Consumer, Exchange, Producer, Queue
from kombu.asynchronous import Hub

import celery_streams
from celery_streams import errors
from celery_streams.keys import acl_rules
# publish and streams_url are imported from here by other modules too
from tests.helpers import connection, delete_keys, drain_all, publish, streams_url, wait_until


@pytest.fixture
def conn(redis_server, prefix):
    with connection(redis_server, prefix) as c:
        yield c


def test_url_alias_selects_the_transport(conn):
    assert celery_streams.TRANSPORT.endswith('transport:Transport')
    assert type(conn.transport).__module__ == 'celery_streams.transport'
    assert conn.transport.driver_type == 'redis'
    assert 'fanout' in conn.transport.implements.exchange_type
    assert conn.transport.implements.asynchronous


def test_broker_transport_setting_with_plain_redis_url(redis_server, prefix, r, keys):
    with Connection(redis_server.url, transport='celery_streams.transport:Transport',
                    transport_options={'global_keyprefix': prefix}) as c:
        q = Queue('plain', Exchange('plain'), 'plain')
        publish(c, q.exchange, 'plain', [{'n': 1}], declare=[q])
        assert r.xlen(keys.stream('plain')) == 1


def test_publish_consume_ack(conn, r, keys):
    q = Queue('work', Exchange('work'), 'work')
    publish(conn, q.exchange, 'work', [{'n': i} for i in range(10)], declare=[q])
    got = drain_all(conn, [q], 10)
    assert [body['n'] for body, _ in got] == list(range(10))
    # acked entries are deleted and nothing stays pending
    assert r.xlen(keys.stream('work')) == 0
    assert r.xpending(keys.stream('work'), 'celery')['pending'] == 0
    tags = {message.delivery_tag for _, message in got}
    assert len(tags) == 10


def test_reject_requeue_marks_redelivered_and_reject_drops(conn, r, keys):
    q = Queue('rej', Exchange('rej'), 'rej')
    publish(conn, q.exchange, 'rej', [{'n': 1}], declare=[q])
    channel = conn.default_channel
    first = q(channel).get()
    assert not first.delivery_info.get('redelivered')
    first.requeue()
    second = q(channel).get()
    assert second.payload == {'n': 1}
    assert second.delivery_info['redelivered'] is True
    second.reject()
    assert q(channel).get() is None
    assert r.xlen(keys.stream('rej')) == 0
    assert r.xpending(keys.stream('rej'), 'celery')['pending'] == 0


def test_size_purge_keeps_group(conn, r, keys):
    q = Queue('pq', Exchange('pq'), 'pq')
    publish(conn, q.exchange, 'pq', [{'n': i} for i in range(7)], declare=[q])
    channel = conn.default_channel
    pending = q(channel).get()            # one in flight, unacked
    assert pending is not None
    assert q(channel).queue_declare(passive=True).message_count == 6
    groups_before = [g['name'] for g in r.xinfo_groups(keys.stream('pq'))]
    assert q(channel).purge() == 7
    assert [g['name'] for g in r.xinfo_groups(keys.stream('pq'))] == groups_before
    assert r.xlen(keys.stream('pq')) == 0
    assert r.xpending(keys.stream('pq'), 'celery')['pending'] == 0
    # the purged in-flight message never comes back, not even when its channel closes
    conn.default_channel.close()
    assert r.xlen(keys.stream('pq')) == 0


def test_delete_queue_removes_stream_and_binding(conn, r, keys):
    q = Queue('gone', Exchange('gone'), 'gone')
    publish(conn, q.exchange, 'gone', [{'n': 1}], declare=[q])
    q(conn.default_channel).delete()
    assert not r.exists(keys.stream('gone'))
    assert not r.smembers(keys.bindings('gone'))
    assert not q(conn.default_channel).queue_declare(passive=False).message_count


def test_passive_declare_of_missing_queue_fails(conn):
    from amqp import ChannelError as AmqpChannelError  # kombu raises its own ChannelError
    from kombu.exceptions import ChannelError
    with pytest.raises((ChannelError, AmqpChannelError)):
        Queue('nope')(conn.default_channel).queue_declare(passive=True)


def test_topic_routing(conn):
    ex = Exchange('topics', 'topic')
    a = Queue('t-a', ex, routing_key='a.*')
    b = Queue('t-b', ex, routing_key='#.b')
    for queue in (a, b):
        queue(conn.default_channel).declare()
    publish(conn, ex, 'a.x', [{'to': 'a'}])
    publish(conn, ex, 'y.b', [{'to': 'b'}])
    publish(conn, ex, 'a.b', [{'to': 'both'}])
    assert sorted(m['to'] for m, _ in drain_all(conn, [a], 2)) == ['a', 'both']
    assert sorted(m['to'] for m, _ in drain_all(conn, [b], 2)) == ['b', 'both']


def test_routing_is_shared_across_processes(redis_server, prefix, conn):
    """A publisher that never declared the queue finds the binding in Redis."""
    ex = Exchange('shared', 'direct')
    q = Queue('shared-q', ex, routing_key='k')
    q(conn.default_channel).declare()
    with connection(redis_server, prefix) as other:
        publish(other, ex, 'k', [{'from': 'other'}], declare=[ex])
    assert drain_all(conn, [q], 1)[0][0] == {'from': 'other'}


def test_fanout_copies_to_every_bound_queue_with_own_tags(conn, r, keys):
    ex = Exchange('bcast', 'fanout')
    queues = [Queue('fan-%d' % i, ex) for i in range(3)]
    for queue in queues:
        queue(conn.default_channel).declare()
    publish(conn, ex, '', [{'hello': 'all'}])
    tags = set()
    for queue in queues:
        (body, message), = drain_all(conn, [queue], 1)
        assert body == {'hello': 'all'}
        tags.add(message.delivery_tag)
    assert len(tags) == 3
    assert r.hget(keys.queues, 'fan-0') == b'fanout'


def test_fanout_streams_are_bounded(redis_server, prefix, r, keys):
    with connection(redis_server, prefix, fanout_maxlen=50) as c:
        ex = Exchange('bounded', 'fanout')
        q = Queue('bounded-q', ex)
        q(c.default_channel).declare()
        publish(c, ex, '', [{'n': i} for i in range(1000)])
    assert r.xlen(keys.stream('bounded-q')) < 250   # MAXLEN ~ trims in whole nodes


def test_several_queues_and_prefetch_limit_over_streams(conn, r, keys):
    queues = [Queue('multi-%d' % i, Exchange('multi'), 'multi-%d' % i) for i in range(3)]
    for queue in queues:
        publish(conn, queue.exchange, queue.routing_key, [{'q': queue.name}] * 10, declare=[queue])
    got = []
    channel = conn.channel()
    channel.basic_qos(0, 4, False)
    consumer = Consumer(channel, queues, callbacks=[lambda body, message: got.append(message)])
    consumer.consume()
    for _ in range(5):
        try:
            conn.drain_events(timeout=0.3)
        except socket.timeout:
            pass
    # never more in flight than the prefetch window, though 30 are waiting
    assert len(got) == 4
    pending = sum(r.xpending(keys.stream(q.name), 'celery')['pending'] for q in queues)
    assert pending == 4
    for message in got:
        message.ack()
    while len(got) < 30:
        conn.drain_events(timeout=2)
        for message in got:
            if not message.acknowledged:
                message.ack()
    assert {m.payload['q'] for m in got} == {q.name for q in queues}
    consumer.cancel()
    channel.close()


def test_no_ack_consumer_leaves_nothing_pending(conn, r, keys):
    q = Queue('noack', Exchange('noack'), 'noack')
    publish(conn, q.exchange, 'noack', [{'n': i} for i in range(5)], declare=[q])
    drain_all(conn, [q], 5, no_ack=True)
    assert r.xpending(keys.stream('noack'), 'celery')['pending'] == 0
    assert r.xlen(keys.stream('noack')) == 0


def test_unacked_messages_are_restored_when_the_channel_closes(redis_server, prefix, r, keys):
    q = Queue('restore', Exchange('restore'), 'restore')
    with connection(redis_server, prefix) as c:
        publish(c, q.exchange, 'restore', [{'n': i} for i in range(4)], declare=[q])
        got = drain_all(c, [q], 4, ack=False)
        got[0][1].ack()
    # three come back, marked redelivered; the acked one does not
    with connection(redis_server, prefix) as c:
        again = drain_all(c, [q], 3)
        assert sorted(body['n'] for body, _ in again) == [1, 2, 3]
        assert all(m.delivery_info['redelivered'] for _, m in again)
    assert r.xlen(keys.stream('restore')) == 0


def test_hub_path_reads_without_blocking(conn, r, keys):
    """The event-loop path: XREADGROUP sent on tick, parsed when readable."""
    q = Queue('hubq', Exchange('hubq'), 'hubq')
    publish(conn, q.exchange, 'hubq', [{'n': i} for i in range(20)], declare=[q])
    hub = Hub()
    got = []
    try:
        conn.register_with_event_loop(hub)
        with Consumer(conn, [q], callbacks=[lambda b, m: (got.append(b), m.ack())]):
            for _ in range(200):
                if len(got) == 20:
                    break
                hub.run_once()
    finally:
        hub.close()
    assert [b['n'] for b in got] == list(range(20))
    assert r.xpending(keys.stream('hubq'), 'celery')['pending'] == 0


@pytest.mark.parametrize('vanish', ['destroy_group', 'delete_stream'])
def test_consumer_heals_when_group_or_stream_vanishes(conn, r, keys, vanish, caplog):
    q = Queue('heal', Exchange('heal'), 'heal')
    publish(conn, q.exchange, 'heal', [{'n': 0}], declare=[q])
    got = []
    with Consumer(conn, [q], callbacks=[lambda b, m: (got.append(b), m.ack())]):
        conn.drain_events(timeout=5)
        if vanish == 'destroy_group':
            r.xgroup_destroy(keys.stream('heal'), 'celery')
        else:
            r.delete(keys.stream('heal'))
        assert not r.exists(keys.stream('heal')) or not r.xinfo_groups(keys.stream('heal'))
        # published while the group is gone: must not be skipped
        publish(conn, q.exchange, 'heal', [{'n': 1}, {'n': 2}])
        with caplog.at_level(logging.INFO, logger='celery_streams'):
            while len(got) < 3:
                conn.drain_events(timeout=5)
    assert [b['n'] for b in got] == [0, 1, 2]
    assert [g['name'] for g in r.xinfo_groups(keys.stream('heal'))] == [b'celery']
    assert any("re-created it at id 0" in rec.getMessage() for rec in caplog.records)


def test_bindings_heal_from_own_declarations(conn, r, keys, prefix):
    ex = Exchange('rebind', 'direct')
    q = Queue('rebind-q', ex, routing_key='rk')
    q(conn.default_channel).declare()
    delete_keys(r, prefix)
    publish(conn, ex, 'rk', [{'after': 'nuke'}])
    assert r.smembers(keys.bindings('rebind'))
    assert drain_all(conn, [q], 1)[0][0] == {'after': 'nuke'}


def test_malformed_entries_are_dead_lettered_and_good_ones_delivered(conn, r, keys):
    q = Queue('junk', Exchange('junk'), 'junk')
    publish(conn, q.exchange, 'junk', [{'n': 1}], declare=[q])
    key = keys.stream('junk')
    r.xadd(key, {'payload': b'not json'})
    r.xadd(key, {'other': b'field'})
    r.xadd(key, {'payload': b'\xff\xfe\x00binary'})
    r.xadd(key, {'payload': b'{"no": "properties"}'})
    publish(conn, q.exchange, 'junk', [{'n': 2}])
    got = drain_all(conn, [q], 2)
    assert [b['n'] for b, _ in got] == [1, 2]
    assert r.xlen(keys.dead_letters('junk')) == 4
    assert r.xlen(key) == 0
    reasons = [fields[b'reason'] for _, fields in r.xrange(keys.dead_letters('junk'))]
    assert all(reason.startswith(b'undecodable entry') for reason in reasons)


def test_every_key_carries_the_global_prefix(conn, r, prefix):
    ex = Exchange('pfx', 'topic')
    q = Queue('pfx-q', ex, routing_key='x.#')
    publish(conn, ex, 'x.y', [{'n': 1}], declare=[q])
    drain_all(conn, [q], 1)
    written = [k.decode() for k in r.scan_iter(match='*' + prefix.rstrip(':') + '*')]
    assert written and all(k.startswith(prefix + 'celery-streams:') for k in written)


def test_kombu_option_without_meaning_warns_once(redis_server, prefix, caplog):
    with caplog.at_level(logging.WARNING, logger='celery_streams'):
        with connection(redis_server, prefix, ack_emulation=True) as c:
            c.connect()
            c.channel().close()
    assert sum('ack_emulation' in rec.getMessage() for rec in caplog.records) == 1


def test_wrong_password_is_one_clear_line(fresh_redis_server):
    server = fresh_redis_server(password='s3cret-pass')
    url = 'redis-streams://:wrong-pass@127.0.0.1:%d/0' % server.port
    with pytest.raises(errors.ConfigurationError) as info:
        Connection(url).connect()
    text = str(info.value)
    assert 'credentials' in text or 'refused' in text
    assert 'wrong-pass' not in text and '\n' not in text


def test_out_of_memory_publish_is_a_clear_error_and_consumers_still_drain(fresh_redis_server):
    server = fresh_redis_server(extra_args=('--maxmemory', '2mb', '--maxmemory-policy', 'noeviction'))
    with Connection(streams_url(server)) as c:
        q = Queue('oom', Exchange('oom'), 'oom')
        producer = Producer(c.default_channel)
        published = 0
        with pytest.raises(errors.OutOfMemory, match='NOT published'):
            for _ in range(100):
                producer.publish('x' * 100_000, exchange='', routing_key='oom', declare=[q])
                published += 1
        # reads, acks and deletes still work on a full server, and free it
        assert len(drain_all(c, [q], published)) == published
        producer.publish('after', exchange='', routing_key='oom')
        assert drain_all(c, [q], 1)[0][0] == 'after'


def test_eviction_policy_warning(fresh_redis_server, caplog):
    server = fresh_redis_server(extra_args=('--maxmemory', '100mb', '--maxmemory-policy', 'allkeys-lru'))
    with caplog.at_level(logging.WARNING, logger='celery_streams'):
        with Connection(streams_url(server)) as c:
            c.connect()
            assert c.default_channel
    assert any('allkeys-lru' in rec.getMessage() for rec in caplog.records)


def test_tls_through_the_rediss_alias(tls_redis_server, unique_name):
    url = 'rediss-streams://127.0.0.1:%d/0?ssl_cert_reqs=required&ssl_ca_certs=%s' % (
        tls_redis_server.port, tls_redis_server.tls.ca_cert)
    with Connection(url, transport_options={'global_keyprefix': unique_name}) as c:
        q = Queue('tls', Exchange('tls'), 'tls')
        publish(c, q.exchange, 'tls', [{'secure': True}], declare=[q])
        assert drain_all(c, [q], 1)[0][0] == {'secure': True}


def test_tls_through_broker_use_ssl(tls_redis_server, unique_name):
    with Connection('redis://127.0.0.1:%d/0' % tls_redis_server.port,
                    transport='celery_streams.transport:Transport',
                    ssl={'ssl_cert_reqs': 'required', 'ssl_ca_certs': tls_redis_server.tls.ca_cert},
                    transport_options={'global_keyprefix': unique_name}) as c:
        q = Queue('tls2', Exchange('tls2'), 'tls2')
        publish(c, q.exchange, 'tls2', [{'secure': 2}], declare=[q])
        assert drain_all(c, [q], 1)[0][0] == {'secure': 2}


def test_acl_user_limited_to_the_transport_keys(redis_server, unique_name, r):
    prefix = unique_name + ':'
    r.execute_command('ACL', 'SETUSER', unique_name, 'reset', 'on', '>pw-' + unique_name,
                      *acl_rules(prefix))
    url = 'redis-streams://%s:pw-%s@127.0.0.1:%d/0' % (unique_name, unique_name, redis_server.port)
    with Connection(url, transport_options={'global_keyprefix': prefix}) as c:
        q = Queue('acl', Exchange('acl'), 'acl')
        publish(c, q.exchange, 'acl', [{'n': i} for i in range(3)], declare=[q])
        got = drain_all(c, [q], 3)
        assert len(got) == 3
        got2 = None
        publish(c, q.exchange, 'acl', [{'n': 9}])
        got2 = drain_all(c, [q], 1, ack=False)
        assert q(c.default_channel).purge() == 1
        assert got2
    with pytest.raises(redis.exceptions.NoPermissionError):
        redis.Redis(port=redis_server.port, username=unique_name,
                    password='pw-' + unique_name).set('outside', 1)


def test_producer_batch_publishes_in_one_pipeline(conn, r, keys):
    q = Queue('batched', Exchange('batched'), 'batched')
    q(conn.default_channel).declare()
    producer = Producer(conn.default_channel)
    with producer.batch(max_size=100):
        for i in range(250):
            producer.publish({'n': i}, exchange='', routing_key='batched')
        assert r.xlen(keys.stream('batched')) == 200   # two full batches flushed, 50 buffered
    assert r.xlen(keys.stream('batched')) == 250
    assert [b['n'] for b, _ in drain_all(conn, [q], 250)] == list(range(250))


def publish_with_priorities(conn, queue, priorities):
    producer = Producer(conn.default_channel)
    queue(conn.default_channel).declare()
    for n, priority in enumerate(priorities):
        producer.publish({'n': n, 'priority': priority}, exchange='', routing_key=queue.name,
                         priority=priority)


def consume_one_at_a_time(conn, queue, count):
    channel = conn.channel()
    channel.basic_qos(0, 1, False)
    got = []
    with Consumer(channel, [queue], callbacks=[lambda b, m: (got.append(b), m.ack())]):
        while len(got) < count:
            conn.drain_events(timeout=5)
    channel.close()
    return got


def test_priorities_follow_kombu_redis_semantics(conn, r, keys):
    """Lower number first; no priority counts as 0; a backlog never hides a higher one."""
    q = Queue('prio', Exchange('prio'), 'prio')
    publish_with_priorities(conn, q, [9] * 30 + [5, None, 0])
    got = consume_one_at_a_time(conn, q, 33)
    assert [m['priority'] for m in got[:2]] == [None, 0]
    assert got[2]['priority'] == 5
    assert all(m['priority'] == 9 for m in got[3:])
    assert r.exists(keys.stream('prio', 9)) and r.exists(keys.stream('prio', 3))


def test_rabbitmq_priority_semantics_option(redis_server, prefix):
    with connection(redis_server, prefix, priority_semantics='rabbitmq') as c:
        q = Queue('rprio', Exchange('rprio'), 'rprio')
        publish_with_priorities(c, q, [0] * 10 + [9, 4])
        got = consume_one_at_a_time(c, q, 12)
    assert [m['priority'] for m in got[:2]] == [9, 4]


def test_basic_get_takes_the_highest_priority(conn):
    q = Queue('gprio', Exchange('gprio'), 'gprio')
    publish_with_priorities(conn, q, [9, 9, 0])
    message = q(conn.default_channel).get()
    assert message.payload['priority'] == 0
    message.ack()
    assert q(conn.default_channel).queue_declare(passive=True).message_count == 2


def test_replies_to_a_deleted_queue_do_not_recreate_it(redis_server, prefix, r, keys):
    """A binding written by another process to a queue that is gone is stale: drop it."""
    ex = Exchange('replies', 'direct')
    q = Queue('client-reply', ex, routing_key='client-reply')
    with connection(redis_server, prefix) as client:
        q(client.default_channel).declare()
        r.delete(*keys.streams('client-reply'))   # the client's reply queue expired
        with connection(redis_server, prefix) as worker:
            publish(worker, ex, 'client-reply', [{'reply': 1}], declare=[ex])
    assert not r.exists(keys.stream('client-reply'))
    assert not r.smembers(keys.bindings('replies'))


def test_list_bindings_shows_bindings_of_other_processes(redis_server, prefix, conn):
    ex = Exchange('listed', 'topic')
    Queue('listed-q', ex, routing_key='a.#')(conn.default_channel).declare()
    with connection(redis_server, prefix) as other:
        bindings = set(other.default_channel.list_bindings())
    assert ('listed-q', 'listed', 'a.#') in bindings


def test_a_closed_consumer_leaves_its_groups(redis_server, prefix, r, keys):
    q = Queue('leave', Exchange('leave'), 'leave')
    for _ in range(3):
        with connection(redis_server, prefix) as c:
            publish(c, q.exchange, 'leave', [{'n': 1}], declare=[q])
            drain_all(c, [q], 1)
    assert r.xinfo_consumers(keys.stream('leave'), 'celery') == []


def test_queue_names_with_braces_are_refused_in_one_line(conn):
    with pytest.raises(errors.ConfigurationError, match='braces'):
        Queue('bad}:p3')(conn.default_channel).declare()


@pytest.mark.parametrize('binding_key,routing_key,expected', [
    ('a-1.*', 'a-1.x', True), ('a-1.*', 'a-1.x.y', False), ('a%.#', 'a%.x.y', True),
    ('#', 'anything.at.all', True), ('*.b', 'a.b', True), ('*.b', 'b', False),
    ('a.#', 'a', False), ('[x].y', '[x].y', True), ('[x].y', 'x.y', False),
])
def test_topic_matching_in_redis_agrees_with_kombu(conn, binding_key, routing_key, expected):
    from kombu.transport.virtual.exchange import TopicExchange
    pattern = TopicExchange(None).key_to_pattern(binding_key)
    assert bool(TopicExchange(None)._match(pattern, routing_key)) is expected
    ex = Exchange('tm', 'topic')
    q = Queue('tm-q', ex, routing_key=binding_key)
    q(conn.default_channel).declare()
    publish(conn, ex, routing_key, [{'k': routing_key}])
    size = q(conn.default_channel).queue_declare(passive=True).message_count
    q(conn.default_channel).delete()
    assert size == (1 if expected else 0)


def test_expired_queues_leave_the_registry(conn, r, keys):
    q = Queue('short-lived', Exchange('short-lived'), 'short-lived', expires=0.2)
    q(conn.default_channel).declare()
    assert r.hexists(keys.queues, 'short-lived')
    # x-expires fires: the stream and its group go (EXISTS expires a key due at once)
    wait_until(lambda: not r.exists(keys.stream('short-lived')), timeout=2, interval=0.02)
    assert conn.default_channel.prune_registry() >= 1
    assert not r.hexists(keys.queues, 'short-lived')


def test_scripts_survive_script_flush(conn, r):
    """Every script the transport sends by SHA is loaded again after SCRIPT FLUSH (or a restart)."""
    ex = Exchange('flushed', 'direct')
    q = Queue('flushed-q', ex, routing_key='k')
    publish(conn, ex, 'k', [{'n': 1}], declare=[q])
    assert drain_all(conn, [q], 1)[0][0] == {'n': 1}
    r.script_flush()
    publish(conn, ex, 'k', [{'n': 2}, {'n': 3}])           # route.lua
    assert drain_all(conn, [q], 1)[0][0] == {'n': 2}      # read.lua
    r.script_flush()
    message = q(conn.default_channel).get()                # read.lua through basic_get
    assert message.payload == {'n': 3}
    message.requeue()                                      # restore.lua (redis-py Script)
    r.script_flush()
    assert q(conn.default_channel).purge() == 1            # drain.lua
    r.script_flush()
    producer = Producer(conn.default_channel)
    with producer.batch(max_size=10):                      # route.lua in a batch, sent again
        for n in range(4, 7):
            producer.publish({'n': n}, exchange=ex, routing_key='k')
    assert [b['n'] for b, _ in drain_all(conn, [q], 3)] == [4, 5, 6]


def test_producer_batch_through_an_exchange_routes_in_redis(conn, r, keys, prefix):
    ex = Exchange('batchex', 'topic')
    q = Queue('batchex-q', ex, routing_key='a.#')
    q(conn.default_channel).declare()
    producer = Producer(conn.default_channel)
    with producer.batch(max_size=50):
        for i in range(120):
            producer.publish({'n': i}, exchange=ex, routing_key='a.b')
    assert [b['n'] for b, _ in drain_all(conn, [q], 120)] == list(range(120))
    # after a nuke the bindings are gone: the batch restores them at flush
    delete_keys(r, prefix)
    with producer.batch(max_size=50):
        producer.publish({'after': 'nuke'}, exchange=ex, routing_key='a.b')
    assert r.smembers(keys.bindings('batchex'))
    assert drain_all(conn, [q], 1)[0][0] == {'after': 'nuke'}


def test_a_declaration_counts_the_waiting_messages_like_a_passive_one(conn, keys):
    """The declaration and its count go in one write: priority buckets counted, a message in
    flight not."""
    q = Queue('dc', Exchange('dc'), 'dc')
    publish(conn, q.exchange, 'dc', [{'n': i} for i in range(5)], declare=[q])
    Producer(conn.default_channel).publish({'n': 'urgent'}, exchange=q.exchange, routing_key='dc',
                                           priority=9)
    assert q(conn.default_channel).get() is not None     # one in flight, unacked
    passive = q(conn.default_channel).queue_declare(passive=True).message_count
    assert q(conn.default_channel).queue_declare(passive=False).message_count == passive == 5


def test_liveness_follows_each_consumed_queue_and_a_cancel_spares_what_is_held(conn, r, keys):
    """Liveness keys are written for each queue a consumer takes on, also one added later; a
    cancel ends the liveness of a queue it holds nothing of, and keeps the one it holds a
    message of (else another worker could take that message over while it runs)."""
    held, idle, later = (Queue(n, Exchange(n), n) for n in ('lh', 'li', 'll'))
    publish(conn, held.exchange, 'lh', [{'n': 1}], declare=[held, idle, later])
    channel = conn.channel()
    got = []
    consumer = Consumer(channel, [held, idle], callbacks=[lambda body, m: got.append(m)])
    consumer.consume()
    while not got:
        conn.drain_events(timeout=5)

    def alive(queue):
        return r.exists(keys.alive(queue, channel.consumer_name)) == 1

    assert alive('lh') and alive('li')
    consumer.add_queue(later)
    consumer.consume()
    publish(conn, later.exchange, 'll', [{'n': 2}])
    while len(got) < 2:
        conn.drain_events(timeout=5)
    got[1].ack()
    assert alive('ll')
    consumer.cancel_by_queue('lh')
    consumer.cancel_by_queue('li')
    assert alive('lh'), 'the liveness of a queue whose message is still held ended'
    assert not alive('li')
    got[0].ack()
    consumer.cancel()
    channel.close()
