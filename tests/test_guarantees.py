"""Delivery you can trust: guarantees a user relies on, each tested the way a user meets it.

A worker (or kombu consumer) is already running when another process publishes;
workers are real ``celery worker`` processes (``tests/apps/defects.py``, which
carries the e2e app's tasks too); a consumer "dies" in a child process killed
with SIGKILL. Every test waits on observable events with deadlines.

The guarantees themselves are written down in ``docs/guarantees.md``. The tests
of the rest of them live next to what they need:

* ``tests/test_delivery.py`` -- at least once, at the kombu level: a killed
  consumer's messages are reclaimed (marked redelivered), a live one keeps its
  own, ``max_deliveries`` dead-letters a poison message;
* ``tests/test_faults.py`` -- fault injection under real workers: ``kill -9`` of a
  worker, Redis restarts (with and without AOF), ``CLIENT KILL``, nuke and drain
  under publishing, malformed entries, a task that kills its process;
* ``tests/test_sentinel.py`` -- failover under a Sentinel: no publish that returned is
  lost (WAIT 1 by default), workers and publishers follow the new master, the retry
  policy rides out a promotion;
* ``tests/test_server_drops.py`` / ``tests/test_network.py`` / ``tests/test_full_redis.py``
  -- faults from the server side: ``CLIENT KILL`` and paused writes, a network whose
  packets vanish (a TCP proxy), a full Redis;
* ``tests/test_cluster_worker.py`` -- Redis Cluster: a slot moving and a master
  failing over under a running worker lose nothing;
* ``tests/test_publish_confirm.py`` -- publishes confirmed later still reach Redis;
* ``tests/test_delayed_delivery.py`` -- countdowns and ETAs waiting in Redis;
* ``tests/test_turns.py`` -- acks not waited for land, reads held back never for long.

The rigs of the fault, Sentinel and cluster tests are in ``tests/rigs.py``.
"""
from __future__ import annotations

import json
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections import Counter

import pytest
import redis
from celery import Celery
from celery.exceptions import TimeoutError as ResultTimeout
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from kombu import Consumer, Exchange, Producer, Queue

import celery_streams  # noqa: F401  (registers redis-streams://)
from celery_streams.keys import Keys
from tests.helpers import backend_url, connection, streams_url, wait_until
from tests.workers import ROOT, Worker, app_env, clean_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

E2E = 'tests.apps.e2e.'
DEFECTS_APP = 'tests.apps.defects'
DEFECTS = DEFECTS_APP + '.'
VT = 1.0   # a short visibility_timeout for the kombu-level tests


# -- rig ----------------------------------------------------------------------

@pytest.fixture
def start_worker(redis_server, prefix):
    """``start_worker(*args, name='w1', **env)``: a ``celery -A tests.apps.defects worker``, ready."""
    started = []

    def start(*args, name='w1', **env):
        worker = Worker(app_env(redis_server, prefix, app=DEFECTS_APP, **env), *args, name=name,
                        app=DEFECTS_APP)
        started.append(worker)
        return worker.start()

    yield start
    for worker in started:
        worker.stop(timeout=5)   # kills what is still busy (long tasks) after 5 s


@pytest.fixture
def client_app(redis_server, prefix):
    app = Celery('client', broker=streams_url(redis_server), backend=backend_url(redis_server))
    app.conf.broker_transport_options = {'global_keyprefix': prefix}
    yield app
    app.close()


@pytest.fixture
def journal(redis_server, prefix):
    """What the e2e tasks recorded (db 1): ``journal('ran')``, ``journal('started')``..."""
    client = redis.Redis(port=redis_server.port, db=1)

    def listed(what):
        return [item.decode() for item in client.lrange('e2e:%s:%s' % (what, prefix), 0, -1)]

    yield listed
    client.close()


def drain_for(conn, seconds, until=lambda: False):
    """Run ``conn``'s consume loop for ``seconds`` (or until ``until()``); collect its errors."""
    errors = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not until():
        try:
            conn.drain_events(timeout=min(0.5, max(deadline - time.monotonic(), 0.01)))
        except socket.timeout:
            pass
        except Exception as exc:   # noqa: BLE001  -- reported by the caller
            errors.append(repr(exc))
    return errors


