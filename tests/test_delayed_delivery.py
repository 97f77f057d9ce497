"""Delayed delivery: countdowns and ETAs wait in Redis (the queue's schedule), not in a worker.

Kombu-level tests publish and move entries on a real server; the end-to-end
tests run real ``celery worker`` processes of ``tests/apps/delayed.py`` (the
e2e app plus tasks that record their lateness and retry with a countdown) and
publish from a Celery client in the test process, with countdowns of 2-3 s.
"""
from __future__ import annotations

import json
import threading
import time
from collections import Counter
from datetime import datetime, timedelta, timezone

import pytest
import redis
from celery import Celery
from kombu import Connection, Exchange, Producer, Queue

import celery_streams.keys  # noqa: F401  (registers redis-streams://)
from celery_streams import admin
from celery_streams.keys import Keys
from celery_streams.options import Options
from celery_streams.scheduler import PROMOTE_STEP, eta_ms, parse_member
from celery_streams.scripts import Scripts
from tests.helpers import streams_url, wait_until
from tests.workers import Worker, app_env

pytestmark = [pytest.mark.timeout(90)]

APP = 'tests.apps.delayed'
TASKS = 'tests.apps.delayed.'
E2E = 'tests.apps.e2e.'
FAST = ('--without-gossip', '--without-mingle', '--without-heartbeat')


# -- rig ----------------------------------------------------------------------

def eta_in(seconds: float) -> str:
    return (datetime.now(timezone.utc) + timedelta(seconds=seconds)).isoformat()


def task_message(token, eta=None, **headers):
    """Celery-like headers: a task name, an id and an ETA."""
    headers = {'task': 'demo', 'id': token, **headers}
    if eta is not None:
        headers['eta'] = eta
    return headers


def conn_of(server, prefix, **options):
    return Connection(streams_url(server), transport_options={'global_keyprefix': prefix, **options})


def scheduled_of(r, keys, queue):
    return r.zrange(keys.scheduled(queue), 0, -1, withscores=True)


def stream_lengths(r, keys, queue):
    return {bucket: r.xlen(keys.stream(queue, bucket)) for bucket in keys.priority_steps
            if r.exists(keys.stream(queue, bucket))}


def pending_of(r, keys, queue):
    total = 0
    for bucket in keys.priority_steps:
        stream = keys.stream(queue, bucket)
        if r.exists(stream):
            total += sum(g['pending'] for g in r.xinfo_groups(stream))
    return total


@pytest.fixture
def start_worker(redis_server, prefix):
    started = []

    def start(*args, name='w1', server=None, **env):
        worker = Worker(app_env(server or redis_server, prefix, app=APP, **env), *args, *FAST,
                        name=name, app=APP)
        started.append(worker)
        return worker.start()

    yield start
    for worker in started:
        worker.stop(timeout=5)


@pytest.fixture
def make_client(redis_server, prefix):
    made = []

    def make(server=None, **options):
        server = server or redis_server
        app = Celery('client', broker=streams_url(server),
                     backend='redis://127.0.0.1:%d/1' % server.port)
        app.conf.broker_transport_options = {'global_keyprefix': prefix, **options}
        made.append(app)
        return app

    yield make
    for app in made:
        app.close()


@pytest.fixture
def client_app(make_client):
    return make_client()


@pytest.fixture
def journal(redis_server, prefix):
    """What the e2e tasks recorded (db 1): ``journal('ran')``, ``journal('lateness')``..."""
    clients = {}

    def listed(what, server=None):
        server = server or redis_server
        client = clients.setdefault(server.port, redis.Redis(port=server.port, db=1))
        return [item.decode() for item in client.lrange('e2e:%s:%s' % (what, prefix), 0, -1)]

    yield listed
    for client in clients.values():
        client.close()


def tail(worker, chars=3000):
    text = worker.text()
    return text[text.find('ready.') if 'ready.' in text else 0:][-chars:]


def lateness(journal, token, server=None):
    for line in journal('lateness', server):
        name, _, seconds = line.rpartition(':')
        if name == token:
            return float(seconds)
    return None


# -- the parts ------------------------------------------------------------------

