"""The fault suite: real servers, real ``celery worker`` processes, real faults.

Each test has a :class:`~tests.rigs.ServerRig` on a private server: workers run
``tests/apps/rig.py``, whose tasks record every execution into a journal on a
separate server (so killing, restarting or ``CLIENT KILL``ing the broker never
touches the records), and each test counts what was sent, run, lost and
duplicated. Every test prints its figures: run with ``-s``.
"""
from __future__ import annotations

import socket
import time
from collections import Counter

import pytest
import redis

import celery_streams  # noqa: F401  (registers redis-streams://)
from celery_streams import admin
from tests import rigs
from tests.helpers import wait_until
from tests.rigs import POISON, RECORD, Publisher, ServerRig

pytestmark = pytest.mark.slow

SERVER_KINDS = ['redis7', 'valkey8', 'redis6.2']
LOST_LINE = 'Connection to broker lost'


# -- rig ----------------------------------------------------------------------

journal_server = rigs.journal_server   # the fixture


@pytest.fixture
def make_rig(fresh_redis_server, journal_server, unique_name):
    """``make_rig(server_kind, server_args=(), **settings)``: a rig on a private server of
    that kind (started with ``server_args``), its workers with ``settings``."""
    made = []

    def make(server_kind='redis7', *, server_args=(), **settings):
        broker = fresh_redis_server(server_kind, extra_args=list(server_args))
        made.append(ServerRig(broker, journal_server, unique_name + ':', **settings))
        return made[-1]

    yield make
    for rig in made:
        rig.close()


@pytest.fixture
def report(report, capsys):
    """The session's ``report(**figures)``, with lines printed under the figures:
    ``report(*lines, **figures)``."""
    def report_lines(*lines, **figures):
        report(**figures)
        if lines:
            with capsys.disabled():
                print(*('  ' + line for line in lines), sep='\n', flush=True)
    return report_lines


def send(app, token, *args, **options):
    return app.send_task(RECORD, args=(token, *args), **options)


def tally(ran, tokens):
    """(lost, duplicated) among ``tokens`` in the Counter ``ran``."""
    lost = [t for t in tokens if ran[t] == 0]
    duplicated = {t: ran[t] for t in tokens if ran[t] > 1}
    return lost, duplicated


def duplicate_kinds(rig, duplicated):
    """Split duplicated tokens: ``redelivered`` (a message delivered again) or
    ``published_twice`` (every execution was a first delivery: two entries)."""
    redelivered = set(rig.listed('redelivered'))
    again = sorted(t for t in duplicated if t in redelivered)
    twice = sorted(t for t in duplicated if t not in redelivered)
    return {'redelivered': again, 'published_twice': twice}


def backlog(r, stream):
    """``(entries, pending)`` of ``stream`` (pending 0 while it has no group)."""
    try:
        pending = r.xpending(stream, 'celery')['pending']
    except redis.ResponseError:   # no group (yet)
        pending = 0
    return r.xlen(stream), pending


def settled(rig, queues=('celery',), timeout=5.0):
    """Wait until the queue streams hold nothing and nothing is pending; return what is left."""
    r = rig.redis()
    deadline = time.monotonic() + timeout
    while True:
        left = {}
        for queue in queues:
            entries, pending = backlog(r, rig.keys.stream(queue))
            if entries or pending:
                left[queue] = (entries, pending)
        if not left or time.monotonic() > deadline:
            r.close()
            return left
        time.sleep(0.1)


def waiting(rig, queues):
    """Messages in the streams of ``queues`` not delivered yet (a backlog)."""
    r = rig.redis()
    total = 0
    for queue in queues:
        entries, pending = backlog(r, rig.keys.stream(queue))
        total += entries - pending
    r.close()
    return total


def no_crash_loop(worker, settle=3.0):
    """The worker lives, and its count of lost connections stays put while it idles."""
    before = worker.count(LOST_LINE)
    time.sleep(settle)   # kept: idling is the test (a crash loop logs more lost connections)
    assert worker.alive(), worker.text()[-4000:]
    after = worker.count(LOST_LINE)
    assert after == before, 'the worker keeps losing its connection:\n' + worker.text()[-4000:]
    return after


# -- 1. kill -9 a worker mid-run ------------------------------------------------

