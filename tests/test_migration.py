"""Moving from kombu's Redis transport: ``celery migrate`` from its lists into the streams."""
from __future__ import annotations

import subprocess
import time

import redis
from celery import Celery

from tests.workers import ROOT, Worker, app_env, celery_command


def test_celery_migrate_moves_kombu_lists_into_the_streams_and_a_worker_runs_them(fresh_redis_server):
    server = fresh_redis_server()
    old = Celery('old', broker='redis://127.0.0.1:%d/0' % server.port)   # kombu's list transport
    try:
        for i in range(5):
            old.send_task('tests.apps.e2e.record', args=('m%d' % i,), priority=9 if i == 4 else None)
    finally:
        old.close()
    env = app_env(server, '')   # `celery migrate` connects to the destination without options
    done = subprocess.run(celery_command('migrate', '--ack-messages', '--timeout', '2',
                                         'redis://127.0.0.1:%d/0' % server.port,
                                         'redis-streams://127.0.0.1:%d/0' % server.port),
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert 'Migrating task 5/5' in done.stdout, done.stdout
    r = redis.Redis(port=server.port)
    # the lists are empty, nothing is left unacked on kombu's side to come back
    assert r.llen('celery') == 0 and r.llen('celery\x06\x169') == 0 and r.hlen('unacked') == 0
    worker = Worker(env, '-P', 'solo').start()
    try:
        journal = redis.Redis(port=server.port, db=1)
        deadline = time.monotonic() + 30
        while journal.llen('e2e:ran:') < 5 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert sorted(x.decode() for x in journal.lrange('e2e:ran:', 0, -1)) == ['m%d' % i for i in range(5)]
    finally:
        worker.stop()
