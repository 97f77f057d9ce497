"""Unique tasks (:mod:`celery_streams.unique`) on a real server, each kind: the check with the
append, the three modes, who stands for a dropped duplicate, eight processes racing on one key,
every way a message goes releasing its key (ack, reject, dead letter, expiry, drain; nuke), the
``celery streams unique`` listing, and the hot path untouched by messages without a key.

The real-worker tests (early acks, a killed worker) are in ``tests/test_unique_worker.py``.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from celery import Celery
from kombu import Connection, Queue

from celery_streams import admin, ledger, unique
from celery_streams.keys import Keys
from celery_streams.unique import DuplicateTask
from celery_streams.unique_tasks import UniqueTask, apply_unique, unique_headers
from tests.helpers import backend_url, drain_all, streams_url, wait_until
from tests.workers import ROOT, clean_env

pytestmark = [pytest.mark.timeout(120)]
CELERY = str(Path(sys.executable).with_name('celery'))


@pytest.fixture
def make_app(redis_server, prefix):
    made = []

    def make(backend=True, **options):
        app = Celery('unique-client', broker=streams_url(redis_server),   # current: see unique.py
                     backend=backend_url(redis_server) if backend else None)
        app.conf.broker_transport_options = {'global_keyprefix': prefix, **options}
        made.append(app)
        return app

    yield make
    for app in made:
        app.close()


def entries(r, keys, queue):
    """The task ids in the queue's main stream, in order."""
    if not r.exists(keys.stream(queue)):
        return []
    return [json.loads(fields[b'payload'])['headers']['id'] for _, fields in r.xrange(keys.stream(queue))]


def scheduled_args(r, keys, queue):
    return [json.loads(member.decode().split('|', 3)[3])['headers']['argsrepr']
            for member in r.zrange(keys.scheduled(queue), 0, -1)]


def held(r, prefix, queue=None):
    return {h.key: h for h in admin.unique_keys(r, global_keyprefix=prefix,
                                                 queues=[queue] if queue else None)}


# -- the pure parts ---------------------------------------------------------------

def test_keys_and_claims():
    keys = Keys('p:')
    assert keys.unique('q', 'a:b}c') == 'p:celery-streams:q:{q}:unique:a:b}c'
    assert keys.parse(keys.unique('q', 'a:b}c')) == ('q', 'unique', 'a:b}c')
    assert keys.parse(keys.stream('q')) == ('q', 'stream', 0)
    claim = unique.claim_of({'unique_key': 'k', 'id': 't1', 'retries': 2}, {})
    assert claim == unique.Claim('k', 'until_done', int(unique.DEFAULT_HOLD * 1000), 't1', '2')
    assert unique.claim_of({}, {'unique_key': 'k', 'unique_mode': 'period', 'unique_for': 2,
                                'correlation_id': 't2'}) == unique.Claim('k', 'period', 2000, 't2', '0')
    assert unique.claim_of({'id': 't'}, {}) is None
    for bad in ({'unique_mode': 'sometimes'}, {'unique_mode': 'period'}, {'unique_for': 0}):
        with pytest.raises(ValueError):
            unique.claim_of({'unique_key': 'k', **bad}, {})
    with pytest.raises(ValueError):
        unique_headers('k', 'period')


# -- until done -------------------------------------------------------------------

def test_until_done_drops_a_duplicate_and_names_the_standing_task(make_app, r, keys, prefix):
    app = make_app()
    first = app.send_task('t', args=(1,), queue='uq', headers=unique_headers('k1'))
    second = app.send_task('t', args=(2,), queue='uq', headers=unique_headers('k1'))
    other = app.send_task('t', args=(3,), queue='uq', headers=unique_headers('k2'))
    plain = app.send_task('t', args=(4,), queue='uq')
    assert entries(r, keys, 'uq') == [first.id, other.id, plain.id]
    # The dropped one's result says at once who stands for it (it would wait for ever).
    started = time.monotonic()
    with pytest.raises(DuplicateTask) as raised:
        second.get(timeout=10)
    assert time.monotonic() - started < 2
    assert raised.value.standing_id == first.id and raised.value.key == 'k1'
    assert second.state == 'FAILURE'
    found = held(r, prefix, 'uq')
    assert set(found) == {'k1', 'k2'}
    assert (found['k1'].mode, found['k1'].task_id, found['k1'].scheduled) == ('until_done', first.id, False)
    assert unique.DEFAULT_HOLD - 5 < found['k1'].ttl <= unique.DEFAULT_HOLD
    [audit] = ledger.audit(r, global_keyprefix=prefix, queues=['uq'])
    assert (audit.count('published'), audit.unaccounted) == (3, 0)