def all_streams(keys, queue):
    return [keys.stream(queue, bucket) for bucket in keys.priority_steps]


def tail(worker, chars=3000):
    """The worker's log from its 'ready.' line on (the banner left out), at most ``chars``."""
    text = worker.text()
    return text[text.find('ready.') if 'ready.' in text else 0:][-chars:]


# -- 1. priorities --------------------------------------------------------------

def test_tasks_of_every_priority_run_on_an_already_running_worker(start_worker, client_app, journal):
    """A task published with any priority (0-9) runs within seconds on a worker already consuming."""
    worker = start_worker()
    for priority in (3, 7, 9):
        client_app.send_task(E2E + 'record', args=('p%d' % priority,), priority=priority)
    expected = {'p3', 'p7', 'p9'}
    assert wait_until(lambda: expected <= set(journal('ran')), 10, must=False), (
        'priority tasks not run within 10 s: %s\n%s'
        % (sorted(expected - set(journal('ran'))), tail(worker)))


def test_a_priority_task_published_by_another_process_runs(start_worker, redis_server, prefix,
                                                           journal):
    """A priority task published from another process runs within seconds on a running worker."""
    worker = start_worker()
    publisher = subprocess.run(
        [sys.executable, '-c',
         'import sys, celery_streams\n'
         'from celery import Celery\n'
         'app = Celery("pub", broker=sys.argv[1])\n'
         'app.conf.broker_transport_options = {"global_keyprefix": sys.argv[2]}\n'
         'app.send_task("tests.apps.e2e.record", args=("from-elsewhere",), priority=7)\n'
         'app.close()\n',
         streams_url(redis_server), prefix],
        env=clean_env(), cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert publisher.returncode == 0, publisher.stderr
    assert wait_until(lambda: 'from-elsewhere' in journal('ran'), 10, must=False), (
        'a priority=7 task from another process did not run within 10 s\n' + tail(worker))


def test_a_priority_task_retried_from_the_pool_runs_again(start_worker, client_app, journal):
    """A task sent with a priority, retried by the worker's pool (countdown=1), runs both attempts."""
    worker = start_worker()
    client_app.send_task(DEFECTS + 'retry_once', args=('r1',), priority=7)
    assert wait_until(lambda: 'r1' in journal('ran'), 12, must=False), (
        'attempts seen: %s\n%s' % (journal('attempts'), tail(worker)))
    assert journal('attempts') == ['r1:0', 'r1:1']


# -- 2. held ETA tasks and running acks_late tasks never stop reading -----------

def test_held_countdown_tasks_do_not_stop_a_worker_reading(start_worker, client_app, journal):
    """A worker holding countdown tasks (prefetch multiplier 1, -c 1) still runs a new task at once.

    Held: published with ``delayed_delivery`` off (with it on, they wait in Redis instead).
    """
    client_app.conf.broker_transport_options = dict(client_app.conf.broker_transport_options,
                                                    delayed_delivery=False)
    worker = start_worker('-c', '1', E2E_PREFETCH=1)
    held = [client_app.send_task(E2E + 'record', args=('eta%d' % i,), countdown=120).id
            for i in range(3)]
    assert wait_until(lambda: all('[%s] received' % i in worker.text() for i in held), 10,
                      must=False), tail(worker)
    client_app.send_task(E2E + 'record', args=('plain',))
    assert wait_until(lambda: 'plain' in journal('ran'), 5, must=False), (
        'the plain task did not run within 5 s while 3 countdown tasks were held\n' + tail(worker))


def test_a_worker_holding_countdown_tasks_reads_them_without_waiting(start_worker, client_app, r, keys):
    """400 countdown tasks an hour ahead, delayed delivery off: the worker takes them all in seconds.

    Celery raises ``prefetch_count`` by one for each one it holds, so no more than
    the original window (8) is ever free: a read held back for a fuller window
    must still go out a few ms later, not when the event hub next wakes (once a
    second: 400 would take about 50 s).
    """
    client_app.conf.broker_transport_options = dict(client_app.conf.broker_transport_options,
                                                    delayed_delivery=False)
    start_worker('-c', '2')
    with client_app.producer_or_acquire() as producer:
        for i in range(400):
            client_app.send_task(E2E + 'record', args=('eta%d' % i,), countdown=3600, producer=producer)
    stream = keys.stream('celery')
    assert wait_until(lambda: r.xpending(stream, 'celery')['pending'] == 400, 15, must=False), (
        'the worker holds %d of 400 countdown tasks after 15 s' % r.xpending(stream, 'celery')['pending'])


def test_running_acks_late_tasks_do_not_stop_a_worker_reading(start_worker, client_app, journal):
    """With acks_late and -c 4, a new task starts within seconds while 3 long tasks run."""
    worker = start_worker('-c', '4', E2E_PREFETCH=1, E2E_ACKS_LATE=1)
    for i in range(3):
        client_app.send_task(E2E + 'sleep_then_record', args=(20, 'long%d' % i))
    assert wait_until(lambda: len(journal('started')) == 3, 10, must=False), tail(worker)
    client_app.send_task(E2E + 'record', args=('new',))
    assert wait_until(lambda: 'new' in journal('ran'), 5, must=False), (
        'the new task did not run within 5 s while 3 of 4 processes were busy\n' + tail(worker))


# -- 3. reclaim reaches a dead consumer's entries past a live one's -------------

HOLD_ONE = '''
import sys, time, celery_streams
from kombu import Connection, Consumer, Exchange, Queue
url, prefix, name, vt = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
q = Queue(name, Exchange(name), name)
conn = Connection(url, transport_options={'global_keyprefix': prefix, 'visibility_timeout': vt})
channel = conn.channel()
channel.basic_qos(0, 1, False)
got = []
with Consumer(channel, [q], callbacks=[lambda b, m: got.append(b)]):
    while not got:
        conn.drain_events(timeout=10)
print('holding', got[0], flush=True)
time.sleep(600)
'''


@pytest.mark.parametrize('held_by_live', [5, 40])
def test_reclaim_finds_a_dead_consumers_entry_behind_a_live_consumers_idle_entries(
        redis_server, prefix, unique_name, held_by_live):
    """A dead consumer's message is taken over within a few visibility timeouts, however many
    old idle entries a live consumer holds ahead of it."""
    name = unique_name
    q = Queue(name, Exchange(name), name)
    with connection(redis_server, prefix, visibility_timeout=VT) as live, \
            connection(redis_server, prefix, visibility_timeout=VT) as taker, \
            connection(redis_server, prefix, visibility_timeout=VT) as publisher:
        producer = Producer(publisher.default_channel)
        for i in range(held_by_live):
            producer.publish({'n': i}, exchange=q.exchange, routing_key=name, declare=[q])
        held_channel = live.channel()
        held_channel.basic_qos(0, held_by_live, False)
        held = []
        with Consumer(held_channel, [q], callbacks=[lambda b, m: held.append(m)]):
            drain_for(live, 10, until=lambda: len(held) >= held_by_live)
            assert len(held) == held_by_live
            producer.publish({'n': 'dead'}, exchange=q.exchange, routing_key=name)
            dying = subprocess.Popen([sys.executable, '-c', HOLD_ONE, streams_url(redis_server),
                                      prefix, name, str(VT)],
                                     stdout=subprocess.PIPE, text=True, env=clean_env(), cwd=ROOT)
            try:
                line = dying.stdout.readline()
            finally:
                dying.send_signal(signal.SIGKILL)
                dying.wait()
            assert line.startswith('holding'), line
            take_channel = taker.channel()
            take_channel.basic_qos(0, 1, False)
            got = []
            with Consumer(take_channel, [q], callbacks=[lambda b, m: (got.append(b), m.ack())]):
                started = time.monotonic()
                errors = drain_for(taker, 6 * VT + 2, until=lambda: got)
                took = time.monotonic() - started
            assert not errors, errors
            assert got == [{'n': 'dead'}], (
                'the killed consumer\'s message was not taken over in %.1fs (visibility_timeout '
                '%.1fs) while a live consumer held %d older idle entries; got %r'
                % (took, VT, held_by_live, got))


# -- 4. malformed entries -------------------------------------------------------

def captured_envelope(client_app, r, keys, token, queue):
    """The envelope Celery stores for ``record(token)`` (sent to a side queue nobody reads)."""
    client_app.send_task(E2E + 'record', args=(token,), queue=queue)
    entries = r.xrange(keys.stream(queue))
    return json.loads(entries[-1][1][b'payload'])


def _no_utf8_field_name(envelope):
    return {b'payload': json.dumps(envelope), b'\xff\xfe-name': b'1'}


def _deadline_not_a_number(envelope):
    return {b'payload': json.dumps({**envelope, 'x-deadline': 'soon'})}


def _bad_base64_body(envelope):
    envelope['properties']['body_encoding'] = 'base64'
    return {b'payload': json.dumps({**envelope, 'body': '%%%a'})}


def _unknown_body_encoding(envelope):
    envelope['properties']['body_encoding'] = 'rot13'
    return {b'payload': json.dumps(envelope)}


@pytest.mark.parametrize('malform', [_no_utf8_field_name, _deadline_not_a_number, _bad_base64_body,
                                     _unknown_body_encoding],
                         ids=['non-utf8-field-name', 'x-deadline-soon', 'bad-base64-body',
                              'unknown-body-encoding'])
def test_malformed_entries_never_stall_or_kill_a_worker(malform, start_worker, client_app, r, keys,
                                                         journal, unique_name):
    """Malformed entries among good tasks: every good task runs once, the worker lives, and the
    bad entries are settled (run or dead-lettered), nothing left pending."""
    bad = ['bad0', 'bad1']
    entries = [malform(captured_envelope(client_app, r, keys, token, unique_name + '-side'))
               for token in bad]
    worker = start_worker()
    queue_stream = keys.stream('celery')
    good = ['good0', 'good1', 'good2']
    client_app.send_task(E2E + 'record', args=(good[0],))
    r.xadd(queue_stream, entries[0])
    r.xadd(queue_stream, entries[1])
    client_app.send_task(E2E + 'record', args=(good[1],))
    client_app.send_task(E2E + 'record', args=(good[2],))

    def pending():
        return r.xpending(queue_stream, 'celery')['pending']

    wait_until(lambda: set(good) <= set(journal('ran')) and not pending(), 10, must=False)
    ran = Counter(journal('ran'))
    dead = r.xlen(keys.dead_letters('celery'))
    outcome = {
        'worker alive': worker.alive() and 'Unrecoverable error' not in worker.text(),
        'good not run once': {t: ran[t] for t in good if ran[t] != 1},
        'pending left': pending(),
        'bad run more than once': {t: ran[t] for t in bad if ran[t] > 1},
        'bad settled (dead letters + run)': dead + sum(ran[t] for t in bad),
    }
    assert outcome == {'worker alive': True, 'good not run once': {}, 'pending left': 0,
                       'bad run more than once': {}, 'bad settled (dead letters + run)': 2}, (
        '%s\n%s' % (outcome, tail(worker)))


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children,
                                                                      max_size=3),
    max_leaves=6)


