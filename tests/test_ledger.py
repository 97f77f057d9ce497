"""The ledger (issue #24): per-queue counters kept by the scripts that do the work, and the audit.

Each test drives the transport through kombu on a real server and checks the
counters one by one, then that the audit balances (0 unaccounted) -- or, when
an entry is deleted behind the transport's back, that it does not.
"""
from __future__ import annotations

import json
import time

from kombu import Consumer, Exchange, Producer, Queue

from celery_streams import admin, ledger
from tests.helpers import connection, consume, publish, streams_url
from tests.test_delivery import VT, hold_then_die


def audit_of(r, prefix, queue):
    [found] = ledger.audit(r, global_keyprefix=prefix, queues=[queue])
    return found


def counters(found, *names):
    return {name: found.count(name) for name in names}


def test_publish_paths_ack_reject_requeue_and_expiry_are_counted(redis_server, prefix, r):
    """Default exchange (the hot path), a direct exchange (the route script), a priority bucket
    and a scheduled message: published; then acked, rejected, requeued, expired: balanced."""
    work = Queue('work', Exchange('work'), 'work', max_priority=9)
    default = Queue('work', routing_key='work')
    with connection(redis_server, prefix) as conn:
        publish(conn, work.exchange, 'work', [{'n': i} for i in range(4)], declare=[work])
        Producer(conn.default_channel).publish({'n': 'hi'}, exchange='', routing_key='work',
                                               priority=7)
        publish(conn, '', 'work', [{'n': 'x'}], declare=[default])
        Producer(conn.default_channel).publish(
            {'n': 'later'}, exchange='', routing_key='work',
            headers={'task': 't', 'id': 'i', 'eta': '2100-01-01T00:00:00+00:00'})
        Producer(conn.default_channel).publish({'n': 'old'}, exchange='', routing_key='work',
                                               expiration=0.001)
        time.sleep(0.05)
        got = consume(conn, work, 6, ack=False, must=True)
        got[0].ack()
        got[0].channel.qos.ack_tags([got[0].delivery_tag])   # acked again: counted once
        got[1].reject()
        got[2].requeue()
        for message in got[3:]:
            message.ack()
        again = consume(conn, work, 1, must=True)
        assert again[0].delivery_info['redelivered']
    found = audit_of(r, prefix, 'work')
    assert counters(found, 'published', 'acked', 'rejected', 'requeued', 'expired', 'delivered') == {
        'published': 8, 'acked': 5, 'rejected': 1, 'requeued': 1, 'expired': 1, 'delivered': 8}
    assert (found.waiting, found.pending, found.scheduled) == (0, 0, 1)
    assert found.unaccounted == 0


def test_reclaim_dead_letters_drain_and_purge_are_counted(redis_server, prefix, r):
    """A killed consumer's messages: redelivered; max_deliveries: dead-lettered, then revived by
    an operator (published again); a drain of the rest, a purge of the dead letters."""
    q = Queue('work', Exchange('work'), 'work')
    with connection(redis_server, prefix, visibility_timeout=VT, max_deliveries=2) as conn:
        publish(conn, q.exchange, 'work', [{'n': i} for i in range(6)], declare=[q])
        hold_then_die(redis_server, prefix, 6)
        got = consume(conn, q, 6, ack=False, must=True)   # reclaimed: delivered a 2nd time
        for message in got[:4]:
            message.ack()
        for message in got[4:]:
            message.requeue()                             # over max_deliveries=2 when read
        consume(conn, q, timeout=1)
    found = audit_of(r, prefix, 'work')
    assert counters(found, 'published', 'redelivered', 'acked', 'requeued', 'dead_lettered') == {
        'published': 6, 'redelivered': 6, 'acked': 4, 'requeued': 2, 'dead_lettered': 2}
    assert found.unaccounted == 0 and found.dead_letters == 2
    first = admin.dead_letters(r, global_keyprefix=prefix, queues=['work'])[0].dead_letters[0]
    [requeued] = admin.requeue_dead_letters(r, global_keyprefix=prefix, ids=[first.id])
    assert requeued.outcome == 'requeued'
    with connection(redis_server, prefix) as conn:
        publish(conn, q.exchange, 'work', [{'n': 'more'}], declare=[q])
    admin.drain(r, global_keyprefix=prefix, queues=['work'])
    admin.drain(r, global_keyprefix=prefix, queues=['work'], dead_letters=True)
    found = audit_of(r, prefix, 'work')
    assert counters(found, 'published', 'revived', 'drained', 'dead_purged') == {
        'published': 8, 'revived': 1, 'drained': 2, 'dead_purged': 1}
    assert (found.waiting, found.pending, found.dead_letters) == (0, 0, 0)
    assert found.unaccounted == 0


def test_the_blocking_read_counts_what_it_delivered(redis_server, prefix, r):
    """A consumer blocked on an empty queue gets a message through XREADGROUP, not the read
    script: it is counted delivered too, with the consumer's next acks."""
    q = Queue('work', Exchange('work'), 'work')
    with connection(redis_server, prefix) as consumer_conn, connection(redis_server, prefix) as other:
        got = []
        with Consumer(consumer_conn, [q], callbacks=[lambda body, m: (got.append(m), m.ack())]):
            try:
                consumer_conn.drain_events(timeout=0.3)   # nothing: the next read blocks
            except TimeoutError:
                pass
            publish(other, q.exchange, 'work', [{'n': 1}], declare=[q])
            while not got:
                consumer_conn.drain_events(timeout=5)
            try:
                consumer_conn.drain_events(timeout=0.2)   # the turn that writes the acks
            except TimeoutError:
                pass
        found = audit_of(r, prefix, 'work')
    assert counters(found, 'published', 'delivered', 'acked') == {
        'published': 1, 'delivered': 1, 'acked': 1}
    assert found.unaccounted == 0


