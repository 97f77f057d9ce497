"""Celery features on the transport, end to end: real ``celery worker`` and ``celery``
command processes on real servers, nothing mocked.

* A smoke subset (``celery inspect ping``, a chain and a group) runs on every server
  kind (``redis_server``).
* The rest runs on one private server of this module (Redis 7 when available), with
  workers shared between tests: each group of workers has its own key prefix, so the
  groups never see each other's queues, pidbox or events.

Tasks live in ``tests/apps/features.py``; they journal what they ran (token, worker,
time) in Redis lists of the result-backend database, which the tests read back.
"""
from __future__ import annotations

import gc
import json
import os
import re
import secrets
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import redis
from celery import chain, chord, group
from kombu.utils.uuid import uuid

import celery_streams  # noqa: F401  (registers redis-streams://)
from celery_streams.keys import Keys
from tests.apps.features import TASKS, journal_key, make_app
from tests.helpers import backend_url, streams_url, wait_until
from tests.servers import RedisServer
from tests.workers import ROOT, Worker, app_env, celery_command

APP_MODULE = 'tests.apps.features'


class Group:
    """Workers, a client app and the task journal under one key prefix of one server."""

    def __init__(self, server, prefix=None):
        self.server = server
        self.prefix = prefix or 'f%s:' % secrets.token_hex(4)
        self.keys = Keys(self.prefix)
        self.app = make_app(streams_url(server), backend_url(server), self.prefix, name='client')
        self.redis = server.client()
        self.journal = redis.Redis(port=server.port, db=1, decode_responses=True)
        self.workers = []

    def env(self, **extra):
        return app_env(self.server, self.prefix, app=APP_MODULE, **extra)

    def worker(self, name, *args, **env):
        worker = Worker(self.env(**env), *args, name=name, app=APP_MODULE)
        self.workers.append(worker)
        return worker.start()

    def celery(self, *args, timeout=60):
        """Run ``celery -A tests.apps.features ARGS`` to its end."""
        return subprocess.run(celery_command(*args, app=APP_MODULE), env=self.env(), cwd=ROOT,
                              capture_output=True, text=True, timeout=timeout)

    def send(self, task, *args, **options):
        return self.app.send_task(TASKS + task, args=args, **options)

    def sig(self, task, *args, **options):
        return self.app.signature(TASKS + task, args=args, **options)

    def entries(self, what='ran'):
        """Journal lines ``token|worker|time[|...]`` as tuples (token, worker, time, ...)."""
        out = []
        for line in self.journal.lrange(journal_key(self.prefix, what), 0, -1):
            token, worker, when, *rest = line.split('|')
            out.append((token, worker, float(when), *rest))
        return out

    def wait_entries(self, predicate, what='ran', timeout=20):
        deadline = time.monotonic() + timeout
        while True:
            entries = self.entries(what)
            if predicate(entries):
                return entries
            if time.monotonic() > deadline:
                raise AssertionError('journal %r never satisfied the test; it holds:\n%s\nlogs:\n%s'
                                     % (what, entries, self.log_tails()))
            time.sleep(0.05)

    def wait_tokens(self, tokens, what='ran', timeout=20):
        tokens = set(tokens)
        return self.wait_entries(lambda entries: tokens <= {e[0] for e in entries}, what, timeout)

    def log_tails(self, size=3000):
        return '\n'.join('--- %s:\n%s' % (w.name, w.text()[-size:]) for w in self.workers)

    def close(self):
        for worker in self.workers:
            worker.terminate()
        for worker in self.workers:
            worker.wait()
        # AsyncResults freed after the server stopped would UNSUBSCRIBE from a dead server
        # (a noisy "Retry limit exceeded" from AsyncResult.__del__): free what can be freed
        # now, and make the rest forget their subscriptions.
        gc.collect()
        consumer = getattr(self.app.backend, 'result_consumer', None)
        if consumer is not None and hasattr(consumer, 'subscribed_to'):
            consumer.subscribed_to.clear()
        self.app.close()
        self.redis.close()
        self.journal.close()


