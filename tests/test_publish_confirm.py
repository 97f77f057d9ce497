"""``publish_confirm='later'``: a publish returns once written; Redis' reply is read later.

What must hold all the same (docs/guarantees.md, "Publishing"):

* every message whose publish returned reaches Redis once the replies are
  read: at the channel's close, at the process' exit (also one that never
  closes its connection), after a window of replies;
* a connection that drops before Redis ran them gets them written again;
* a ``NOSCRIPT`` (a restart, ``SCRIPT FLUSH``) gets them written again;
* a message Redis refuses is logged, and the others go on;
* a forked child never writes its parent's messages again.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest
from kombu import Consumer, Exchange, Producer, Queue

from celery_streams.errors import ConfigurationError
from celery_streams.options import Options
from celery_streams.publisher import CONFIRM_WINDOW
from tests.helpers import connection, drop_connection, streams_url

pytestmark = pytest.mark.timeout(60)

LATER = {'publish_confirm': 'later'}


def queue(name):
    return Queue(name, Exchange(name), name)


def producer_of(conn, q, count=0):
    """A producer on ``conn``'s default channel, ``q`` declared, bodies ``0..count-1`` published
    through its exchange."""
    producer = Producer(conn.default_channel)
    q(conn.default_channel).declare()
    for i in range(count):
        producer.publish(i, exchange=q.exchange, routing_key=q.name)
    return producer


def bodies_in(r, keys, name):
    """The bodies in the queue's main stream, in stream order."""
    return [json.loads(json.loads(fields[b'payload'])['body'])
            for _, fields in r.xrange(keys.stream(name))]


def test_every_message_is_in_redis_once_the_channel_closes(redis_server, prefix, unique_name, r, keys):
    """More than a window of publishes, through the queue's exchange, the default
    exchange and a batch: each in Redis once, in order."""
    q = queue(unique_name)
    count = CONFIRM_WINDOW * 2 + 100
    with connection(redis_server, prefix, **LATER) as conn:
        producer = Producer(conn.default_channel)
        q(conn.default_channel).declare()
        for i in range(count):
            producer.publish(i, exchange=q.exchange, routing_key=unique_name, serializer='json')
        for i in range(count, count + 100):
            producer.publish(i, exchange='', routing_key=unique_name, serializer='json')
        with producer.batch(max_size=30):
            for i in range(count + 100, count + 200):
                producer.publish(i, exchange=q.exchange, routing_key=unique_name, serializer='json')
        publisher = conn.default_channel.publisher
        assert publisher.pipe.unconfirmed > 0, 'every publish waited: not confirmed later'
    assert bodies_in(r, keys, unique_name) == list(range(count + 200))


