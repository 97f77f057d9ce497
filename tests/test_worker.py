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
from tests.workers import Worker, app_env, celery_command, streams_url

TASKS = 'tests.apps.e2e.'


@pytest.fixture
def client_app(redis_server, prefix):
    app = Celery('client', broker=streams_url(redis_server),
                 backend='redis://127.0.0.1:%d/1' % redis_server.port)
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
    time.sleep(1.5)   # the worker is now idle and blocked in XREADGROUP

    def destroy_groups():
        for key in r.scan_iter(match=keys.prefix + 'q:*', _type='stream'):
            for group in r.xinfo_groups(key):
                r.xgroup_destroy(key, group['name'])

    def delete_streams():
        for key in r.scan_iter(match=keys.prefix + 'q:*', _type='stream'):
            r.delete(key)

    after_destroy = resume_after(client_app, destroy_groups)
    time.sleep(1.5)
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
    """Prefetched but not started messages go back at once; started ones are acked."""
    r = redis_server.client()
    worker = start_worker('-P', 'solo', E2E_PREFETCH=8)
    tokens = ['t%d' % i for i in range(6)]
    for token in tokens:
        client_app.send_task(TASKS + 'sleep_then_record', args=(1.0, token))
    started_key = 'e2e:started:' + prefix
    deadline = time.monotonic() + 20
    while not redis.Redis(port=redis_server.port, db=1).llen(started_key) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    began = time.monotonic()
    assert worker.stop() == 0
    stop_time = time.monotonic() - began
    keys = Keys(prefix)
    stream = keys.queue('celery')
    journal = redis.Redis(port=redis_server.port, db=1)
    ran = {t.decode() for t in journal.lrange('e2e:ran:' + prefix, 0, -1)}
    back = r.xlen(stream)
    assert r.xpending(stream, 'celery')['pending'] == 0
    assert back + len(ran) == len(tokens)
    assert back >= 1
    assert stop_time < 10


def test_drained_messages_do_not_come_back_at_shutdown(start_worker, client_app, redis_server, prefix):
    r = redis_server.client()
    keys = Keys(prefix)
    worker = start_worker('-P', 'solo', E2E_PREFETCH=8)
    for i in range(5):
        client_app.send_task(TASKS + 'sleep_then_record', args=(1.0, 'd%d' % i))
    time.sleep(0.5)   # the worker prefetched them; one is running
    r.evalsha(r.script_load(open(celery_streams.__path__[0] + '/scripts/drain.lua').read()),
              1, keys.queue('celery'))
    worker.stop()
    assert r.xlen(keys.queue('celery')) == 0
    assert [g['name'] for g in r.xinfo_groups(keys.queue('celery'))] == [b'celery']