def _envelope(name):
    return {'body': json.dumps({'junk': True}), 'content-encoding': 'utf-8',
            'content-type': 'application/json', 'headers': {},
            'properties': {'delivery_mode': 2, 'priority': 0, 'body_encoding': 'utf-8',
                           'delivery_info': {'exchange': name, 'routing_key': name}}}


@st.composite
def mutated_envelope(draw):
    """A kombu envelope with some top-level or ``properties`` values replaced or removed."""
    envelope = _envelope('q')
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from(['top', 'properties']))
        target = envelope if where == 'top' or not isinstance(envelope.get('properties'), dict) \
            else envelope['properties']
        key = draw(st.sampled_from(sorted(target) + ['x-deadline', 'expiration', 'delivery_tag']))
        if draw(st.booleans()):
            target[key] = draw(JSON)
        else:
            target.pop(key, None)
    return json.dumps(envelope).encode()


FIELD_NAMES = st.sampled_from([b'payload', b'deliveries', b'redelivered']) | st.binary(max_size=8)
FIELD_VALUES = st.binary(max_size=16) | mutated_envelope() | JSON.map(lambda v: json.dumps(v).encode())
ENTRIES = st.lists(st.dictionaries(FIELD_NAMES, FIELD_VALUES, min_size=1, max_size=3),
                   min_size=1, max_size=4)