def test_options_and_keys():
    assert Options().delayed_delivery is True and Options().delayed_delivery_threshold == 1.0
    parsed = Options.from_transport_options({'delayed_delivery': 'false',
                                             'delayed_delivery_threshold': '2.5'})
    assert parsed.delayed_delivery is False and parsed.delayed_delivery_threshold == 2.5
    for bad in ({'delayed_delivery': 'maybe'}, {'delayed_delivery_threshold': -1},
                {'delayed_delivery_threshold': 'soon'}):
        with pytest.raises(ValueError):
            Options.from_transport_options(bad)
    keys = Keys('p:')
    assert keys.scheduled('q') == 'p:celery-streams:q:{q}:scheduled'
    info = keys.parse(keys.scheduled('a:b'))
    assert (info.queue, info.role, info.detail) == ('a:b', 'scheduled', None)
    assert eta_ms({'headers': {'eta': '2030-01-01T00:00:00'}}) == eta_ms(
        {'headers': {'eta': '2030-01-01T01:00:00+01:00'}}) == 1893456000000.0   # naive = UTC
    assert eta_ms({'headers': {'eta': '2030-01-01T00:00:00Z'}}) == 1893456000000.0
    assert eta_ms({'headers': {'eta': 'tomorrow'}}) is None and eta_ms({'headers': {}}) is None


def test_publish_schedules_through_every_path_and_keeps_the_bucket(redis_server, prefix, r, keys,
                                                                   unique_name):
    """Default exchange, publish batch, direct (route script) and topic: into the schedule,
    each member with its bucket; fanout and near ETAs: into the stream."""
    name = unique_name
    direct = Queue(name + 'd', Exchange(name + 'x', 'direct'), 'rk')
    topic = Queue(name + 't', Exchange(name + 'tx', 'topic'), 'a.#')
    fan = Queue(name + 'f', Exchange(name + 'fx', 'fanout'))
    plain = Queue(name, Exchange(name), name)
    with conn_of(redis_server, prefix) as conn:
        producer = Producer(conn.default_channel)
        later, soon = eta_in(30), eta_in(0.5)
        producer.publish({'n': 1}, routing_key=name, declare=[plain],
                         headers=task_message('t1', later), priority=7)
        producer.publish({'n': 1}, routing_key=name, headers=task_message('t1', later), priority=7)
        producer.publish({'n': 2}, routing_key=name, headers=task_message('t2', soon))
        producer.publish({'n': 3}, exchange=direct.exchange, routing_key='rk', declare=[direct],
                         headers=task_message('t3', later), priority=4)
        producer.publish({'n': 4}, exchange=topic.exchange, routing_key='a.b', declare=[topic],
                         headers=task_message('t4', later))
        producer.publish({'n': 5}, exchange=fan.exchange, routing_key='', declare=[fan],
                         headers=task_message('t5', later))
        with _batch(conn) as batch:
            batch.publish(conn.default_channel.prepare_message(
                '{"n": 6}', headers=task_message('t6', later)), exchange='', routing_key=name)
    members = {q: [parse_member(m) for m, _ in scheduled_of(r, keys, q)]
               for q in (name, name + 'd', name + 't')}
    assert sorted(m.bucket for m in members[name]) == [0, 6, 6]   # equal messages stay two
    assert len({m.token for m in members[name]}) == 3
    assert [m.bucket for m in members[name + 'd']] == [3]
    assert [json.loads(m.payload)['headers']['id'] for m in members[name + 't']] == ['t4']
    assert stream_lengths(r, keys, name) == {0: 1}   # t2: due within 1 s; no consumer yet
    assert r.xlen(keys.stream(name + 'f')) == 1 and not r.exists(keys.scheduled(name + 'f'))
    due = [score for _, score in scheduled_of(r, keys, name)]
    assert all(abs(score - eta_ms({'headers': {'eta': later}})) <= 1 for score in due)


class _batch:
    """``with _batch(conn) as batch``: a kombu publish batch of the default channel."""

    def __init__(self, conn):
        self.batch = conn.default_channel.create_publish_batch(100)

    def __enter__(self):
        return self.batch

    def __exit__(self, *exc):
        self.batch.flush()
        self.batch.close()


def test_delayed_delivery_off_and_threshold(redis_server, prefix, r, keys, unique_name):
    name = unique_name
    q = Queue(name, Exchange(name), name)
    with conn_of(redis_server, prefix, delayed_delivery=False) as off, \
            conn_of(redis_server, prefix, delayed_delivery_threshold=60) as high:
        Producer(off.default_channel).publish({}, routing_key=name, declare=[q],
                                              headers=task_message('a', eta_in(30)))
        Producer(high.default_channel).publish({}, routing_key=name,
                                               headers=task_message('b', eta_in(30)))
        Producer(high.default_channel).publish({}, routing_key=name,
                                               headers=task_message('c', eta_in(90)))
        Producer(high.default_channel).publish({}, routing_key=name,   # not a Celery task
                                               headers={'eta': eta_in(90)})
    assert r.xlen(keys.stream(name)) == 3
    assert [json.loads(parse_member(m).payload)['headers']['id']
            for m, _ in scheduled_of(r, keys, name)] == ['c']