@pytest.mark.parametrize('server_kind', SERVER_KINDS)
def test_killed_worker_loses_nothing(make_rig, report, server_kind):
    """kill -9 an ``acks_late`` worker mid-run: the other one finishes everything."""
    vt = 2.0
    rig = make_rig(server_kind, vt=vt, acks_late=1, prefetch=2)
    victim = rig.worker('-c', '2', name='victim')
    survivor = rig.worker('-c', '2', name='survivor')
    app = rig.client_app()
    tokens = ['k%d' % i for i in range(40)]
    for token in tokens:
        send(app, token, 0.2)
    deadline = time.monotonic() + 30
    while len(rig.listed('ran')) < 12 and time.monotonic() < deadline:
        time.sleep(0.02)
    victim.kill()
    killed_at = time.monotonic()
    victim_host = 'victim@' + socket.gethostname()
    started_by_victim = set(rig.listed('started@' + victim_host))
    in_flight = started_by_victim - set(rig.listed('finished@' + victim_host))
    took = rig.wait_ran(tokens, timeout=30)
    recovery = time.monotonic() - killed_at
    time.sleep(vt)   # kept: anything reclaimed twice would show now (an absence)
    lost, duplicated = tally(rig.ran(), tokens)
    report(server=server_kind, sent=len(tokens), ran=sum(rig.ran().values()),
           victim_started=len(started_by_victim), victim_in_flight=len(in_flight),
           lost=len(lost), duplicated=len(duplicated), recovery=recovery,
           taken_over=survivor.taken_over())
    assert started_by_victim, 'the victim ran nothing: the test proves nothing'
    assert took is not None and not lost, lost
    # only tasks the victim had started can run twice
    assert set(duplicated) <= started_by_victim, duplicated
    assert survivor.taken_over() >= len(in_flight)
    assert settled(rig) == {}


# -- 2. liveness: long countdowns and long tasks -----------------------------------

@pytest.mark.parametrize('pool', ['prefork', 'solo'])
def test_live_workers_keep_long_countdowns_and_long_tasks(make_rig, report, pool):
    """A countdown and a task of 3x visibility_timeout, two live workers: each runs once.

    The countdowns are held by the workers (``delayed_delivery`` off for the publisher;
    with it on they would wait in Redis, see tests/test_delayed_delivery.py).
    """
    vt = 1.5
    rig = make_rig(vt=vt, acks_late=1, prefetch=2)
    args = ('-P', pool) if pool == 'solo' else ('-c', '2')
    workers = [rig.worker(*args, name='w%d' % i) for i in (1, 2)]
    app = rig.client_app(delayed_delivery=False)
    countdowns = ['eta%d' % i for i in range(2)]
    longs = ['long%d' % i for i in range(2)]
    for token in countdowns:
        send(app, token, countdown=3 * vt)
    for token in longs:
        send(app, token, 3 * vt)
    took = rig.wait_ran(countdowns + longs, timeout=30)
    time.sleep(2 * vt)   # kept: a message wrongly taken over would run again by now
    ran = rig.ran()
    lost, duplicated = tally(ran, countdowns + longs)
    report(pool=pool, visibility_timeout=vt, sent=4, ran=sum(ran.values()), lost=len(lost),
           duplicated=len(duplicated), all_ran_after=took,
           taken_over=sum(w.taken_over() for w in workers))
    assert not lost and not duplicated, (lost, duplicated)
    assert took >= 3 * vt
    assert not any(w.taken_over() for w in workers)
    assert settled(rig) == {}


# -- 3. Redis restarts ------------------------------------------------------------