def assert_clean_logs(*workers):
    for worker in workers:
        text = worker.text()
        assert 'Traceback' not in text, '%s:\n%s' % (worker.name, text[-4000:])
        assert 'CRITICAL' not in text, '%s:\n%s' % (worker.name, text[-4000:])


def nodes_online(output):
    match = re.search(r'(\d+) nodes? online', output)
    return int(match.group(1)) if match else 0


# -- fixtures ------------------------------------------------------------------


@pytest.fixture(scope='module')
def server(preferred_server_binary):
    """This module's private server: Redis 7 where available, else the first kind found."""
    binary = preferred_server_binary
    srv = RedisServer(binary=binary.path, name=binary.name).start()
    yield srv
    srv.close()


@pytest.fixture(scope='module')
def pair(server):
    """Two prefork workers with task events, consuming ``celery`` and the Broadcast queue.

    w2 starts once w1 is ready (mingle finds it) and logs at debug level (gossip lines).
    """
    grp = Group(server)
    try:
        grp.worker('w1', '-E', '-c', '2', FEAT_CLIENT_NAME='feat-w1')
        grp.worker('w2', '-E', '-c', '2', '-l', 'debug', FEAT_CLIENT_NAME='feat-w2')
        yield grp
    finally:
        grp.close()


@pytest.fixture(scope='module')
def smoke(redis_server):
    """One worker on each server kind (one per ``redis_server`` param)."""
    grp = Group(redis_server)
    try:
        grp.worker('smoke', '-c', '2')
        yield grp
    finally:
        grp.close()


# -- every server kind ---------------------------------------------------------


def test_smoke_inspect_ping(smoke):
    result = smoke.celery('inspect', 'ping', '--timeout', '3')
    assert result.returncode == 0, result.stdout + result.stderr
    assert 'pong' in result.stdout and nodes_online(result.stdout) == 1, result.stdout
    assert smoke.workers[0].nodename in result.stdout


def test_smoke_chain_and_group(smoke):
    assert chain(smoke.sig('add', 1, 2), smoke.sig('add', 3), smoke.sig('mul', 10))() \
        .get(timeout=20) == 60
    assert group(smoke.sig('add', i, i) for i in range(10))().get(timeout=20) == \
        [2 * i for i in range(10)]
    assert_clean_logs(*smoke.workers)


# -- remote control and monitoring (Redis 7, two shared workers) ---------------


@pytest.mark.slow
def test_inspect_ping_answers_from_both_workers(pair):
    result = pair.celery('inspect', 'ping', '--timeout', '3')
    assert result.returncode == 0, result.stdout + result.stderr
    assert nodes_online(result.stdout) == 2, result.stdout
    for worker in pair.workers[:2]:
        assert re.search(r'->\s+%s: OK\s+pong' % re.escape(worker.nodename), result.stdout), result.stdout


@pytest.mark.slow
def test_inspect_active_queues_lists_task_and_broadcast_queues(pair):
    result = pair.celery('inspect', 'active_queues', '--timeout', '3', '--json')
    assert result.returncode == 0, result.stdout + result.stderr
    replies = json.loads(result.stdout)
    assert set(replies) == {w.nodename for w in pair.workers[:2]}, replies
    bcast_names = set()
    for queues in replies.values():
        by_name = {q['name']: q for q in queues}
        assert by_name['celery']['exchange']['type'] == 'direct', queues
        bcast = [q for name, q in by_name.items() if name.startswith('bcast.')]
        assert len(bcast) == 1, queues
        assert bcast[0]['exchange'] == dict(bcast[0]['exchange'], name='bcast', type='fanout')
        assert bcast[0]['auto_delete'] is True
        bcast_names.add(bcast[0]['name'])
    assert len(bcast_names) == 2   # each worker has its own broadcast queue
    # and the plain (non-JSON) form shows them too
    result = pair.celery('inspect', 'active_queues', '--timeout', '3')
    assert result.returncode == 0 and nodes_online(result.stdout) == 2, result.stdout + result.stderr
    assert "'name': 'celery'" in result.stdout and "'name': 'bcast." in result.stdout