def test_the_helpers_return_the_standing_task(make_app, r, keys):
    app = make_app()

    @app.task(base=UniqueTask, unique_key='refresh:{0}', name='refresh', shared=False)
    def refresh(account):
        return account

    first = refresh.apply_async((5,), queue='uq')
    again = refresh.apply_async((5,), queue='uq')
    assert again.id == first.id   # the task that stands, not the dropped one
    other = refresh.apply_async((6,), queue='uq')
    helper = apply_unique(refresh, (5,), key='refresh:5', queue='uq')
    assert helper.id == first.id
    assert entries(r, keys, 'uq') == [first.id, other.id]
    # a per-call key
    one = refresh.apply_async((7,), queue='uq', unique_key='own')
    two = refresh.apply_async((8,), queue='uq', unique_key='own')
    assert two.id == one.id


def test_an_apply_async_option_is_a_key_too(make_app, r, keys):
    """Celery puts apply_async's extra options in the message properties: read there too."""
    app = make_app()
    first = app.send_task('t', queue='uq', unique_key='opt', unique_mode='period', unique_for=30)
    app.send_task('t', queue='uq', unique_key='opt', unique_mode='period', unique_for=30)
    assert entries(r, keys, 'uq') == [first.id]


def test_a_retry_of_the_holder_keeps_the_key(make_app, r, keys, prefix, redis_server):
    """A retry republishes the task under its id with one more ``retries``: published, and the
    ack of the message it retries does not release the retry's key."""
    app = make_app()
    first = app.send_task('t', queue='uq', headers=unique_headers('k'))
    retry = app.send_task('t', queue='uq', task_id=first.id, headers={**unique_headers('k'), 'retries': 1})
    assert retry.id == first.id and entries(r, keys, 'uq') == [first.id, first.id]
    with Connection(streams_url(redis_server), transport_options={'global_keyprefix': prefix}) as conn:
        got = drain_all(conn, [Queue('uq')], 1, ack=True)   # the first message, acked
        assert got[0][1].headers.get('retries', 0) == 0
        assert 'k' in held(r, prefix)   # held by the retry
        drain_all(conn, [Queue('uq')], 1, ack=True)
    assert held(r, prefix) == {}


# -- period and debounce ----------------------------------------------------------------

def test_period_allows_one_per_period(make_app, r, keys, prefix):
    app = make_app()
    headers = unique_headers('tick', 'period', 1.0)
    first = app.send_task('t', queue='uq', headers=headers)
    assert app.send_task('t', queue='uq', headers=headers).id != first.id
    assert entries(r, keys, 'uq') == [first.id]
    assert held(r, prefix)['tick'].ttl <= 1.0
    time.sleep(1.1)
    third = app.send_task('t', queue='uq', headers=headers)
    assert entries(r, keys, 'uq') == [first.id, third.id]


def test_debounce_replaces_the_scheduled_task_last_arguments_win(make_app, r, keys, prefix):
    app = make_app()
    headers = unique_headers('save', 'debounce')
    results = [app.send_task('t', args=(n,), queue='uq', countdown=30, headers=headers)
               for n in range(3)]
    assert scheduled_args(r, keys, 'uq') == ['(2,)']
    found = held(r, prefix)['save']
    assert (found.task_id, found.mode, found.scheduled) == (results[2].id, 'debounce', True)
    assert found.ttl > 30 + unique.DEFAULT_HOLD - 5
    for replaced in results[:2]:   # their results name the one that replaced them
        with pytest.raises(DuplicateTask) as raised:
            replaced.get(timeout=5)
        assert raised.value.outcome == 'replaced'
    assert raised.value.standing_id == results[2].id
    [audit] = ledger.audit(r, global_keyprefix=prefix, queues=['uq'])
    assert (audit.count('published'), audit.count('dropped'), audit.unaccounted) == (3, 2, 0)
    # until_done on a scheduled task: a duplicate is dropped while it waits for its ETA
    first = app.send_task('t', queue='uq', countdown=30, headers=unique_headers('later'))
    app.send_task('t', queue='uq', countdown=30, headers=unique_headers('later'))
    assert held(r, prefix)['later'].task_id == first.id
    assert len(scheduled_args(r, keys, 'uq')) == 2