def test_promote_moves_due_entries_once_in_due_order_in_steps(redis_server, prefix, r, keys,
                                                              unique_name):
    """Eight threads race on 2.5 steps of due entries: each moves once, in due order, into the
    stream of its bucket; an unparsable member goes whole to the main stream; later ones stay."""
    name = unique_name
    scripts = Scripts(r)
    sched, streams = keys.scheduled(name), keys.streams(name)
    now = int(time.time() * 1000)
    count = PROMOTE_STEP * 5 // 2
    r.zadd(sched, {'%d|1700000000000000|%06d|{"n": %d}' % (6 if i % 2 else 0, i, i): now - count + i
                   for i in range(count)})
    r.zadd(sched, {'garbage': now - 1, '0|1|x|{"later": 1}': now + 60_000})
    args = [PROMOTE_STEP, 0, *keys.priority_steps]
    results = []

    def promote():
        results.append(scripts.promote(keys=[sched, *streams], args=args))

    threads = [threading.Thread(target=promote) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(moved for moved, _ in results) == count + 1
    assert max(moved for moved, _ in results) == PROMOTE_STEP
    assert {next_due for moved, next_due in results if moved < PROMOTE_STEP} == {now + 60_000}
    main = [f[b'payload'].decode() for _, f in r.xrange(streams[0])]
    assert main[-1] == 'garbage'
    assert [json.loads(p)['n'] for p in main[:-1]] == list(range(0, count, 2))
    assert [json.loads(f[b'payload'])['n'] for _, f in r.xrange(keys.stream(name, 6))] == \
        list(range(1, count, 2))
    assert r.zcard(sched) == 1
    assert scripts.promote(keys=[sched, *streams], args=args) == [0, now + 60_000]


def test_a_consumer_receives_a_scheduled_message_when_due(redis_server, prefix, r, keys,
                                                           unique_name):
    """Plain kombu (drain_events): the message waits in Redis, then comes within ~50 ms of due."""
    name = unique_name
    q = Queue(name, Exchange(name), name)
    with conn_of(redis_server, prefix) as conn, conn_of(redis_server, prefix) as pub:
        got = []
        with conn.Consumer([q], callbacks=[lambda body, m: (got.append(time.time()), m.ack())]):
            due = time.time() + 1.5
            eta = datetime.fromtimestamp(due, timezone.utc).isoformat()
            Producer(pub.default_channel).publish({'x': 1}, routing_key=name,
                                                  headers=task_message('k', eta))
            assert r.zcard(keys.scheduled(name)) == 1 and r.xlen(keys.stream(name)) == 0
            deadline = time.monotonic() + 10
            while not got and time.monotonic() < deadline:
                try:
                    conn.drain_events(timeout=0.5)
                except TimeoutError:
                    pass
    assert got, 'the scheduled message never came'
    late = got[0] - due
    print('\n[drain_events] lateness %.1f ms' % (late * 1000))
    assert -0.01 < late < 0.25
    assert r.zcard(keys.scheduled(name)) == 0


def test_purge_and_queue_delete_take_the_schedule(redis_server, prefix, r, keys, unique_name):
    name = unique_name
    q = Queue(name, Exchange(name), name)
    with conn_of(redis_server, prefix) as conn:
        producer = Producer(conn.default_channel)
        producer.publish({}, routing_key=name, declare=[q], headers=task_message('a', eta_in(30)))
        producer.publish({}, routing_key=name, headers=task_message('b'))
        assert q(conn.default_channel).purge() == 2
        assert not r.exists(keys.scheduled(name)) and r.xlen(keys.stream(name)) == 0
        producer.publish({}, routing_key=name, headers=task_message('c', eta_in(30)))
        q(conn.default_channel).delete()
        assert not r.exists(keys.scheduled(name))


def test_an_acl_user_of_the_transport_schedules_and_moves(redis_server, r, unique_name):
    """``keys.acl_rules`` allow what delayed delivery sends: publish, move, purge."""
    prefix, name = unique_name + ':', unique_name
    r.execute_command('ACL', 'SETUSER', unique_name, 'reset', 'on', '>pw-' + unique_name,
                      *celery_streams.keys.acl_rules(prefix))
    url = 'redis-streams://%s:pw-%s@127.0.0.1:%d/0' % (unique_name, unique_name, redis_server.port)
    q = Queue(name, Exchange(name, 'direct'), name)
    with Connection(url, transport_options={'global_keyprefix': prefix}) as conn:
        producer = Producer(conn.default_channel)
        producer.publish({'n': 1}, exchange=q.exchange, routing_key=name, declare=[q],
                         headers=task_message('a', eta_in(1.3)))
        producer.publish({'n': 2}, routing_key=name, headers=task_message('b', eta_in(1.3)))
        assert r.zcard(Keys(prefix).scheduled(name)) == 2
        got = []
        with conn.Consumer([q], callbacks=[lambda body, m: (got.append(body), m.ack())]):
            deadline = time.monotonic() + 10
            while len(got) < 2 and time.monotonic() < deadline:
                try:
                    conn.drain_events(timeout=0.5)
                except TimeoutError:
                    pass
        assert sorted(b['n'] for b in got) == [1, 2]
        producer.publish({}, routing_key=name, headers=task_message('c', eta_in(30)))
        assert q(conn.default_channel).purge() == 1


# -- real workers -----------------------------------------------------------------

def test_a_countdown_task_waits_in_redis_then_runs_on_time(start_worker, client_app, journal, r,
                                                           keys):
    """Sent to a running worker: in the schedule (not the stream, nothing pending) until due,
    then run within a bound of its ETA."""
    worker = start_worker('-P', 'solo')
    result = client_app.send_task(TASKS + 'record_lateness', args=('c1',), countdown=2.5)
    time.sleep(1.0)
    assert r.zcard(keys.scheduled('celery')) == 1
    assert sum(stream_lengths(r, keys, 'celery').values()) == 0
    assert pending_of(r, keys, 'celery') == 0
    assert result.id not in worker.text()   # the worker holds nothing
    assert wait_until(lambda: 'c1' in journal('ran'), 10), tail(worker)
    late = lateness(journal, 'c1')
    print('\n[worker -P solo] lateness %.1f ms' % (late * 1000))
    assert -0.01 < late < 0.3, late
    assert r.zcard(keys.scheduled('celery')) == 0


@pytest.mark.one_server
def test_priority_bucket_kept_and_moved_while_the_worker_is_full(start_worker, client_app, journal,
                                                                 r, keys):
    """A priority-7 countdown task moves into bucket 6's stream when due, even while the only
    worker's window is full; it runs once the worker is free."""
    worker = start_worker('-c', '1', E2E_PREFETCH=1, E2E_ACKS_LATE=1)
    client_app.send_task(E2E + 'sleep_then_record', args=(6, 'long'))
    assert wait_until(lambda: 'long' in journal('started'), 15), tail(worker)
    client_app.send_task(E2E + 'record', args=('prio',), priority=7, countdown=2)
    [(member, _)] = scheduled_of(r, keys, 'celery')
    assert parse_member(member).bucket == 6
    assert wait_until(lambda: r.xlen(keys.stream('celery', 6)) == 1, 6), tail(worker)
    assert r.zcard(keys.scheduled('celery')) == 0 and 'prio' not in journal('ran')
    assert wait_until(lambda: 'prio' in journal('ran'), 15), tail(worker)


def test_nothing_is_lost_while_no_worker_runs(start_worker, client_app, journal, r, keys):
    """Scheduled with no worker running, due before one starts: the worker runs it at once."""
    client_app.send_task(TASKS + 'record_lateness', args=('orphan',), countdown=2)
    time.sleep(2.5)
    assert r.zcard(keys.scheduled('celery')) == 1 and r.xlen(keys.stream('celery')) == 0
    worker = start_worker('-P', 'solo')
    assert wait_until(lambda: 'orphan' in journal('ran'), 10), tail(worker)
    assert r.zcard(keys.scheduled('celery')) == 0


def test_two_workers_racing_run_each_task_once(start_worker, client_app, journal, r, keys):
    start_worker('-P', 'solo', name='w1')
    start_worker('-P', 'solo', name='w2')
    eta = datetime.now(timezone.utc) + timedelta(seconds=2.5)
    tokens = ['race%02d' % i for i in range(30)]
    for token in tokens:
        client_app.send_task(E2E + 'record', args=(token,), eta=eta)
    assert r.zcard(keys.scheduled('celery')) == len(tokens)
    assert wait_until(lambda: len(journal('ran')) >= len(tokens), 15)
    time.sleep(0.5)   # kept: a task moved twice would run again by now
    assert Counter(journal('ran')) == Counter(tokens)
    assert r.zcard(keys.scheduled('celery')) == 0


def test_expires_before_due_ends_revoked(start_worker, client_app, journal):
    worker = start_worker('-P', 'solo')
    result = client_app.send_task(E2E + 'record', args=('expired',), countdown=2, expires=1)
    assert wait_until(lambda: result.state == 'REVOKED', 10), (result.state, tail(worker))
    assert 'expired' not in journal('ran')


def test_a_revoked_scheduled_task_never_runs(start_worker, client_app, journal, r, keys):
    worker = start_worker('-P', 'solo')
    result = client_app.send_task(E2E + 'record', args=('revoked',), countdown=2)
    canary = client_app.send_task(E2E + 'record', args=('canary',), countdown=2.5)
    result.revoke()
    assert wait_until(lambda: 'canary' in journal('ran'), 10), tail(worker)
    assert r.zcard(keys.scheduled('celery')) == 0
    assert 'revoked' not in journal('ran')
    assert 'Discarding revoked task' in worker.text() and result.state == 'REVOKED'
    assert wait_until(lambda: canary.state == 'SUCCESS', 5)   # recorded, then stored


def test_a_retry_with_countdown_waits_in_redis(start_worker, client_app, journal, r, keys):
    """``self.retry(countdown=2)`` from a prefork pool process, through the direct ``celery``
    exchange (the route script): the retry waits in the schedule, then runs once."""
    worker = start_worker('-c', '1')
    client_app.send_task(TASKS + 'retry_later', args=('r1',), exchange='celery', routing_key='celery')
    assert wait_until(lambda: journal('attempts') == ['r1:0'], 10), tail(worker)
    assert wait_until(lambda: r.zcard(keys.scheduled('celery')) == 1, 5), tail(worker)
    assert wait_until(lambda: pending_of(r, keys, 'celery') == 0, 5)
    assert 'r1' not in journal('ran')
    assert wait_until(lambda: 'r1' in journal('ran'), 10), tail(worker)
    assert journal('attempts') == ['r1:0', 'r1:1']


def test_delayed_delivery_off_keeps_the_task_in_the_worker(start_worker, make_client, journal, r,
                                                           keys):
    worker = start_worker('-P', 'solo', E2E_DELAYED=0)
    client = make_client(delayed_delivery=False)
    result = client.send_task(E2E + 'record', args=('held',), countdown=2.5)
    assert wait_until(lambda: '[%s] received' % result.id in worker.text(), 5), tail(worker)
    assert r.zcard(keys.scheduled('celery')) == 0
    assert pending_of(r, keys, 'celery') == 1   # held by the worker until due
    assert wait_until(lambda: 'held' in journal('ran'), 10), tail(worker)


def test_the_schedule_survives_a_redis_crash_with_aof(fresh_redis_server, start_worker, make_client,
                                                      journal, prefix):
    server = fresh_redis_server(extra_args=('--appendonly', 'yes', '--appendfsync', 'always'))
    keys = Keys(prefix)
    client = make_client(server)
    client.send_task(TASKS + 'record_lateness', args=('aof',), countdown=2)
    client.close()
    server.kill()
    server.start()
    r = server.client()
    assert r.zcard(keys.scheduled('celery')) == 1
    worker = start_worker('-P', 'solo', server=server)
    assert wait_until(lambda: 'aof' in journal('ran', server), 15), tail(worker)
    assert r.zcard(keys.scheduled('celery')) == 0
    r.close()


# -- the operator's view ------------------------------------------------------------------

@pytest.fixture
def scheduled_three(client_app, r, keys):
    """Three tasks scheduled 60, 61 and 62 s ahead (priorities 0, 5, 9), no worker."""
    ids = [client_app.send_task(E2E + 'record', args=('s%d' % i,), countdown=60 + i,
                                priority=priority).id
           for i, priority in enumerate((0, 5, 9))]
    assert r.zcard(keys.scheduled('celery')) == 3
    return ids


def test_status_shows_the_schedule(run, redis_server, prefix, scheduled_three):
    url = streams_url(redis_server)
    found = admin.status(redis_server.client(), global_keyprefix=prefix)
    [celery] = [q for q in found.queues if q.name == 'celery']
    assert celery.scheduled == 3 and 58 < celery.next_due_in <= 60
    result = run('--broker', url, 'streams', '--prefix', prefix, 'status')
    assert result.exit_code == 0, result.output
    header = next(line for line in result.output.splitlines() if line.startswith('QUEUE'))
    row = next(line for line in result.output.splitlines() if line.startswith('celery '))
    assert 'SCHED' in header
    assert row.split()[header.split().index('SCHED')] == '3', result.output
    doc = json.loads(run('--broker', url, 'streams', '--prefix', prefix, 'status', '--json').output)
    [q] = [q for q in doc['queues'] if q['name'] == 'celery']
    assert q['scheduled'] == 3 and 58 < q['next_due_in'] <= 60


def test_scheduled_lists_the_next_messages(run, redis_server, prefix, scheduled_three):
    url = streams_url(redis_server)
    result = run('--broker', url, 'streams', '--prefix', prefix, 'scheduled', '-Q', 'celery',
                 '--limit', '2')
    assert result.exit_code == 0, result.output
    print(result.output)
    lines = result.output.splitlines()
    assert "Queue 'celery': 3 scheduled, the next 2:" in result.output
    rows = [line for line in lines if E2E + 'record' in line]
    assert [row.split()[-1] for row in rows] == ['0', '5']   # the priority, in due order
    assert scheduled_three[0] in rows[0] and scheduled_three[1] in rows[1]
    doc = json.loads(run('--broker', url, 'streams', '--prefix', prefix, 'scheduled', '-Q', 'celery',
                         '--json').output)
    [q] = doc['queues']
    assert q['queue'] == 'celery' and q['scheduled'] == 3
    assert [m['task_id'] for m in q['messages']] == scheduled_three
    assert [m['priority'] for m in q['messages']] == [0, 5, 9]
    assert [m['bucket'] for m in q['messages']] == [0, 3, 9]
    assert all(58 < m['due_in'] < 63 and m['task'] == E2E + 'record' for m in q['messages'])
    unknown = run('--broker', url, 'streams', '--prefix', prefix, 'scheduled', '-Q', 'nope')
    assert unknown.exit_code == 1 and 'unknown queue' in unknown.output


def test_drain_removes_the_planned_schedule_unless_kept(run, redis_server, prefix, r, keys,
                                                        client_app, scheduled_three):
    url = streams_url(redis_server)
    kept = run('--broker', url, 'streams', '--prefix', prefix, 'drain', '-Q', 'celery', '-f',
               '--keep-scheduled')
    assert kept.exit_code == 0, kept.output
    assert 'Nothing to drain in 1 queue: celery.' in kept.output
    assert r.zcard(keys.scheduled('celery')) == 3
    dry = run('--broker', url, 'streams', '--prefix', prefix, 'drain', '-Q', 'celery', '--dry-run')
    assert "Would drain queue 'celery' (task): 0 messages, 0 pending entries, " \
        "3 scheduled messages;" in dry.output, dry.output
    assert 'Total: 0 messages, 3 scheduled messages and 0 pending entries from 1 queue.' in dry.output
    # the apply removes what the plan counted, not what was scheduled after it
    client = redis_server.client()
    plan = admin.drain(client, global_keyprefix=prefix, queues=['celery'], dry_run=True)
    assert plan[0].scheduled_removed == 3
    late = client_app.send_task(E2E + 'record', args=('after-plan',), countdown=60).id
    [done] = admin.apply_drain(client, plan, global_keyprefix=prefix)
    assert done.scheduled_removed == 3
    [(member, _)] = scheduled_of(r, keys, 'celery')
    assert json.loads(parse_member(member).payload)['headers']['id'] == late
    drained = run('--broker', url, 'streams', '--prefix', prefix, 'drain', '-Q', 'celery', '-f')
    assert ', 1 scheduled message;' in drained.output, drained.output
    assert r.zcard(keys.scheduled('celery')) == 0


def test_nuke_deletes_the_schedule(run, redis_server, prefix, r, keys, scheduled_three):
    result = run('--broker', streams_url(redis_server), 'streams', '--prefix', prefix, 'nuke', '-f')
    assert result.exit_code == 0, result.output
    assert '(schedules holding 3 messages)' in result.output
    assert '  key    %s' % keys.scheduled('celery') in result.output
    assert not r.exists(keys.scheduled('celery'))
