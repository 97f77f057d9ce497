"""At-least-once under failure, at the kombu level: reclaim, renewal, dead letters.

A consumer "dies" for real here: it runs in a child process killed with SIGKILL
while it holds unacked messages.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

from kombu import Consumer, Exchange, Queue

from celery_streams.scripts import Scripts
from tests.helpers import connection, consume, publish, streams_url

VT = 1.0   # a short visibility_timeout keeps these tests fast

HOLDER = '''
import sys, time, celery_streams
from kombu import Connection, Consumer, Queue, Exchange
url, prefix, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
q = Queue('work', Exchange('work'), 'work')
conn = Connection(url, transport_options={'global_keyprefix': prefix, 'visibility_timeout': %r})
got = []
with Consumer(conn, [q], callbacks=[lambda b, m: got.append(m)]):
    while len(got) < count:
        conn.drain_events(timeout=10)
print('holding', len(got), flush=True)
time.sleep(600)
''' % VT


def hold_then_die(server, prefix, count):
    """A child process that takes ``count`` messages without acking, then is killed."""
    child = subprocess.Popen([sys.executable, '-c', HOLDER, streams_url(server), prefix, str(count)],
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().startswith('holding')
    child.send_signal(signal.SIGKILL)
    child.wait()


def test_messages_of_a_killed_consumer_are_reclaimed_and_marked_redelivered(redis_server, prefix, r, keys):
    q = Queue('work', Exchange('work'), 'work')
    with connection(redis_server, prefix, visibility_timeout=VT) as conn:
        publish(conn, q.exchange, 'work', [{'n': i} for i in range(5)], declare=[q])
        hold_then_die(redis_server, prefix, 5)
        started = time.monotonic()
        got = consume(conn, q, 5)
        took = time.monotonic() - started
    print('\nreclaimed 5 messages of a killed consumer in %.2fs (visibility_timeout %.1fs)' % (took, VT))
    assert sorted(m.payload['n'] for m in got) == list(range(5))
    assert all(m.delivery_info['redelivered'] for m in got)
    assert r.xpending(keys.stream('work'), 'celery')['pending'] == 0
    # the dead consumer, now owning nothing, is removed from the group by a later reclaim
    deadline = time.monotonic() + 10
    with connection(redis_server, prefix, visibility_timeout=VT) as conn:
        while time.monotonic() < deadline:
            consume(conn, q, 1, timeout=1)
            if len(r.xinfo_consumers(keys.stream('work'), 'celery')) <= 1:
                break
    assert len(r.xinfo_consumers(keys.stream('work'), 'celery')) <= 1


def test_a_live_consumer_keeps_its_messages_past_the_visibility_timeout(redis_server, prefix, keys, r):
    q = Queue('work', Exchange('work'), 'work')
    with connection(redis_server, prefix, visibility_timeout=VT) as holder, \
            connection(redis_server, prefix, visibility_timeout=VT) as other:
        publish(holder, q.exchange, 'work', [{'n': 1}], declare=[q])
        held = consume(holder, q, 1, ack=False)
        assert len(held) == 1
        # the other consumer reads for 3x the visibility timeout and gets nothing
        stolen = consume(other, q, 1, timeout=3 * VT)
        assert stolen == []
        held[0].ack()
    assert r.xlen(keys.stream('work')) == 0


def test_reclaim_never_overfills_the_prefetch_window(redis_server, prefix):
    q = Queue('work', Exchange('work'), 'work')
    with connection(redis_server, prefix, visibility_timeout=VT) as conn:
        publish(conn, q.exchange, 'work', [{'n': i} for i in range(10)], declare=[q])
        hold_then_die(redis_server, prefix, 10)
        channel = conn.channel()
        channel.basic_qos(0, 3, False)
        got = []
        with Consumer(channel, [q], callbacks=[lambda b, m: got.append(m)]):
            deadline = time.monotonic() + 3 * VT + 2
            while time.monotonic() < deadline:
                try:
                    conn.drain_events(timeout=0.3)
                except TimeoutError:
                    pass
                assert len([m for m in got if not m.acknowledged]) <= 3
        assert len(got) == 3


def test_requeued_poison_message_is_dead_lettered_after_max_deliveries(redis_server, prefix, keys, r):
    q = Queue('work', Exchange('work'), 'work')
    with connection(redis_server, prefix, visibility_timeout=VT, max_deliveries=3) as conn:
        publish(conn, q.exchange, 'work', [{'poison': True}, {'good': True}], declare=[q])
        seen = []

        def on_message(body, message):
            seen.append(body)
            if body.get('poison'):
                message.requeue()
            else:
                message.ack()

        with Consumer(conn, [q], callbacks=[on_message]):
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and r.xlen(keys.stream('work')):
                try:
                    conn.drain_events(timeout=0.5)
                except TimeoutError:
                    pass
    assert seen.count({'poison': True}) == 3
    assert {'good': True} in seen
    dead = r.xrange(keys.dead_letters('work'))
    assert len(dead) == 1
    assert b'max_deliveries=3' in dead[0][1][b'reason']
    assert json.loads(dead[0][1][b'field:payload'])['body']
    assert r.xlen(keys.stream('work')) == 0


def test_drained_entries_of_a_dead_consumer_are_never_reclaimed(redis_server, prefix, keys, r):
    q = Queue('work', Exchange('work'), 'work')
    with connection(redis_server, prefix, visibility_timeout=VT) as conn:
        publish(conn, q.exchange, 'work', [{'n': i} for i in range(4)], declare=[q])
        hold_then_die(redis_server, prefix, 4)
        removed, cleared = Scripts(r).drain(keys=[keys.stream('work')], args=['+'])
        assert (removed, cleared) == (4, 4)
        assert consume(conn, q, 1, timeout=3 * VT) == []
    assert [g['name'] for g in r.xinfo_groups(keys.stream('work'))] == [b'celery']


def test_restore_at_shutdown_does_not_count_as_a_delivery(redis_server, prefix, keys, r):
    """An ETA task held across many restarts is never dead-lettered for it."""
    q = Queue('work', Exchange('work'), 'work')
    with connection(redis_server, prefix, visibility_timeout=VT, max_deliveries=2) as conn:
        publish(conn, q.exchange, 'work', [{'eta': True}], declare=[q])
    for _ in range(4):   # four workers take it and shut down without running it
        with connection(redis_server, prefix, visibility_timeout=VT, max_deliveries=2) as conn:
            assert len(consume(conn, q, 1, ack=False)) == 1
    with connection(redis_server, prefix, visibility_timeout=VT, max_deliveries=2) as conn:
        (message,) = consume(conn, q, 1)
    assert message.payload == {'eta': True}
    assert r.xlen(keys.dead_letters('work')) == 0