# -- eight processes race -----------------------------------------------------------------

RACER = textwrap.dedent('''\
    import sys, time
    from celery import Celery
    import celery_streams
    url, prefix, start, n = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
    app = Celery('racer', broker=url, set_as_current=False)
    app.conf.broker_transport_options = {'global_keyprefix': prefix}
    with app.producer_or_acquire() as producer:
        producer.connection.ensure_connection()
        app.send_task('t', queue='race', producer=producer)   # connected, queue declared
        time.sleep(max(0, start - time.time()))
        for key in range(n):
            app.send_task('t', args=(key,), queue='race', producer=producer,
                          headers={'unique_key': 'k%d' % key})
''')


def test_eight_processes_racing_on_a_key_publish_it_once(redis_server, r, keys, prefix):
    rounds = 100
    start = time.time() + 4
    racers = [subprocess.Popen([sys.executable, '-c', RACER, streams_url(redis_server), prefix,
                                str(start), str(rounds)], env={**clean_env(), 'PYTHONPATH': str(ROOT)},
                               stderr=subprocess.PIPE, text=True) for _ in range(8)]
    for racer in racers:
        assert racer.wait(60) == 0, racer.stderr.read()
    ids = entries(r, keys, 'race')
    payloads = [json.loads(f[b'payload']) for _, f in r.xrange(keys.stream('race'))]
    unique_keys = [p['headers'].get('unique_key') for p in payloads if p['headers'].get('unique_key')]
    assert len(ids) == 8 + rounds
    assert sorted(unique_keys) == sorted('k%d' % n for n in range(rounds))   # each exactly once
    assert len(held(r, prefix, 'race')) == rounds


# -- every way a message goes releases its key ------------------------------------------------

def test_ack_and_reject_release_requeue_keeps(make_app, r, keys, prefix, redis_server):
    app = make_app()
    for key in ('acked', 'rejected', 'requeued'):
        app.send_task('t', queue='uq', headers=unique_headers(key))
    with Connection(streams_url(redis_server), transport_options={'global_keyprefix': prefix}) as conn:
        got = {m.headers['unique_key']: m for _, m in drain_all(conn, [Queue('uq')], 3, ack=False)}
        time.sleep(1.5)   # a renewal tick: the delivered keys get their lease
        lease = unique.lease_ms(300_000) / 1000
        assert all(lease - 3 < h.ttl <= lease for h in held(r, prefix).values())
        got['acked'].ack()
        got['rejected'].reject(requeue=False)
        got['requeued'].reject(requeue=True)
        conn.default_channel.qos.flush_acks(wait=True)
        assert set(held(r, prefix)) == {'requeued'}
        assert held(r, prefix)['requeued'].ttl > unique.DEFAULT_HOLD - 5   # waiting again
        app.send_task('t', queue='uq', headers=unique_headers('acked'))   # free again
        app.send_task('t', queue='uq', headers=unique_headers('requeued'))   # still held
    assert len(entries(r, keys, 'uq')) == 2


def test_a_dead_lettered_message_releases_its_key(make_app, r, keys, prefix, redis_server):
    app = make_app(max_deliveries=1)
    app.send_task('t', queue='uq', headers=unique_headers('poison'))
    options = {'global_keyprefix': prefix, 'max_deliveries': 1}
    with Connection(streams_url(redis_server), transport_options=options) as conn:
        [(_, message)] = drain_all(conn, [Queue('uq')], 1, ack=False)
        message.reject(requeue=True)   # delivered once: the next read is one too many
        assert 'poison' in held(r, prefix)
        with pytest.raises(TimeoutError):   # nothing delivered
            drain_all(conn, [Queue('uq')], 1, timeout=2)
    assert r.xlen(keys.dead_letters('uq')) == 1
    assert held(r, prefix) == {}


def test_an_expired_message_releases_its_key(make_app, r, keys, prefix, redis_server):
    queue = Queue('ttlq', message_ttl=0.2)
    with Connection(streams_url(redis_server), transport_options={'global_keyprefix': prefix}) as conn:
        queue(conn.default_channel).declare()
        conn.Producer().publish({'n': 1}, routing_key='ttlq', headers={'unique_key': 'gone'})
        assert 'gone' in held(r, prefix)
        time.sleep(0.4)
        with pytest.raises(TimeoutError):   # nothing delivered
            drain_all(conn, [queue], 1, timeout=1)
    assert held(r, prefix) == {}
    [audit] = ledger.audit(r, global_keyprefix=prefix, queues=['ttlq'])
    assert audit.count('expired') == 1


