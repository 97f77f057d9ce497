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
import time

import pytest
from kombu import Consumer, Exchange, Queue

from tests.helpers import connection, drop_connection, publish

pytestmark = pytest.mark.timeout(60)


def queue(name):
    return Queue(name, Exchange(name), name)


def consume(conn, q, prefetch, got):
    channel = conn.channel()
    consumer = Consumer(channel, [q], callbacks=[lambda body, message: got.append(message)],
                        prefetch_count=prefetch)
    consumer.consume()
    return channel


def drain_until(conn, until, seconds=10):
    deadline = time.monotonic() + seconds
    while not until() and time.monotonic() < deadline:
        try:
            conn.drain_events(timeout=0.2)
        except socket.timeout:
            pass
    return until()


def pending(r, keys, name):
    return sum(r.xpending(stream, 'celery')['pending'] for stream in keys.streams(name)
               if r.exists(stream))


def test_a_consumer_holding_most_of_its_window_still_gets_the_rest(redis_server, prefix, unique_name):
    """Prefetch 4 with 3 messages held unacked: fewer than half free, the 4th comes all the same."""
    q = queue(unique_name)
    got = []
    with connection(redis_server, prefix) as conn:
        consume(conn, q, prefetch=4, got=got)
        publish(conn, q.exchange, unique_name, [1, 2, 3], declare=[q])
        assert drain_until(conn, lambda: len(got) == 3)
        publish(conn, q.exchange, unique_name, [4])
        started = time.monotonic()
        assert drain_until(conn, lambda: len(got) == 4, seconds=5), 'the free slot was never read'
        assert time.monotonic() - started < 2.0
        assert sorted(m.payload for m in got) == [1, 2, 3, 4]


def test_acks_land_when_the_connection_drops_before_redis_ran_them(
        redis_server, prefix, unique_name, r, keys):
    """Acks written while Redis holds writes back, then the connection drops: they are written again."""
    q = queue(unique_name)
    got = []
    with connection(redis_server, prefix) as conn:
        channel = consume(conn, q, prefetch=10, got=got)
        publish(conn, q.exchange, unique_name, list(range(5)), declare=[q])
        assert drain_until(conn, lambda: len(got) == 5)
        assert pending(r, keys, unique_name) == 5
        qos = channel.qos
        r.client_pause(5000, all=False)   # WRITE: Redis queues the XACKs, runs none of them
        try:
            qos.loop_turn(None)
            for message in got:
                qos.ack_later(message.delivery_tag)   # written, replies not waited for
            assert qos.pipe.unconfirmed >= 1
            drop_connection(r, qos.pipe.line._connection)   # the connection drops before they ran
        finally:
            r.client_unpause()
        qos.flush_acks(wait=True)
        assert qos.pipe.unconfirmed == 0
        assert pending(r, keys, unique_name) == 0, 'acks lost with their connection'


def test_an_acked_message_is_never_restored(redis_server, prefix, unique_name, r, keys):
    """An ack written without waiting and a restore right after: the restore sees the ack."""
    q = queue(unique_name)
    got = []
    with connection(redis_server, prefix) as conn:
        channel = consume(conn, q, prefetch=20, got=got)
        publish(conn, q.exchange, unique_name, list(range(20)), declare=[q])
        assert drain_until(conn, lambda: len(got) == 20)
        for message in got[:10]:
            message.ack()
        channel.qos.restore_unacked()
        entries = [entry for stream in keys.streams(unique_name) if r.exists(stream)
                   for entry in r.xrange(stream)]
        assert len(entries) == 10, 'acked messages came back (or unacked ones were lost)'
