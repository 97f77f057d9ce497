"""End to end: real ``celery worker`` processes on the transport, on every server.

Figures (resume times) are printed; run with ``-s`` to see them.
"""
from __future__ import annotations

import subprocess
import time

import pytest
import redis
from celery import Celery

import celery_streams  # noqa: F401
from celery_streams.keys import Keys
from celery_streams.scripts import Scripts
from tests.helpers import backend_url, blocked_readers, streams_url, wait_until
from tests.workers import Worker, app_env, celery_command

TASKS = 'tests.apps.e2e.'


@pytest.fixture
def client_app(redis_server, prefix):
    app = Celery('client', broker=streams_url(redis_server), backend=backend_url(redis_server))
    app.conf.broker_transport_options = {'global_keyprefix': prefix}
    yield app
    app.close()


@pytest.fixture
def start_worker(redis_server, prefix):
    started = []

    def start(*args, name='w1', **env):
        worker = Worker(app_env(redis_server, prefix, **env), *args, name=name).start()
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()


def run(app, name, *args, timeout=20):
    return app.send_task(TASKS + name, args=args).get(timeout=timeout)


def resume_after(app, damage):
    """Damage the broker state, then time how long until a task sent right after returns."""
    damage()
    started = time.monotonic()
    assert run(app, 'add', 20, 22) == 42
    return time.monotonic() - started


def wait_started(journal, prefix):
    """Wait until a task of ``sleep_then_record`` runs."""
    wait_until(lambda: journal.llen('e2e:started:' + prefix), timeout=20, what='a task started')


def wait_prefetched(r, journal, prefix, stream):
    """Wait until a task of ``sleep_then_record`` runs and the worker holds every other
    message of ``stream`` (all delivered: as many pending entries as entries)."""
    wait_started(journal, prefix)

    def all_delivered():
        with r.pipeline() as pipe:   # MULTI: both counts at one instant
            pending, length = pipe.xpending(stream, 'celery').xlen(stream).execute()
        return pending['pending'] == length
    wait_until(all_delivered, what='every message of %s delivered to the worker' % stream)


def test_default_worker_runs_tasks_and_answers_ping(start_worker, client_app, redis_server, prefix):
    worker = start_worker()
    results = [client_app.send_task(TASKS + 'add', args=(i, i)) for i in range(50)]
    assert [r.get(timeout=30) for r in results] == [2 * i for i in range(50)]
    env = app_env(redis_server, prefix)
    ping = subprocess.run(celery_command('inspect', 'ping', '--timeout', '5'), env=env,
                          capture_output=True, text=True, timeout=60)
    assert ping.returncode == 0, ping.stdout + ping.stderr
    assert 'pong' in ping.stdout and '1 node online' in ping.stdout
    assert 'Traceback' not in worker.text()


@pytest.mark.parametrize('pool', ['prefork', 'solo', 'threads'])
def test_worker_heals_when_groups_or_streams_vanish(pool, start_worker, client_app, redis_server,
                                                    prefix, capsys):
    worker = start_worker('-P', pool, '-c', '2')
    assert run(client_app, 'add', 1, 1) == 2
    r = redis_server.client()
    keys = Keys(prefix)
    wait_until(lambda: blocked_readers(r), what='the worker idle, blocked in XREADGROUP')

    def destroy_groups():
        for key in r.scan_iter(match=keys.prefix + 'q:*', _type='stream'):
            for group in r.xinfo_groups(key):
                r.xgroup_destroy(key, group['name'])

    def delete_streams():
        for key in r.scan_iter(match=keys.prefix + 'q:*', _type='stream'):
            r.delete(key)

    after_destroy = resume_after(client_app, destroy_groups)
    wait_until(lambda: blocked_readers(r), what='the worker idle, blocked in XREADGROUP')
    after_delete = resume_after(client_app, delete_streams)
    with capsys.disabled():
        print('\n[%s %s -P %s] resumed %.3fs after XGROUP DESTROY, %.3fs after DEL'
              % (redis_server.name, redis_server.version, pool, after_destroy, after_delete))
    assert 'was gone' in worker.text()
    assert 'Traceback' not in worker.text()
    # it still answers remote control after the pidbox stream was deleted too
    # (on 6.2 a broadcast sent before the worker noticed the loss is dropped)
    assert any(client_app.control.ping(timeout=2) for _ in range(3))


def test_warm_shutdown_returns_prefetched_messages(start_worker, client_app, redis_server, prefix):
    """Messages not started go back (or stay) at once; started ones are acked.

    With ``-P solo`` the worker reads the other messages only once the running
    task ends: SIGTERM comes while the first one runs, so they are still waiting.
    """
    r = redis_server.client()
    worker = start_worker('-P', 'solo', E2E_PREFETCH=8)
    tokens = ['t%d' % i for i in range(6)]
    for token in tokens:
        client_app.send_task(TASKS + 'sleep_then_record', args=(1.0, token))
    journal = redis.Redis(port=redis_server.port, db=1)
    stream = Keys(prefix).stream('celery')
    wait_started(journal, prefix)
    began = time.monotonic()
    assert worker.stop() == 0
    stop_time = time.monotonic() - began
    ran = {t.decode() for t in journal.lrange('e2e:ran:' + prefix, 0, -1)}
    back = r.xlen(stream)
    assert r.xpending(stream, 'celery')['pending'] == 0
    assert back + len(ran) == len(tokens)
    assert back >= 1
    assert stop_time < 10


def test_warm_shutdown_of_a_solo_worker_returns_what_it_prefetched(start_worker, client_app,
                                                                   redis_server, prefix):
    """With ``-P solo`` and a prefetched batch, SIGTERM during the first task runs that task
    only: the rest of the batch goes back to the stream, unstarted."""
    r = redis_server.client()
    worker = start_worker('-P', 'solo', E2E_PREFETCH=8)
    stream = Keys(prefix).stream('celery')
    journal = redis.Redis(port=redis_server.port, db=1)
    tokens = ['b%d' % i for i in range(6)]
    for token in tokens:
        client_app.send_task(TASKS + 'sleep_then_record', args=(1.0, token))
    wait_prefetched(r, journal, prefix, stream)   # a task runs, the worker holds the others
    began = time.monotonic()
    assert worker.stop() == 0
    stop_time = time.monotonic() - began
    ran = [t.decode() for t in journal.lrange('e2e:ran:' + prefix, 0, -1)]
    assert r.xpending(stream, 'celery')['pending'] == 0
    assert r.xlen(stream) + len(ran) == len(tokens), (ran, r.xlen(stream))
    # Running the whole batch would take 6 s: well under that, on a loaded machine too.
    assert len(ran) <= 2 and stop_time < 5, (ran, stop_time, worker.text()[-2000:])


def test_drained_messages_do_not_come_back_at_shutdown(start_worker, client_app, redis_server, prefix):
    r = redis_server.client()
    keys = Keys(prefix)
    worker = start_worker('-P', 'solo', E2E_PREFETCH=8)
    for i in range(5):
        client_app.send_task(TASKS + 'sleep_then_record', args=(1.0, 'd%d' % i))
    wait_prefetched(r, redis.Redis(port=redis_server.port, db=1), prefix, keys.stream('celery'))
    Scripts(r).drain(keys=[keys.stream('celery')], args=['+'])   # every entry, as a drain does
    worker.stop()
    assert r.xlen(keys.stream('celery')) == 0
    assert [g['name'] for g in r.xinfo_groups(keys.stream('celery'))] == [b'celery']