def test_drain_releases_what_it_removes_and_nuke_deletes_the_rest(make_app, r, keys, prefix):
    app = make_app()
    app.send_task('t', queue='uq', headers=unique_headers('waiting'))
    app.send_task('t', queue='uq', countdown=60, headers=unique_headers('scheduled'))
    app.send_task('t', queue='uq', headers=unique_headers('tick', 'period', 60))
    app.send_task('t', queue='other', headers=unique_headers('elsewhere'))
    assert set(held(r, prefix)) == {'waiting', 'scheduled', 'tick', 'elsewhere'}
    [drained] = admin.drain(r, global_keyprefix=prefix, queues=['uq'])
    assert (drained.removed, drained.scheduled_removed) == (2, 1)
    assert set(held(r, prefix)) == {'tick', 'elsewhere'}   # a period runs its course
    app.send_task('t', queue='uq', headers=unique_headers('waiting'))
    assert len(entries(r, keys, 'uq')) == 1
    plan = admin.nuke(r, global_keyprefix=prefix, dry_run=True)
    assert {k for k in plan.other_keys if keys.parse(k) and keys.parse(k).role == 'unique'} == {
        keys.unique('uq', 'tick'), keys.unique('other', 'elsewhere'), keys.unique('uq', 'waiting')}
    admin.apply_nuke(r, plan, global_keyprefix=prefix)
    assert held(r, prefix) == {} and not r.keys(keys.prefix + '*')


def test_celery_purge_releases_what_it_removes(make_app, r, keys, prefix):
    """`celery purge` (kombu's queue purge): the keys of the messages it removes, waiting and
    scheduled, are free again at once; a period key runs its course."""
    app = make_app()
    app.send_task('t', queue='uq', headers=unique_headers('waiting'))
    app.send_task('t', queue='uq', countdown=60, headers=unique_headers('scheduled'))
    app.send_task('t', queue='uq', headers=unique_headers('tick', 'period', 60))
    with app.connection_for_write() as conn:
        assert Queue('uq', routing_key='uq')(conn.default_channel).purge() == 3
    assert set(held(r, prefix)) == {'tick'}
    app.send_task('t', queue='uq', headers=unique_headers('waiting'))
    assert len(entries(r, keys, 'uq')) == 1


# -- the listing ------------------------------------------------------------------------------

def test_celery_streams_unique_lists_the_held_keys(make_app, redis_server, prefix):
    app = make_app()
    first = app.send_task('t', queue='uq', headers=unique_headers('report:7', 'period', 120))
    app.send_task('t', queue='uq2', countdown=60, headers=unique_headers('later'))
    base = [CELERY, '--broker', streams_url(redis_server), 'streams', '--prefix', prefix, 'unique']
    table = subprocess.run(base, capture_output=True, text=True, env=clean_env(), timeout=60)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith('QUEUE'))
    assert lines[header].split() == ['QUEUE', 'KEY', 'MODE', 'TASK', 'ID', 'TIME', 'LEFT']
    row = lines[header + 1].split()
    assert row[:4] == ['uq', 'report:7', 'period', first.id] and 110 < float(row[4][:-1]) <= 120
    assert lines[header + 2].split()[:4] == ['uq2', 'later', 'until_done', '(scheduled)']
    document = subprocess.run(base + ['--json', '-Q', 'uq'], capture_output=True, text=True,
                              env=clean_env(), timeout=60)
    keys = json.loads(document.stdout)['keys']
    assert [(k['queue'], k['key'], k['mode'], k['task_id']) for k in keys] == [
        ('uq', 'report:7', 'period', first.id)]


# -- the hot path ------------------------------------------------------------------------------

def test_a_message_without_a_key_takes_the_packed_path(make_app, r, keys, monkeypatch):
    """No script runs for a message without a key (the hand-packed XADD), one for one with."""
    app = make_app()
    app.send_task('t', queue='uq')   # connected, declared
    before = int(r.info('commandstats').get('cmdstat_evalsha', {}).get('calls', 0))
    app.send_task('t', queue='uq')
    assert int(r.info('commandstats').get('cmdstat_evalsha', {}).get('calls', 0)) == before
    app.send_task('t', queue='uq', headers=unique_headers('k'))
    assert int(r.info('commandstats')['cmdstat_evalsha']['calls']) == before + 1
    wait_until(lambda: len(entries(r, keys, 'uq')) == 3)
