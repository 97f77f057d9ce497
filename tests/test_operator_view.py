"""What an operator sees of running workers in ``celery streams status``."""
from __future__ import annotations

import subprocess
import sys
import time

from celery_streams import admin
from tests.workers import ROOT, Worker, app_env, celery_command


def run_one_task(env):
    """A consumer shows in XINFO CONSUMERS once it has read an entry (Redis 7.0+)."""
    done = subprocess.run(celery_command('call', 'tests.apps.e2e.add', '--args', '[1, 2]'), env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def consumers(redis_server, prefix):
    doc = admin.status(redis_server.client(), global_keyprefix=prefix, queues=['celery']).as_dict()
    return [c for g in doc['queues'][0]['groups'] for c in g['consumers']]


def test_status_names_the_node_and_a_cancelled_consumer_is_not_alive(redis_server, prefix):
    env = app_env(redis_server, prefix)
    worker = Worker(env, '-P', 'solo', name='w1').start()
    try:
        run_one_task(env)
        deadline = time.monotonic() + 10
        while not consumers(redis_server, prefix) and time.monotonic() < deadline:
            time.sleep(0.1)
        found = consumers(redis_server, prefix)
        assert found and all(c['name'].startswith('w1@') for c in found), found
        assert any(c['alive'] for c in found), found
        done = subprocess.run(celery_command('control', 'cancel_consumer', 'celery'), env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
        deadline = time.monotonic() + 15   # Celery runs the cancel at its hub's next turn
        while any(c['alive'] for c in consumers(redis_server, prefix)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(c['alive'] for c in consumers(redis_server, prefix)), consumers(redis_server, prefix)
    finally:
        worker.stop()


def test_status_from_the_command_line_shows_the_node(redis_server, prefix):
    env = app_env(redis_server, prefix)
    worker = Worker(env, '-P', 'solo', name='w2').start()
    try:
        run_one_task(env)
        deadline = time.monotonic() + 10
        while not consumers(redis_server, prefix) and time.monotonic() < deadline:
            time.sleep(0.1)
        done = subprocess.run([sys.executable, '-m', 'celery', '-A', 'tests.apps.e2e', 'streams',
                               'status'], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert 'consumer w2@' in done.stdout, done.stdout
    finally:
        worker.stop()