def test_a_process_that_exits_without_closing_loses_nothing(redis_server, prefix, unique_name, r, keys):
    """A script publishes with Celery and exits: its last messages were written, not yet
    confirmed, and its connection never closed."""
    script = textwrap.dedent('''
        import os, sys
        import celery_streams
        from celery import Celery
        from kombu import Exchange, Queue
        app = Celery(broker=sys.argv[1], set_as_current=False)
        app.conf.broker_transport_options = {'global_keyprefix': sys.argv[2],
                                             'publish_confirm': 'later'}
        name = sys.argv[3]
        with app.connection_for_write() as conn:
            Queue(name, Exchange(name), name)(conn.default_channel).declare()
        for i in range(3000):
            app.send_task('t.noop', args=(i,), queue=name)
        sys.exit(0)
    ''')
    done = subprocess.run([sys.executable, '-c', script, streams_url(redis_server), prefix, unique_name],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    entries = r.xrange(keys.stream(unique_name))
    args = [json.loads(json.loads(fields[b'payload'])['body'])[0][0] for _, fields in entries]
    assert args == list(range(3000))


def test_a_running_consumer_gets_everything_another_process_confirms_later(
        redis_server, prefix, unique_name, r, keys):
    """The consumer is already reading (blocked) when another process publishes 2,500
    messages with ``'later'`` and exits: every one arrives, once."""
    q = queue(unique_name)
    script = textwrap.dedent('''
        import sys
        import celery_streams
        from kombu import Connection, Exchange, Producer, Queue
        name = sys.argv[3]
        q = Queue(name, Exchange(name), name)
        conn = Connection(sys.argv[1], transport_options={'global_keyprefix': sys.argv[2],
                                                          'publish_confirm': 'later'})
        producer = Producer(conn.default_channel)
        for i in range(2500):
            producer.publish(i, exchange=q.exchange, routing_key=name, declare=[q])
    ''')
    got = []
    with connection(redis_server, prefix) as conn:
        with Consumer(conn.channel(), [q], callbacks=[lambda body, m: (got.append(body), m.ack())]):
            try:
                conn.drain_events(timeout=0.3)   # the read is out, blocked on an empty queue
            except socket.timeout:
                pass
            done = subprocess.run([sys.executable, '-c', script, streams_url(redis_server), prefix,
                                   unique_name], capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, done.stderr[-2000:]
            deadline = time.monotonic() + 20
            while len(got) < 2500 and time.monotonic() < deadline:
                try:
                    conn.drain_events(timeout=1)
                except socket.timeout:
                    pass
    assert sorted(got) == list(range(2500))


def test_unconfirmed_messages_are_written_again_when_the_connection_drops(
        redis_server, prefix, unique_name, r, keys):
    """Redis holds the writes back (``CLIENT PAUSE ... WRITE``), the connection drops:
    the next publish writes them again, and each is in Redis once."""
    q = queue(unique_name)
    with connection(redis_server, prefix, **LATER) as conn:
        producer = producer_of(conn, q)
        pipe = conn.default_channel.publisher.pipe
        r.client_pause(5000, all=False)
        try:
            for i in range(50):
                producer.publish(i, exchange=q.exchange, routing_key=unique_name)
            assert pipe.unconfirmed == 50
            drop_connection(r, pipe.dispatcher._connection)   # before Redis ran any of them
        finally:
            r.client_unpause()
        producer.publish(50, exchange=q.exchange, routing_key=unique_name)
    assert sorted(bodies_in(r, keys, unique_name)) == list(range(51))


def test_a_script_flush_between_publishes_loses_nothing(redis_server, prefix, unique_name, r, keys):
    q = queue(unique_name)
    with connection(redis_server, prefix, **LATER) as conn:
        producer = producer_of(conn, q, 10)
        r.script_flush()
        for i in range(10, 20):
            producer.publish(i, exchange=q.exchange, routing_key=unique_name)
    assert sorted(bodies_in(r, keys, unique_name)) == list(range(20))


def test_a_message_redis_refuses_is_logged_and_the_others_go_on(
        redis_server, prefix, unique_name, r, keys, caplog):
    """The stream of one queue is a string key (WRONGTYPE): that publish is lost and logged."""
    good, bad = queue(unique_name), queue(unique_name + 'x')
    with connection(redis_server, prefix, **LATER) as conn:
        producer = Producer(conn.default_channel)
        good(conn.default_channel).declare()
        r.set(keys.stream(bad.name), 'not a stream')
        with caplog.at_level(logging.ERROR, logger='celery_streams'):
            producer.publish(0, exchange='', routing_key=good.name)
            producer.publish('lost', exchange='', routing_key=bad.name)
            producer.publish(1, exchange='', routing_key=good.name)
            publisher = conn.default_channel.publisher
        assert publisher.refused == 0   # not read yet
    assert publisher.refused == 1
    assert 'refused, the message is lost' in caplog.text and 'WRONGTYPE' in caplog.text
    assert bodies_in(r, keys, good.name) == [0, 1]
    r.delete(keys.stream(bad.name))


@pytest.mark.skipif(not hasattr(os, 'fork'), reason='needs fork')
def test_a_forked_child_never_writes_its_parents_messages_again(
        redis_server, prefix, unique_name, r, keys):
    q = queue(unique_name)
    with connection(redis_server, prefix, **LATER) as conn:
        producer = producer_of(conn, q, 10)
        assert conn.default_channel.publisher.pipe.unconfirmed == 10
        pid = os.fork()
        if pid == 0:   # the child: one message of its own, then its exit confirms it
            try:
                producer.publish(100, exchange=q.exchange, routing_key=unique_name)
                conn.default_channel.publisher.close()
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert status == 0
    assert sorted(bodies_in(r, keys, unique_name)) == list(range(10)) + [100]


@pytest.mark.parametrize('options, message', [
    ({'publish_confirm': 'sometimes'}, 'publish_confirm must be one of now, later'),
    ({'publish_confirm': 'later', 'publish_wait_replicas': 1},
     "publish_wait_replicas needs publish_confirm='now'"),
])
def test_a_wrong_publish_confirm_is_one_clear_line(options, message):
    with pytest.raises(ConfigurationError) as info:
        Options.from_transport_options(options)
    assert message in str(info.value) and '\n' not in str(info.value)