@pytest.mark.parametrize('pool, downtime', [('prefork', 0.0), ('solo', 3.0)])
def test_worker_reconnects_after_a_restart_without_persistence(make_rig, report, pool, downtime):
    """Everything sent once the server is back runs; the worker reconnects by itself.

    ``downtime`` 0: a graceful restart; otherwise the server is killed and comes
    back that many seconds later (the worker retries meanwhile).
    """
    rig = make_rig(vt=2)
    worker = rig.worker(*(('-P', 'solo') if pool == 'solo' else ('-c', '2')))
    app = rig.client_app()
    before = ['b%d' % i for i in range(5)]
    for token in before:
        send(app, token)
    assert rig.wait_ran(before, timeout=20) is not None
    if downtime:
        rig.broker.kill()
        time.sleep(downtime)   # kept: the server is down that long (the fault itself)
        rig.broker.start()
    else:
        rig.broker.restart()   # no persistence: every key is gone
    restarted_at = time.monotonic()
    sent, failed = [], 0
    for i in range(30):
        token = 'a%d' % i
        try:
            send(app, token)
            sent.append(token)
        except Exception:
            failed += 1
        time.sleep(0.005)
    first = rig.wait_ran(sent[:1], timeout=30)
    first = None if first is None else time.monotonic() - restarted_at
    took = rig.wait_ran(sent, timeout=30)
    recovery = time.monotonic() - restarted_at
    lost, duplicated = tally(rig.ran(), sent)
    lost_lines = no_crash_loop(worker)
    report(pool=pool, downtime=downtime, sent_after_restart=len(sent), publish_failed=failed,
           lost=len(lost), duplicated=len(duplicated), first_ran_after=first,
           all_ran_after=recovery, connection_lost_lines=lost_lines,
           retry_lines=worker.count('Trying again in'))
    assert took is not None and not lost, lost
    assert 1 <= lost_lines <= 3, worker.text()[-4000:]
    assert settled(rig) == {}


@pytest.mark.parametrize('how', ['kill', 'restart'])
def test_aof_loses_no_returned_publish(make_rig, report, how):
    """``appendfsync always``: a publish that returned survives a crash or a restart."""
    rig = make_rig(vt=2, server_args=['--appendonly', 'yes', '--appendfsync', 'always'])
    worker = rig.worker('-c', '2')
    app = rig.client_app()
    # p0..p299 in order, fast; 20 ms of rest after a publish that raised
    publisher = Publisher(app, count=300, interval=0, pause_after_failure=0.02, retry=False)
    publisher.start()
    deadline = time.monotonic() + 20
    while len(publisher.published) < 100 and time.monotonic() < deadline:
        time.sleep(0.005)
    if how == 'kill':
        rig.broker.kill()
        time.sleep(0.3)   # kept: the server is down that long (the fault itself)
        rig.broker.start()
    else:
        rig.broker.restart()
    back_at = time.monotonic()
    publisher.join(60)
    publisher.stop()
    returned = publisher.tokens()
    took = rig.wait_ran(returned, timeout=40)
    recovery = time.monotonic() - back_at
    lost, duplicated = tally(rig.ran(), returned)
    lost_lines = no_crash_loop(worker)
    report(how=how, published=len(publisher.published), returned=len(returned),
           failed=len(publisher.failed), lost=len(lost), duplicated=len(duplicated),
           all_ran_after=recovery, connection_lost_lines=lost_lines, taken_over=worker.taken_over(),
           **duplicate_kinds(rig, duplicated))
    assert took is not None and not lost, lost
    assert settled(rig) == {}


# -- 4. nuke and drain under continuous publishing ----------------------------------

@pytest.mark.parametrize('operation, server_kind', [
    ('nuke', 'redis7'), ('drain', 'redis7'), ('nuke', 'redis6.2'), ('nuke', 'valkey8')])