def test_acks_after_the_server_lost_its_scripts_are_counted(redis_server, prefix, r):
    """NOSCRIPT (SCRIPT FLUSH, a restart): the ack script is loaded and the acks written again."""
    q = Queue('work', Exchange('work'), 'work')
    with connection(redis_server, prefix) as conn:
        publish(conn, q.exchange, 'work', [{'n': i} for i in range(3)], declare=[q])
        got = consume(conn, q, 3, ack=False, must=True)
        r.script_flush()
        for message in got:
            message.ack()
        consume(conn, q, timeout=0.5)
    found = audit_of(r, prefix, 'work')
    assert found.count('acked') == 3 and found.pending == 0 and found.unaccounted == 0


def test_an_entry_deleted_behind_the_transports_back_shows_in_the_audit(redis_server, prefix, r, keys):
    """The point of the ledger: an XDEL nobody counted is a difference, with what could explain it."""
    q = Queue('work', Exchange('work'), 'work')
    with connection(redis_server, prefix) as conn:
        publish(conn, q.exchange, 'work', [{'n': i} for i in range(3)], declare=[q])
    assert audit_of(r, prefix, 'work').unaccounted == 0
    first = r.xrange(keys.stream('work'), count=1)[0][0]
    r.xdel(keys.stream('work'), first)
    found = audit_of(r, prefix, 'work')
    assert found.unaccounted == 1 and 'XDEL' in found.explanations[0]


def test_audit_command_table_json_and_check(redis_server, prefix, r, keys, run):
    q = Queue('work', Exchange('work'), 'work')
    with connection(redis_server, prefix) as conn:
        publish(conn, q.exchange, 'work', [{'n': i} for i in range(3)], declare=[q])
        consume(conn, q, 2, must=True)

    def run_cli(*args):
        result = run('--broker', streams_url(redis_server), 'streams', '--prefix', prefix, *args)
        return result.exit_code, result.output

    code, out = run_cli('audit')
    assert code == 0 and 'Balanced' in out
    header, row = out.splitlines()[1:3]
    assert header.split() == ['QUEUE', 'PUBLISHED', 'ACKED', 'REJECTED', 'DEAD', 'EXPIRED',
                              'DRAINED', 'DROPPED', 'WAITING', 'PENDING', 'SCHED', 'UNACCOUNTED']
    assert row.split() == ['work', '3', '2', '0', '0', '0', '0', '0', '1', '0', '0', '0']
    r.xdel(keys.stream('work'), r.xrange(keys.stream('work'))[0][0])
    code, out = run_cli('audit', '--check')
    assert code == 1 and "Queue 'work': 1 message(s) published are neither" in out
    code, out = run_cli('audit', '-Q', 'work', '--json')
    [doc] = json.loads(out)['queues']
    assert doc['unaccounted'] == 1 and doc['counters']['published'] == 3 and doc['waiting'] == 0


def test_the_ledger_key_shares_the_queue_hash_tag_and_is_found_from_any_key_of_the_queue():
    from redis.crc import key_slot

    from celery_streams.keys import Keys, is_dead_letters, ledger_of

    keys = Keys('{app}:')
    for queue in ('celery', 'a}b', 'x:p3', 'ü|n *?'):
        ledger_key = keys.ledger(queue)
        assert keys.parse(ledger_key) == (queue, 'ledger', None)
        for key in (keys.stream(queue), keys.stream(queue, 6), keys.scheduled(queue),
                    keys.dead_letters(queue)):
            assert ledger_of(key) == ledger_key
            assert key_slot(key.encode()) == key_slot(ledger_key.encode())
        head, tail = keys.ledger_affixes()
        assert head + queue + tail == ledger_key
        assert is_dead_letters(keys.dead_letters(queue)) and not is_dead_letters(keys.stream(queue))


def test_a_broadcast_queue_is_shown_not_balanced():
    found = ledger.QueueAudit('bcast', 'fanout', {'published': 5, 'dropped': 2}, waiting=3)
    assert found.unaccounted is None and found.explanations == ()
    found = ledger.QueueAudit('q', 'task', {'published': 5, 'acked': 2}, waiting=1, pending=1)
    assert (found.accounted, found.unaccounted) == (4, 1)
    assert found.as_dict()['counters']['dropped'] == 0


def test_with_ledger_off_publishes_reads_and_acks_count_nothing(redis_server, prefix, r, keys):
    """``ledger=False``: the hot paths are as before the ledger (a plain XACK + XDEL)."""
    q = Queue('work', routing_key='work')
    with connection(redis_server, prefix, ledger=False) as conn:
        publish(conn, '', 'work', [{'n': i} for i in range(3)], declare=[q])
        consume(conn, q, 3, must=True)
    assert r.hgetall(keys.ledger('work')) == {}
    assert r.xlen(keys.stream('work')) == 0 and r.xpending(keys.stream('work'), 'celery')['pending'] == 0
