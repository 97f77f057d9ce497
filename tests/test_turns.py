"""A turn of the consume loop: acks that are not waited for, and reads held back for a fuller window.

* Acks of the loop are written without waiting for their replies
  (:mod:`celery_streams.pipe`). They must land all the same, also when the
  connection drops before Redis ran them, and before anything that must come
  after them (a restore).
* A busy consumer holds a read back until half its prefetch window is free
  (:meth:`celery_streams.qos.QoS.refill_wait`); never for long: a consumer
  holding most of its window still gets the rest.
"""
from __future__ import annotations

import socket
import threading
import time

import pytest
from kombu import Consumer, Exchange, Queue

from celery_streams import errors
from tests.helpers import connection, drop_connection, publish, wait_until

pytestmark = pytest.mark.timeout(60)


def queue(name):
    return Queue(name, Exchange(name), name)


def drain_until(conn, until, seconds=10):
    deadline = time.monotonic() + seconds
    while not until() and time.monotonic() < deadline:
        try:
            conn.drain_events(timeout=0.2)
        except socket.timeout:
            pass
    return until()


def take_unacked(conn, q, prefetch, bodies):
    """Consume ``q`` on a channel of its own with ``prefetch``, publish ``bodies`` to it, and
    take them all without acking; ``(channel, messages)`` (later messages are added too)."""
    got = []
    channel = conn.channel()
    Consumer(channel, [q], callbacks=[lambda body, message: got.append(message)],
             prefetch_count=prefetch).consume()
    publish(conn, q.exchange, q.name, bodies, declare=[q])
    assert drain_until(conn, lambda: len(got) == len(bodies))
    return channel, got


def pending(r, keys, name):
    return sum(r.xpending(stream, 'celery')['pending'] for stream in keys.streams(name)
               if r.exists(stream))


def test_a_consumer_holding_most_of_its_window_still_gets_the_rest(redis_server, prefix, unique_name):
    """Prefetch 4 with 3 messages held unacked: fewer than half free, the 4th comes all the same."""
    q = queue(unique_name)
    with connection(redis_server, prefix) as conn:
        _, got = take_unacked(conn, q, prefetch=4, bodies=[1, 2, 3])
        publish(conn, q.exchange, unique_name, [4])
        started = time.monotonic()
        assert drain_until(conn, lambda: len(got) == 4, seconds=5), 'the free slot was never read'
        assert time.monotonic() - started < 2.0
        assert sorted(m.payload for m in got) == [1, 2, 3, 4]


def test_acks_land_when_the_connection_drops_before_redis_ran_them(
        redis_server, prefix, unique_name, r, keys):
    """Acks written while Redis holds writes back, then the connection drops: they are written again."""
    q = queue(unique_name)
    with connection(redis_server, prefix) as conn:
        channel, got = take_unacked(conn, q, prefetch=10, bodies=list(range(5)))
        assert pending(r, keys, unique_name) == 5
        qos = channel.qos
        r.client_pause(5000, all=False)   # WRITE: Redis queues the XACKs, runs none of them
        try:
            qos.loop_turn(None)
            for message in got:
                qos.ack_later(message.delivery_tag)   # written, replies not waited for
            assert qos.pipe.unconfirmed >= 1
            drop_connection(r, qos.pipe.dispatcher._connection)   # the connection drops before they ran
        finally:
            r.client_unpause()
        qos.flush_acks(wait=True)
        assert qos.pipe.unconfirmed == 0
        assert pending(r, keys, unique_name) == 0, 'acks lost with their connection'


def test_an_acked_message_is_never_restored(redis_server, prefix, unique_name, r, keys):
    """An ack written without waiting and a restore right after: the restore sees the ack."""
    q = queue(unique_name)
    with connection(redis_server, prefix) as conn:
        channel, got = take_unacked(conn, q, prefetch=20, bodies=list(range(20)))
        for message in got[:10]:
            message.ack()
        channel.qos.restore_unacked()
        entries = [entry for stream in keys.streams(unique_name) if r.exists(stream)
                   for entry in r.xrange(stream)]
        assert len(entries) == 10, 'acked messages came back (or unacked ones were lost)'


def kill_from_the_server(r, connection):
    """``CLIENT KILL`` the socket of redis-py ``connection`` from the server's side, without the
    client knowing: its next write succeeds, only a read finds the end."""
    addr = '%s:%s' % connection._sock.getsockname()[:2]
    r.client_kill(addr)
    wait_until(lambda: all(c.get('addr') != addr for c in r.client_list()), timeout=5)


def test_acks_land_when_the_server_killed_their_connection(redis_server, prefix, unique_name, r, keys):
    """Acks written while Redis holds writes back, their connection killed by the server (the
    client does not know): a wait for them writes them again on a new connection."""
    q = queue(unique_name)
    with connection(redis_server, prefix) as conn:
        channel, got = take_unacked(conn, q, prefetch=10, bodies=list(range(5)))
        qos = channel.qos
        r.client_pause(5000, all=False)
        try:
            qos.loop_turn(None)
            for message in got:
                qos.ack_later(message.delivery_tag)
            kill_from_the_server(r, qos.pipe.dispatcher._connection)
        finally:
            r.client_unpause()
        qos.flush_acks(wait=True)
        assert qos.pipe.unconfirmed == 0
        assert pending(r, keys, unique_name) == 0, 'acks lost with a connection the server killed'