@settings(max_examples=25, deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@example(entries=[{b'payload': b'{}', b'\xff\xfe': b'x'}])
@given(entries=ENTRIES)
def test_arbitrary_entries_are_delivered_or_dead_lettered_never_left_pending(
        redis_server, prefix, r, entries):
    """Any entries among good messages: each good message is delivered once, each arbitrary entry
    is delivered or dead-lettered, the consumer never raises, and nothing stays pending."""
    name = 'h' + secrets.token_hex(4)
    keys = Keys(prefix)
    q = Queue(name, Exchange(name), name)
    goods, others = [], []

    def on_message(message):
        try:
            body = message.decode()
        except Exception:   # noqa: BLE001
            body = None
        if isinstance(body, dict) and isinstance(body.get('good'), int):
            goods.append(body['good'])
        else:
            others.append(message)
        message.ack()

    with connection(redis_server, prefix, visibility_timeout=VT) as conn, \
            connection(redis_server, prefix, visibility_timeout=VT) as pub:
        producer = Producer(pub.default_channel)
        with Consumer(conn, [q], on_message=on_message):
            errors = drain_for(conn, 0.05)
            for i, fields in enumerate(entries):
                producer.publish({'good': i}, exchange=q.exchange, routing_key=name, declare=[q])
                r.xadd(keys.stream(name), fields)
            producer.publish({'good': len(entries)}, exchange=q.exchange, routing_key=name)

            def done():
                return (len(goods) == len(entries) + 1
                        and len(others) + r.xlen(keys.dead_letters(name)) >= len(entries))

            errors += drain_for(conn, 3, until=done)
        pending = sum(r.xpending(key, 'celery')['pending'] for key in all_streams(keys, name)
                      if r.exists(key))
        outcome = {'good': sorted(goods), 'arbitrary settled': len(others) + r.xlen(keys.dead_letters(name)),
                   'pending': pending, 'errors': errors}
    assert outcome == {'good': list(range(len(entries) + 1)), 'arbitrary settled': len(entries),
                       'pending': 0, 'errors': []}


# -- 5. expires -------------------------------------------------------------------

def test_a_task_expiring_while_queued_ends_revoked(start_worker, client_app, journal):
    """A task whose ``expires`` passes while it waits in the queue ends in state REVOKED."""
    worker = start_worker('-c', '1', E2E_PREFETCH=1, E2E_ACKS_LATE=1)
    client_app.send_task(E2E + 'sleep_then_record', args=(2.5, 'busy'))
    assert wait_until(lambda: 'busy' in journal('started'), 10, must=False), tail(worker)
    result = client_app.send_task(E2E + 'add', args=(1, 1), expires=1)
    try:
        result.get(timeout=10, propagate=False)
    except ResultTimeout:
        pass
    assert result.state == 'REVOKED', (
        'state %s 10 s after the worker was free again\n%s' % (result.state, tail(worker)))


# -- 6. x-expires -----------------------------------------------------------------

@pytest.mark.one_server
def test_a_consumed_queue_with_x_expires_does_not_expire(redis_server, prefix, r, keys, unique_name):
    """A queue with ``x-expires`` lives while consumed, even while its consumer's prefetch is full."""
    name = unique_name
    q = Queue(name, Exchange(name), name, expires=3)
    with connection(redis_server, prefix, visibility_timeout=VT) as conn, \
            connection(redis_server, prefix, visibility_timeout=VT) as pub:
        channel = conn.channel()
        channel.basic_qos(0, 1, False)
        got = []

        def on_message(body, message):
            got.append(message)
            if len(got) > 1:   # the first one is held; the others are acked as they come
                message.ack()

        with Consumer(channel, [q], callbacks=[on_message]):
            drain_for(conn, 0.3)
            producer = Producer(pub.default_channel)
            for i in range(3):
                producer.publish({'n': i}, exchange=q.exchange, routing_key=name, declare=[q])
            drain_for(conn, 5, until=lambda: got)
            assert len(got) == 1
            drain_for(conn, 5)   # the message is held unacked for 5 s; the consumer still runs
            after_5s = {'stream exists': r.exists(keys.stream(name)), 'entries': r.xlen(keys.stream(name))}
            got[0].ack()
            drain_for(conn, 5, until=lambda: len(got) == 3)
    assert after_5s == {'stream exists': 1, 'entries': 3}
    assert [m.payload['n'] for m in got] == [0, 1, 2]


# -- 7. clock skew ----------------------------------------------------------------

SKEWED_CONSUMER = '''
import sys, time
_real_time = time.time
time.time = lambda: _real_time() + 31.0   # this host's clock runs 31 s ahead of Redis's
import celery_streams
from kombu import Connection, Consumer, Exchange, Queue
url, prefix, name = sys.argv[1:4]
q = Queue(name, Exchange(name), name, message_ttl=30)
with Connection(url, transport_options={'global_keyprefix': prefix}) as conn:
    got = []
    with Consumer(conn, [q], callbacks=[lambda b, m: (got.append(b), m.ack())]):
        print('ready', flush=True)
        deadline = time.monotonic() + 8
        while not got and time.monotonic() < deadline:
            try:
                conn.drain_events(timeout=0.5)
            except OSError:
                pass
print('got', got, flush=True)
'''


def test_message_ttl_is_not_judged_by_a_skewed_consumer_clock(redis_server, prefix, unique_name):
    """A fresh message of a queue with x-message-ttl 30 s reaches a consumer whose clock is 31 s
    ahead of the server's."""
    name = unique_name
    q = Queue(name, Exchange(name), name, message_ttl=30)
    consumer = subprocess.Popen([sys.executable, '-c', SKEWED_CONSUMER, streams_url(redis_server),
                                 prefix, name], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=clean_env(), cwd=ROOT)
    try:
        assert consumer.stdout.readline().startswith('ready')
        with connection(redis_server, prefix, visibility_timeout=VT) as pub:
            Producer(pub.default_channel).publish({'fresh': True}, exchange=q.exchange,
                                                  routing_key=name, declare=[q])
        out, err = consumer.communicate(timeout=30)
    finally:
        consumer.kill()
    assert out.strip() == "got [{'fresh': True}]", out + err[-2000:]


# -- 9. a long -P solo task is no half-open connection ----------------------------

@pytest.mark.one_server
def test_a_long_solo_task_causes_no_false_reconnect_or_redelivery(start_worker, client_app, r, keys,
                                                                  journal):
    """Under -P solo, a 13 s task with 2 more tasks prefetched: each runs once, no reconnect."""
    # published before the worker starts: its first read takes all four in one batch
    client_app.send_task(E2E + 'record', args=('first',))
    client_app.send_task(E2E + 'sleep_then_record', args=(13, 'long'))
    client_app.send_task(E2E + 'record', args=('after1',))
    client_app.send_task(E2E + 'record', args=('after2',))
    worker = start_worker('-P', 'solo', E2E_PREFETCH=4)
    assert wait_until(lambda: 'long' in journal('started'), 10, must=False), tail(worker)
    # precondition: the two short tasks were read with the long one (pending, not waiting);
    # whether 'first' is still pending depends on when its ack was flushed, so it is not counted
    stream = keys.stream('celery')
    last_two = {entry_id for entry_id, _ in r.xrevrange(stream, count=2)}
    read = {p['message_id'] for p in r.xpending_range(stream, 'celery', '-', '+', 10)}
    assert last_two <= read, tail(worker)
    tokens = ['first', 'long', 'after1', 'after2']
    wait_until(lambda: set(tokens) <= set(journal('ran')), 25, must=False)
    time.sleep(1.5)   # room for a redelivery to show
    ran = Counter(journal('ran'))
    log = worker.text()
    outcome = {'runs': {t: ran[t] for t in tokens},
               'false reconnect': 'no reply to a read' in log or 'reconnecting' in log
               or 'Connection to broker lost' in log}
    assert outcome == {'runs': dict.fromkeys(tokens, 1), 'false reconnect': False}, tail(worker)


# -- 11. auto_delete queues shared by several consumers ---------------------------

def test_a_clean_close_keeps_a_shared_auto_delete_queue_for_its_other_consumers(
        redis_server, prefix, unique_name, r, keys):
    """When one of two consumers of an auto_delete queue closes cleanly, the other gets every
    message published afterwards."""
    name = unique_name
    q = Queue(name, Exchange(name), name, auto_delete=True)
    with connection(redis_server, prefix, visibility_timeout=VT) as b, \
            connection(redis_server, prefix, visibility_timeout=VT) as pub:
        got = []
        with Consumer(b, [q], callbacks=[lambda body, m: (got.append(body), m.ack())]):
            drain_for(b, 0.3)
            with connection(redis_server, prefix, visibility_timeout=VT) as a:
                with Consumer(a, [q], callbacks=[lambda body, m: m.ack()]):
                    drain_for(a, 0.3)
            after_close = r.exists(keys.stream(name))
            producer = Producer(pub.default_channel)
            for i in range(5):
                producer.publish({'n': i}, exchange=q.exchange, routing_key=name)
            errors = drain_for(b, 5, until=lambda: len(got) == 5)
    assert (after_close, sorted(m['n'] for m in got), errors) == (1, [0, 1, 2, 3, 4], [])


# -- 12. broadcast queues of killed consumers ------------------------------------

BROADCAST_CONSUMER = '''
import sys, time, celery_streams
from kombu import Connection, Consumer, Exchange, Queue
url, prefix, exchange, name, vt = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], float(sys.argv[5])
q = Queue(name, Exchange(exchange, type='fanout'), auto_delete=True)
conn = Connection(url, transport_options={'global_keyprefix': prefix, 'visibility_timeout': vt})
with Consumer(conn, [q], callbacks=[lambda b, m: m.ack()]):
    try:
        conn.drain_events(timeout=0.3)
    except OSError:
        pass
    print('ready', flush=True)
    while True:
        try:
            conn.drain_events(timeout=1)
        except OSError:
            pass
'''


@pytest.mark.one_server
def test_the_broadcast_queue_of_a_killed_consumer_goes_away(redis_server, prefix, unique_name, r,
                                                             keys):
    """A broadcast (fanout, auto_delete) queue whose consumer was killed disappears within a
    bounded time, and later broadcasts are no longer copied into it."""
    exchange = Exchange(unique_name + '-bcast', type='fanout')
    dead_queue = 'bcast.' + secrets.token_hex(4)
    child = subprocess.Popen([sys.executable, '-c', BROADCAST_CONSUMER, streams_url(redis_server),
                              prefix, exchange.name, dead_queue, str(VT)],
                             stdout=subprocess.PIPE, text=True, env=clean_env(), cwd=ROOT)
    try:
        assert child.stdout.readline().startswith('ready')
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert r.exists(keys.stream(dead_queue))
    live_queue = Queue('bcast.' + secrets.token_hex(4), exchange, auto_delete=True)
    heard = []
    with connection(redis_server, prefix, visibility_timeout=VT) as live, \
            connection(redis_server, prefix, visibility_timeout=VT) as pub:
        producer = Producer(pub.default_channel)
        with Consumer(live, [live_queue], callbacks=[lambda b, m: (heard.append(b), m.ack())]):
            drain_for(live, 0.3)
            deadline = time.monotonic() + 10 * VT + 5
            n = 0
            while time.monotonic() < deadline and r.exists(keys.stream(dead_queue)):
                producer.publish({'n': n}, exchange=exchange)
                n += 1
                drain_for(live, 1)
            gone_after = None if r.exists(keys.stream(dead_queue)) else n
            producer.publish({'n': 'last'}, exchange=exchange)
            drain_for(live, 2, until=lambda: {'n': 'last'} in heard)
    assert {'n': 'last'} in heard
    assert gone_after is not None, (
        'the queue of the killed consumer still exists %.0f s after its death, holding %d copies'
        % (10 * VT + 5, r.xlen(keys.stream(dead_queue))))
    assert not r.exists(keys.stream(dead_queue))


# -- 10. healing after XGROUP DESTROY ---------------------------------------------

def test_a_message_in_flight_when_its_group_was_lost_comes_back_marked_redelivered(
        redis_server, prefix, r, keys, unique_name):
    """A group re-created at id 0 hands out again what was in flight: marked ``redelivered``."""
    name = unique_name
    q = Queue(name, Exchange(name), name)
    with connection(redis_server, prefix, visibility_timeout=VT) as a, \
            connection(redis_server, prefix, visibility_timeout=VT) as b:
        got_a, got_b = [], []
        channel_a = a.channel()
        channel_a.basic_qos(0, 1, False)
        with Consumer(channel_a, [q], callbacks=[lambda body, m: got_a.append(m)]), \
                Consumer(b, [q], callbacks=[lambda body, m: (got_b.append(m), m.ack())]):
            Producer(a.default_channel).publish({'n': 1}, exchange=q.exchange, routing_key=name)
            drain_for(a, 5, until=lambda: got_a)
            assert [m.payload for m in got_a] == [{'n': 1}] and not got_a[0].delivery_info.get('redelivered')
            for stream in keys.streams(name):
                r.xgroup_destroy(stream, 'celery')
            Producer(a.default_channel).publish({'n': 2}, exchange=q.exchange, routing_key=name)
            drain_for(b, 10, until=lambda: len(got_b) == 2)
            got_a[0].ack()
    flags = {m.payload['n']: bool(m.delivery_info.get('redelivered')) for m in got_b}
    # 1 was in flight when the group went: it comes back flagged (2, published while the
    # group was gone, may be flagged too: nobody can tell it was not delivered).
    assert set(flags) == {1, 2} and flags[1] is True


# -- 8. a connection blip under a running acks_late task -------------------------

@pytest.mark.one_server
def test_a_connection_blip_does_not_rerun_a_running_acks_late_task(
        start_worker, client_app, journal, redis_server, r, keys):
    """The broker connections of a worker are killed while an ``acks_late`` task runs: the task
    runs once, its late ack reaches Redis through the reconnected worker, nothing stays pending."""
    worker = start_worker('-c', '2', E2E_ACKS_LATE=1, E2E_PREFETCH=1)
    client_app.send_task(E2E + 'sleep_then_record', args=(6, 'long'))
    assert wait_until(lambda: 'long' in journal('started'), 10, must=False), tail(worker)
    killed = 0
    for client in r.client_list():
        if client['db'] == '0' and int(client['id']) != r.client_id():
            killed += r.client_kill_filter(_id=client['id'])
    assert killed, 'no broker connection to kill'
    client_app.send_task(E2E + 'record', args=('after',))   # the worker consumes again
    assert wait_until(lambda: 'after' in journal('ran'), 20, must=False), tail(worker)
    assert wait_until(lambda: 'long' in journal('ran'), 20, must=False), tail(worker)
    stream = keys.stream('celery')
    assert wait_until(lambda: r.xlen(stream) == 0 and r.xpending(stream, 'celery')['pending'] == 0, 10,
                      must=False), (
        r.xlen(stream), r.xpending(stream, 'celery'), tail(worker))
    time.sleep(2)   # kept: room for a wrong redelivery to show
    assert (journal('started').count('long'), journal('ran').count('long')) == (1, 1), tail(worker)