def test_nuke_and_drain_under_continuous_publishing(make_rig, report, operation, server_kind):
    """Nothing published after the operation returned is lost (direct and topic routes).

    The publisher outpaces the worker, so each operation finds a backlog to remove.
    """
    rig = make_rig(server_kind, vt=2, routes=1)
    worker = rig.worker('-c', '2', queues=('direct_q', 'topic_q'))
    app = rig.client_app(routes=True)
    # c0, c2... to direct_q, c1, c3... to topic_q
    publisher = Publisher(app, stem='c', seconds=0.05, interval=0.005, routes=(
        {'queue': 'direct_q'}, {'queue': 'topic_q', 'routing_key': 'jobs.fast'}))
    publisher.start()
    published = publisher.published   # (token, began, returned, ok)
    client = rig.redis()
    ops = []   # (began, returned)
    for _ in range(2):
        wait_until(lambda: waiting(rig, ('direct_q', 'topic_q')) >= 20, timeout=20,
                   what='a backlog of 20 messages for the operation to remove')
        began = time.monotonic()
        if operation == 'nuke':
            admin.nuke(client, global_keyprefix=rig.prefix)
        else:
            admin.drain(client, global_keyprefix=rig.prefix)
        ops.append((began, time.monotonic()))
    # how soon the first message published after the last operation runs
    op_end = ops[-1][1]
    while not any(began > op_end for _, began, _, _ in published[-5:]):
        time.sleep(0.005)
    first = next(t for t, began, _, _ in published if began > op_end)
    first_ran = rig.wait_ran([first], timeout=20)
    first_ran = None if first_ran is None else time.monotonic() - op_end
    time.sleep(max(0.0, 1.0 - (time.monotonic() - op_end)))   # kept: publish 1 s past the last op
    publisher.stop()
    ok, failed = publisher.tokens(), publisher.failed
    # published after the last operation returned (what the first one left may
    # rightly be removed by the second)
    after = publisher.began_after(op_end)
    overlapping = [t for t, began, returned, good in published if good
                   and any(began <= op_end and returned >= op_began for op_began, op_end in ops)]
    took = rig.wait_ran(after, timeout=40)
    time.sleep(0.5)   # kept: time for a duplicate run to show (an absence)
    ran = rig.ran()
    lost, duplicated = tally(ran, after)
    removed = [t for t in ok if ran[t] == 0 and t not in after]
    report(operation=operation, server=server_kind, published=len(published), failed=len(failed),
           after_last_op=len(after), lost_after=len(lost), duplicated=len(duplicated),
           overlapping_an_op=len(overlapping), removed_by_ops=len(removed),
           first_after_op_ran_in=first_ran,
           lost_by_queue=dict(Counter('direct' if int(t[1:]) % 2 == 0 else 'topic' for t in lost)),
           healed_lines=worker.count('was gone'))
    assert not failed
    assert took is not None and not lost, sorted(lost, key=lambda t: int(t[1:]))
    assert removed, 'the operations found no backlog: the test proves nothing'
    assert worker.alive()
    assert settled(rig, ('direct_q', 'topic_q')) == {}


# -- 5. malformed entries -------------------------------------------------------------

@pytest.mark.parametrize('server_kind', SERVER_KINDS)
def test_malformed_entries_are_dead_lettered(make_rig, report, server_kind):
    rig = make_rig(server_kind, vt=2)
    worker = rig.worker('-c', '2')
    app = rig.client_app()
    r = rig.redis()
    stream, dead = rig.keys.stream('celery'), rig.keys.dead_letters('celery')
    first = ['g%d' % i for i in range(5)]
    for token in first:
        send(app, token)
    assert rig.wait_ran(first) is not None
    # a real task envelope, to corrupt one field of it
    send(app, 'template', queue='scratch')
    (_, template), = r.xrange(rig.keys.stream('scratch'))
    bad = [
        {'payload': 'not json {'},
        {'other': 'no payload field'},
        {'payload': b'\xff\xfe\x00\x80\x81 binary junk \x00'},
        {'payload': 'x' * (1 << 20)},                     # 1 MB, not JSON
        {'payload': '{"body": "no properties"}'},
        {'payload': '[1, 2, 3]'},
        {b'payload': template[b'payload'], 'deliveries': 'many'},
    ]
    second = ['h%d' % i for i in range(10)]
    for i, fields in enumerate(bad):
        r.xadd(stream, fields)
        send(app, second[i])
    for token in second[len(bad):]:
        send(app, token)
    took = rig.wait_ran(first + second, timeout=20)
    deadline = time.monotonic() + 10
    while r.xlen(dead) < len(bad) and time.monotonic() < deadline:
        time.sleep(0.05)
    settled(rig)   # every entry so far taken and acked (or dead-lettered)
    third = ['i%d' % i for i in range(5)]
    for token in third:
        send(app, token)
    assert rig.wait_ran(third, timeout=20) is not None
    ran = rig.ran()
    lost, duplicated = tally(ran, first + second + third)
    dead_letters = r.xrange(dead)
    reasons = [entry[b'reason'].decode()[:70] for _, entry in dead_letters]
    report(*reasons, server=server_kind, bad=len(bad), dead_lettered=len(dead_letters),
           queue_len=r.xlen(stream), pending=r.xpending(stream, 'celery')['pending'],
           good_sent=len(first + second + third), lost=len(lost), duplicated=len(duplicated),
           log_lines=worker.count('to its dead letters'))
    assert took is not None and not lost and not duplicated
    assert len(dead_letters) == len(bad), reasons
    assert r.xlen(stream) == 0
    assert r.xpending(stream, 'celery')['pending'] == 0
    huge = [e for _, e in dead_letters if len(e.get(b'field:payload', b'')) == 1 << 20]
    assert len(huge) == 1
    assert worker.alive()