def test_a_restore_after_the_server_killed_the_connections_puts_messages_back(
        redis_server, prefix, unique_name, r, keys):
    """Unacked messages, then the server kills every connection of the consumer: a restore
    (as at reconnect) puts them back at once, not after a reclaim."""
    q = queue(unique_name)
    with connection(redis_server, prefix) as conn:
        channel, got = take_unacked(conn, q, prefetch=10, bodies=list(range(5)))
        kill_from_the_server(r, channel.qos.pipe.dispatcher._connection)
        kill_from_the_server(r, channel.qos.dispatcher._connection)
        assert channel.qos.restore_unacked() == []
        assert pending(r, keys, unique_name) == 0, 'left pending, waiting for a reclaim'
        entries = [e for stream in keys.streams(unique_name) if r.exists(stream)
                   for e in r.xrange(stream)]
        assert len(entries) == 5


def test_a_read_carries_the_acks_of_its_turn(redis_server, prefix, unique_name, r, keys):
    """Acks queued in a turn of the consume loop go out with the next read, in its write: the
    read's reply taken, they are in Redis without any write of their own."""
    q = queue(unique_name)
    with connection(redis_server, prefix) as conn:
        channel, got = take_unacked(conn, q, prefetch=10, bodies=list(range(5)))
        qos = channel.qos
        qos.loop_turn(threading.get_ident())   # acks wait for the turn's end
        for message in got:
            message.ack()
        assert qos.has_acks() and pending(r, keys, unique_name) == 5
        publish(conn, q.exchange, unique_name, [5])
        channel.start_read()
        assert not qos.has_acks(), 'the read did not take the acks'
        channel.finish_read()
        assert pending(r, keys, unique_name) == 1, 'the acks a read carried did not land'
        assert r.hget(keys.ledger(unique_name), 'acked') == b'5'


def test_acks_a_read_carried_land_when_the_server_killed_its_connection(
        redis_server, prefix, unique_name, r, keys):
    """The server killed the reader's connection (the client does not know) just before a
    read carried the turn's acks: the read fails, and the acks are written again on the
    pipe, counted once."""
    q = queue(unique_name)
    with connection(redis_server, prefix) as conn:
        channel, got = take_unacked(conn, q, prefetch=10, bodies=list(range(5)))
        qos = channel.qos
        qos.loop_turn(threading.get_ident())
        for message in got:
            message.ack()
        publish(conn, q.exchange, unique_name, [5])
        [lane] = channel.reader.lanes.lanes()
        kill_from_the_server(r, lane.client.connection)
        with pytest.raises(errors.connection_errors):   # the write may pass; no reply comes
            channel.start_read()
            channel.finish_read()
        assert pending(r, keys, unique_name) == 5   # they never ran
        qos.flush_acks(wait=True)
        assert pending(r, keys, unique_name) == 0, 'acks lost with the read that carried them'
        assert r.hget(keys.ledger(unique_name), 'acked') == b'5'


def script_calls(r, sha, run) -> int:
    """How many times the server ran the script ``sha`` during ``run()``, from its slow log."""
    r.config_set('slowlog-log-slower-than', 0)
    r.config_set('slowlog-max-len', 100000)
    r.slowlog_reset()
    try:
        run()
        entries = r.slowlog_get(100000)
    finally:
        r.config_set('slowlog-log-slower-than', 10000)
    return sum(1 for entry in entries if entry['command'].split()[:2] == [b'EVALSHA', sha.encode()])


def test_a_backlog_is_read_with_plain_reads_in_order(redis_server, prefix, unique_name, r):
    """While the queue's stream holds more than a read's budget, reads are a plain
    ``XREADGROUP ... COUNT``, not the ``read`` script: the same messages, in order."""
    q = queue(unique_name)
    with connection(redis_server, prefix) as conn:
        publish(conn, q.exchange, unique_name, list(range(40)), declare=[q])
        got = []
        channel = conn.channel()
        Consumer(channel, [q], callbacks=[lambda body, message: (got.append(body), message.ack())],
                 prefetch_count=4).consume()
        scripted = script_calls(r, channel.scripts.read.sha,
                                lambda: drain_until(conn, lambda: len(got) == 40))
    assert got == list(range(40))
    assert scripted <= 2, scripted   # 10 reads of 4: the first the script's, the next ones plain


def test_a_backlog_does_not_starve_the_other_queues(redis_server, prefix, unique_name):
    """Two queues with backlogs, round robin: the plain read of one queue's backlog goes out only
    when that queue comes first, so both are read all along."""
    a, b = queue(unique_name + 'a'), queue(unique_name + 'b')
    with connection(redis_server, prefix) as conn:
        publish(conn, a.exchange, a.name, ['a%d' % i for i in range(40)], declare=[a])
        publish(conn, b.exchange, b.name, ['b%d' % i for i in range(40)], declare=[b])
        got = []
        channel = conn.channel()
        Consumer(channel, [a, b], callbacks=[lambda body, message: (got.append(body), message.ack())],
                 prefetch_count=4).consume()
        assert drain_until(conn, lambda: len(got) >= 24)
    first = got[:24]
    assert sum(body.startswith('a') for body in first) >= 8, first
    assert sum(body.startswith('b') for body in first) >= 8, first