@pytest.mark.slow
def test_mingle_and_gossip_between_two_workers(pair):
    w1, w2 = pair.workers[:2]
    assert 'mingle: searching for neighbors' in w1.text()
    assert re.search(r'mingle: sync with [1-9]\d* nodes', w2.text()), w2.text()[-4000:]
    assert 'mingle: sync complete' in w2.text()
    assert 'sync with %s' % w2.nodename in w1.text()   # w1 answered w2's hello
    # gossip: w2 learns of w1 from its heartbeat events (debug line of celery's Gossip step)
    w2.wait_for('%s joined the party' % w1.nodename, timeout=10)


@pytest.mark.slow
def test_events_dump_sees_task_events(pair):
    out = Path(tempfile.mkdtemp(prefix='cs-feat-')) / 'events.txt'
    with open(out, 'wb') as sink:
        proc = subprocess.Popen(celery_command('events', '--dump', app=APP_MODULE), env=pair.env(), cwd=ROOT,
                                stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while 'heartbeat' not in out.read_text(errors='replace'):   # its event queue is bound
            assert proc.poll() is None, out.read_text(errors='replace')
            assert time.monotonic() < deadline, out.read_text(errors='replace')
            time.sleep(0.1)
        results = [pair.send('add', i, 100) for i in range(3)]
        assert [r.get(timeout=20) for r in results] == [100, 101, 102]
        wanted = [re.compile(r'task %s: %sadd\(%s\)' % (event, re.escape(TASKS), r.id))
                  for r in results for event in ('received', 'succeeded')]
        wait_until(lambda: 'task started' in out.read_text(errors='replace')
                   and all(w.search(out.read_text(errors='replace')) for w in wanted),
                   timeout=20, what=lambda: out.read_text(errors='replace')[-3000:])
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    text = out.read_text(errors='replace')
    for r in results:
        assert re.search(r'task received: %sadd\(%s\)' % (re.escape(TASKS), r.id), text), text[-3000:]
        assert re.search(r'task succeeded: %sadd\(%s\).*result=1\d\d' % (re.escape(TASKS), r.id),
                         text), text[-3000:]
    assert 'task started' in text
    assert 'Traceback' not in text


# -- canvas, retries, rate limits, revoke --------------------------------------


@pytest.mark.slow
def test_chain_group_and_chord_with_redis_result_backend(pair):
    assert chain(pair.sig('add', 1, 2), pair.sig('add', 3), pair.sig('mul', 2))().get(timeout=20) == 12
    assert group(pair.sig('add', i, i) for i in range(20))().get(timeout=20) == [2 * i for i in range(20)]
    assert chord(pair.sig('add', i, i) for i in range(10))(pair.sig('xsum')).get(timeout=20) == 90
    # a chord inside a chain, then more links
    workflow = chain(pair.sig('add', 1, 1),
                     chord([pair.sig('mul', 2), pair.sig('mul', 3)], pair.sig('xsum')),
                     pair.sig('add', 100))
    assert workflow().get(timeout=20) == 110   # (2*2 + 2*3) + 100
    assert_clean_logs(*pair.workers)


@pytest.mark.slow
def test_retry_twice_then_succeed(pair):
    token = 'flaky-%s' % secrets.token_hex(3)
    started = time.monotonic()
    result = pair.send('flaky', token)
    assert result.get(timeout=20) == 'ok after 3 attempts'
    assert time.monotonic() - started >= 1.0   # two countdowns of 0.5 s
    attempts = [e for e in pair.entries('attempt') if e[0] == token]
    assert [int(e[3]) for e in attempts] == [1, 2, 3]
    gaps = [b[2] - a[2] for a, b in zip(attempts, attempts[1:])]
    assert all(gap >= 0.45 for gap in gaps), gaps
    logs = ''.join(w.text() for w in pair.workers)
    assert logs.count('%s[%s] retry: Retry in 0.5s' % (TASKS + 'flaky', result.id)) == 2, logs[-4000:]


def _per_worker_spread(entries):
    times = {}
    for _, worker, when, *_ in entries:
        times.setdefault(worker, []).append(when)
    return {worker: (len(ts), max(ts) - min(ts)) for worker, ts in times.items()}


@pytest.mark.slow
def test_rate_limit_attribute_spaces_executions(pair):
    """``rate_limit='10/s'`` is per worker: each worker runs at most ~10 a second."""
    tokens = ['rl-%d-%s' % (i, secrets.token_hex(2)) for i in range(30)]
    for token in tokens:
        pair.send('limited', token)
    entries = pair.wait_tokens(tokens, timeout=30)
    entries = [e for e in entries if e[0] in tokens]
    spreads = _per_worker_spread(entries)
    print('\n[rate_limit 10/s] per worker (count, seconds):', spreads)
    for count, spread in spreads.values():
        if count >= 4:
            assert spread >= 0.8 * (count - 1) / 10, spreads


@pytest.mark.slow
def test_control_rate_limit_command(pair):
    result = pair.celery('control', 'rate_limit', TASKS + 'throttled', '4/s', '--timeout', '3')
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count('new rate limit set successfully') == 2, result.stdout
    tokens = ['thr-%d-%s' % (i, secrets.token_hex(2)) for i in range(12)]
    for token in tokens:
        pair.send('throttled', token)
    entries = [e for e in pair.wait_tokens(tokens, timeout=30) if e[0] in tokens]
    spreads = _per_worker_spread(entries)
    print('\n[control rate_limit 4/s] per worker (count, seconds):', spreads)
    for count, spread in spreads.values():
        if count >= 3:
            assert spread >= 0.8 * (count - 1) / 4, spreads


@pytest.mark.slow
def test_revoke_a_task_with_countdown(pair):
    token = 'revoked-%s' % secrets.token_hex(3)
    result = pair.send('record', token, countdown=2)
    result.revoke()
    canary = 'canary-%s' % secrets.token_hex(3)
    pair.send('record', canary, countdown=2.5)
    pair.wait_tokens([canary], timeout=20)
    assert token not in {e[0] for e in pair.entries()}
    time.sleep(0.5)   # kept: the revoked task must not run later either (an absence)
    assert token not in {e[0] for e in pair.entries()}
    logs = ''.join(w.text() for w in pair.workers)
    assert re.search(r'Discarding revoked task: %srecord\[%s\]' % (re.escape(TASKS), result.id), logs), \
        logs[-4000:]
    assert result.state == 'REVOKED'


# -- broadcast (kombu.common.Broadcast) ----------------------------------------


def _runs_of(entries, token):
    return sorted(worker for t, worker, *_ in entries if t == token)


def _wait_broadcast(grp, token, workers, timeout=20):
    names = sorted(w.nodename for w in workers)
    return grp.wait_entries(lambda entries: _runs_of(entries, token) == names
                            or len(_runs_of(entries, token)) > len(names), timeout=timeout)


@pytest.mark.slow
def test_broadcast_task_runs_once_on_every_worker(pair):
    tokens = ['bc-%d-%s' % (i, secrets.token_hex(2)) for i in range(3)]
    for token in tokens:
        pair.send('bcast_record', token)
    for token in tokens:
        entries = _wait_broadcast(pair, token, pair.workers[:2])
        assert _runs_of(entries, token) == sorted(w.nodename for w in pair.workers[:2])
    time.sleep(0.5)   # kept: and not a second time (an absence: time for a wrong run)
    entries = pair.entries()
    for token in tokens:
        assert _runs_of(entries, token) == sorted(w.nodename for w in pair.workers[:2])


@pytest.mark.slow
def test_broadcast_reaches_a_worker_paused_while_it_was_sent(pair):
    w1, w2 = pair.workers[:2]
    token = 'paused-%s' % secrets.token_hex(3)
    w1.pause()
    try:
        pair.send('bcast_record', token)
        pair.wait_entries(lambda entries: _runs_of(entries, token) == [w2.nodename])
        time.sleep(2)   # kept: the broadcast waits while w1 is paused (part of the scenario)
        assert _runs_of(pair.entries(), token) == [w2.nodename]
    finally:
        w1.resume()
    entries = _wait_broadcast(pair, token, [w1, w2])
    assert _runs_of(entries, token) == sorted([w1.nodename, w2.nodename])


def _broker_client_ids(r, client_name):
    return [c['id'] for c in r.client_list() if c.get('name') == client_name]


@pytest.mark.slow
def test_broadcast_reaches_a_worker_whose_connections_were_killed(pair):
    """Every broker connection of w1 is killed; a broadcast sent before it notices reaches it.

    w1 is stopped (SIGSTOP) around the kill and the send, so it can only notice the lost
    connections, reconnect and re-declare its queues after the broadcast was sent.
    """
    w1, w2 = pair.workers[:2]
    ids = _broker_client_ids(pair.redis, 'feat-w1')
    assert ids, pair.redis.client_list()
    token = 'killed-%s' % secrets.token_hex(3)
    reconnects = w1.text().count('Connection to broker lost')
    w1.pause()
    try:
        for client_id in ids:
            pair.redis.client_kill_filter(_id=client_id)
        pair.send('bcast_record', token)
        pair.wait_entries(lambda entries: _runs_of(entries, token) == [w2.nodename])
    finally:
        w1.resume()
    entries = _wait_broadcast(pair, token, [w1, w2], timeout=30)
    assert _runs_of(entries, token) == sorted([w1.nodename, w2.nodename]), pair.log_tails()
    assert w1.text().count('Connection to broker lost') > reconnects, w1.text()[-3000:]
    # and w1 is fully back: it answers remote control again
    replies = pair.app.control.ping(timeout=3, destination=[w1.nodename])
    assert replies and w1.nodename in replies[0], replies


@pytest.mark.slow
def test_new_worker_misses_older_broadcasts_then_control_shutdown(pair):
    old = 'old-%s' % secrets.token_hex(3)
    pair.send('bcast_record', old)
    _wait_broadcast(pair, old, pair.workers[:2])
    w3 = pair.worker('w3', '-c', '1')
    new = 'new-%s' % secrets.token_hex(3)
    pair.send('bcast_record', new)
    everyone = [*pair.workers[:2], w3]
    entries = _wait_broadcast(pair, new, everyone)
    assert _runs_of(entries, new) == sorted(w.nodename for w in everyone)
    time.sleep(0.5)   # kept: w3 must not run the older broadcast late (an absence)
    assert w3.nodename not in _runs_of(pair.entries(), old)

    # `celery control shutdown` to w3 alone; the worker does not reply to shutdown,
    # so the command itself reports "No nodes replied" with EX_UNAVAILABLE (69).
    result = pair.celery('control', 'shutdown', '--timeout', '2', '--destination', w3.nodename)
    assert result.returncode == 69, result.stdout + result.stderr
    assert 'No nodes replied' in result.stdout + result.stderr
    assert w3.wait(20) == 0, w3.text()[-3000:]
    assert 'Got shutdown from remote' in w3.text()
    assert_clean_logs(w3)
    # the others live on
    result = pair.celery('inspect', 'ping', '--timeout', '3')
    assert result.returncode == 0 and nodes_online(result.stdout) == 2, result.stdout + result.stderr


@pytest.mark.slow
def test_stopped_worker_leaves_no_broadcast_queue_behind(pair):
    """A Broadcast queue is auto_delete: a worker's warm shutdown removes it from Redis."""
    w4 = pair.worker('w4', '-c', '1', '--without-mingle', '--without-gossip')
    replies = pair.app.control.inspect(timeout=3, destination=[w4.nodename]).active_queues()
    [queue] = [q['name'] for q in replies[w4.nodename] if q['name'].startswith('bcast.')]
    stream = pair.keys.stream(queue)
    assert pair.redis.exists(stream)
    assert w4.stop() == 0
    bound = [m.decode() for m in pair.redis.smembers(pair.keys.bindings('bcast'))]
    leftovers = {
        'stream': bool(pair.redis.exists(stream)),
        'registry': pair.redis.hget(pair.keys.queues, queue),
        'binding': [m for m in bound if m.endswith(queue)],
    }
    assert leftovers == {'stream': False, 'registry': None, 'binding': []}, leftovers


# -- no garbage from remote control --------------------------------------------


def broker_census(r, keys):
    """Keys of the transport, consumer groups and consumers of its streams, bindings."""
    found = list(r.scan_iter(match=keys.match_all, count=1000))
    census = {'keys': len(found), 'streams': 0, 'groups': 0, 'consumers': 0, 'bindings': 0,
              'registry': r.hlen(keys.queues)}
    for key in found:
        kind = r.type(key)
        if kind == b'stream':
            census['streams'] += 1
            for grp in r.xinfo_groups(key):
                census['groups'] += 1
                census['consumers'] += len(r.xinfo_consumers(key, grp['name']))
        elif kind == b'set':
            census['bindings'] += r.scard(key)
    return census


@pytest.mark.slow
def test_control_ping_from_fresh_clients_leaves_no_garbage(pair):
    """100 pings from new connections (every other one from a new app), plus three
    `celery inspect ping` processes: the keys, groups, consumers and bindings under the
    prefix are the same after round 10 and after round 100 (reply queues are deleted)."""
    expected = {w.nodename for w in pair.workers[:2]}

    def cli_ping():
        result = pair.celery('inspect', 'ping', '--timeout', '2')
        assert result.returncode == 0 and nodes_online(result.stdout) == 2, result.stdout + result.stderr

    def ping(app, **kwargs):
        # A short timeout: while replies that come in one read make ping(limit=2) wait
        # it out (see test_control_reply_limit_ends_the_wait...), it is paid often.
        replies = app.control.ping(timeout=0.5, limit=2, **kwargs)
        if {node for reply in replies for node in reply} != expected:   # a slow moment
            replies = app.control.ping(timeout=3, limit=2, **kwargs)
        assert {node for reply in replies for node in reply} == expected, replies

    def ping_round(n):
        if n % 2:   # a new connection of the long-lived client app
            with pair.app.connection_for_write() as conn:
                ping(pair.app, connection=conn)
        else:       # a new app (new pool, new mailbox id, new reply queue)
            app = make_app(streams_url(pair.server), backend_url(pair.server), pair.prefix,
                           name='pinger')
            try:
                ping(app)
            finally:
                app.close()

    cli_ping()
    for n in range(1, 11):
        ping_round(n)
    after_10 = broker_census(pair.redis, pair.keys)
    started = time.monotonic()
    for n in range(11, 101):
        ping_round(n)
        if n in (40, 70):
            cli_ping()
    after_100 = broker_census(pair.redis, pair.keys)
    print('\n[ping x100] census after round 10: %s\n[ping x100] after round 100: %s (%.1fs)'
          % (after_10, after_100, time.monotonic() - started))
    for what in after_10:
        assert after_100[what] <= after_10[what] + 1, (what, after_10, after_100)
    assert_clean_logs(*pair.workers[:2])


@pytest.mark.slow
def test_control_reply_limit_ends_the_wait_when_replies_came_together(pair):
    """``ping(limit=N)`` returns at the N-th reply, even when the replies arrived at once.

    What ``app.control.ping(limit=2)`` does, in two steps (kombu's Mailbox API) so that
    both replies are surely waiting before the client reads: with the replies spread
    over two reads the bug hides (this happens at random in a plain ``ping``).
    """
    expected = {w.nodename for w in pair.workers[:2]}
    with pair.app.connection_for_write() as conn:
        mailbox = pair.app.control.mailbox(conn)
        channel = conn.default_channel
        ticket = uuid()
        mailbox._publish('ping', {}, reply_ticket=ticket, channel=channel, timeout=3,
                         destination=sorted(expected))
        reply_stream = pair.keys.stream(mailbox.reply_queue.name)

        def replies_waiting():
            payloads = [json.loads(fields[b'payload']) for _, fields in pair.redis.xrange(reply_stream)]
            return sum(p.get('headers', {}).get('ticket') == ticket for p in payloads)
        wait_until(lambda: replies_waiting() == 2, timeout=10, what='2 replies in ' + reply_stream)
        started = time.monotonic()
        replies = mailbox._collect(ticket, limit=2, timeout=3, channel=channel)
        took = time.monotonic() - started
    assert {node for reply in replies for node in reply} == expected, replies
    assert took < 1.0, 'collecting 2 waiting replies with limit=2, timeout=3 took %.2fs' % took


# -- priorities and routing (a worker of their own each) -----------------------


@pytest.mark.slow
def test_priority_task_overtakes_a_backlog(server):
    """kombu Redis semantics: priority 0 runs before priority 9, within the prefetch window."""
    grp = Group(server)
    try:
        grp.worker('prio', '-c', '1', FEAT_PREFETCH=1)
        grp.send('block', 1.5, 'blocker')
        grp.wait_tokens(['blocker'], what='started')
        backlog = ['p9-%02d' % i for i in range(20)]
        for token in backlog:
            grp.send('record', token, priority=9)
        grp.send('record', 'p0', priority=0)
        entries = grp.wait_tokens(backlog + ['p0', 'blocker'], timeout=30)
        order = [e[0] for e in entries if e[0] != 'blocker']
        print('\n[priority] order after the blocker:', order)
        assert order.index('p0') <= 2, order
        assert [t for t in order if t != 'p0'] == backlog   # FIFO within a priority
        assert_clean_logs(*grp.workers)
    finally:
        grp.close()


@pytest.mark.slow
def test_worker_with_Q_consumes_its_queues_fairly_and_no_other(server):
    grp = Group(server)
    try:
        worker = grp.worker('router', '-Q', 'a,b', '-c', '1', FEAT_PREFETCH=1)
        queues = grp.app.control.inspect(timeout=3, destination=[worker.nodename]).active_queues()
        assert sorted(q['name'] for q in queues[worker.nodename]) == ['a', 'b'], queues
        grp.send('block', 1.0, 'blocker', queue='a')
        grp.wait_tokens(['blocker'], what='started')
        a_tokens = ['a-%02d' % i for i in range(10)]
        b_tokens = ['b-%02d' % i for i in range(10)]
        for token in a_tokens:
            grp.send('record', token, queue='a')
        for token in b_tokens:
            grp.send('record', token, queue='b')
        grp.send('record', 'c-00', queue='c')
        entries = grp.wait_tokens(a_tokens + b_tokens, timeout=30)
        order = [e[0] for e in entries if e[0] != 'blocker']
        print('\n[-Q a,b] order:', order)
        first_half = [t[0] for t in order[:10]]
        assert first_half.count('a') >= 3 and first_half.count('b') >= 3, order
        assert [t for t in order if t[0] == 'a'] == a_tokens
        assert [t for t in order if t[0] == 'b'] == b_tokens
        time.sleep(1)   # kept: c-00 must not run (an absence: time for a wrong run)
        assert 'c-00' not in {e[0] for e in grp.entries()}
        stream = grp.keys.stream('c')
        assert grp.redis.xlen(stream) == 1
        assert worker.nodename.split('@')[0] not in str(grp.redis.xinfo_groups(stream))
        assert_clean_logs(*grp.workers)
    finally:
        grp.close()