# -- 6. client connections killed ------------------------------------------------------

@pytest.mark.parametrize('server_kind, pool', [
    ('redis7', 'prefork'), ('valkey8', 'prefork'), ('redis6.2', 'prefork'), ('redis7', 'solo')])
def test_killed_client_connections(make_rig, report, server_kind, pool):
    """``CLIENT KILL TYPE normal`` several times mid-run: the worker resumes, every task runs."""
    rig = make_rig(server_kind, vt=2)
    worker = rig.worker(*(('-P', 'solo') if pool == 'solo' else ('-c', '2')))
    app = rig.client_app()
    admin_client = rig.redis()
    tokens = ['r%d' % i for i in range(40)]
    for token in tokens:
        send(app, token, 0.1)   # about 2 s of work for two processes
    kills, killed = 0, 0
    for round_ in range(4):
        time.sleep(0.5)   # kept: spreads the kills over the run (the fault itself)
        killed += admin_client.client_kill_filter(_type='normal', skipme=True)
        kills += 1
        batch = ['s%d-%d' % (round_, i) for i in range(5)]   # the publisher reconnects too
        for token in batch:
            send(app, token, 0.1)
        tokens += batch
    last_kill = time.monotonic()
    took = rig.wait_ran(tokens, timeout=40)
    recovery = time.monotonic() - last_kill
    lost, duplicated = tally(rig.ran(), tokens)
    lost_lines = no_crash_loop(worker)
    report(server=server_kind, pool=pool, sent=len(tokens), ran=sum(rig.ran().values()), kills=kills,
           connections_killed=killed, lost=len(lost), duplicated=len(duplicated),
           all_ran_after_last_kill=recovery, connection_lost_lines=lost_lines,
           taken_over=worker.taken_over(), **duplicate_kinds(rig, duplicated))
    assert took is not None and not lost, lost
    assert worker.alive()
    assert settled(rig) == {}


# -- 7. a poison task that kills its worker process ---------------------------------------

def test_poison_task_is_dead_lettered_after_max_deliveries(make_rig, report):
    """A task that SIGKILLs its prefork child every time: dead-lettered after max_deliveries.

    Redis 7 only: billiard takes ~5 s to report each lost child, so this test is slow.
    """
    server_kind = 'redis7'
    max_deliveries = 3
    rig = make_rig(server_kind, vt=2, acks_late=1, max_deliveries=max_deliveries)
    worker = rig.worker('-c', '2')
    app = rig.client_app()
    r = rig.redis()
    dead = rig.keys.dead_letters('celery')
    started = time.monotonic()
    app.send_task(POISON, args=('pill',))
    good = ['ok%d' % i for i in range(10)]
    for token in good:
        send(app, token)
    deadline = time.monotonic() + 30
    while not r.xlen(dead) and time.monotonic() < deadline:
        time.sleep(0.05)
    dead_after = time.monotonic() - started
    later = ['late%d' % i for i in range(5)]
    for token in later:
        send(app, token)
    took = rig.wait_ran(good + later, timeout=20)
    time.sleep(2.5)   # kept: no further attempt of the poison task may come (an absence)
    attempts = len(rig.listed('poison'))
    lost, duplicated = tally(rig.ran(), good + later)
    dead_letters = r.xrange(dead)
    report(server=server_kind, max_deliveries=max_deliveries, poison_attempts=attempts,
           dead_lettered=len(dead_letters), dead_lettered_after=dead_after,
           good_sent=len(good + later), lost=len(lost), duplicated=len(duplicated),
           worker_lost_lines=worker.count('WorkerLostError'))
    assert len(dead_letters) == 1
    assert b'max_deliveries=%d' % max_deliveries in dead_letters[0][1][b'reason']
    assert attempts == max_deliveries
    assert took is not None and not lost
    assert worker.alive()
    assert settled(rig) == {}
