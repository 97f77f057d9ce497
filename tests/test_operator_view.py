"""What an operator sees of running workers in ``celery streams status``."""
from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

from celery_streams import admin
from tests.helpers import wait_until
from tests.workers import ROOT, Worker, app_env, celery_command, clean_env

pytestmark = pytest.mark.one_server   # nothing here depends on the server kind


def run_one_task(env):
    """A consumer shows in XINFO CONSUMERS once it has read an entry (Redis 7.0+)."""
    done = subprocess.run(celery_command('call', 'tests.apps.e2e.add', '--args', '[1, 2]'), env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def consumers(redis_server, prefix):
    doc = admin.status(redis_server.client(), global_keyprefix=prefix, queues=['celery']).as_dict()
    return [c for g in doc['queues'][0]['groups'] for c in g['consumers']]


@pytest.fixture
def running_worker(redis_server, prefix):
    """``start(name)``: a ``-P solo`` worker that has read one task, so its consumer shows."""
    started = []

    def start(name):
        env = app_env(redis_server, prefix)
        started.append(Worker(env, '-P', 'solo', name=name).start())
        run_one_task(env)
        wait_until(lambda: consumers(redis_server, prefix), what='a consumer in XINFO CONSUMERS')
        return env

    yield start
    for worker in started:
        worker.stop()


def test_status_names_the_node_and_a_cancelled_consumer_is_not_alive(running_worker, redis_server,
                                                                     prefix):
    env = running_worker('w1')
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


def test_status_from_the_command_line_shows_the_node(running_worker):
    env = running_worker('w2')
    done = subprocess.run([sys.executable, '-m', 'celery', '-A', 'tests.apps.e2e', 'streams',
                           'status', '-v'], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert 'consumer w2@' in done.stdout, done.stdout


def test_status_watch_shows_rates_in_and_out(redis_server, prefix):
    """``status --watch``: a table per refresh, with messages in and out per second (Redis 7.0+)."""
    import threading

    from kombu import Connection, Consumer, Exchange, Producer, Queue

    from tests.helpers import streams_url
    if redis_server.name == 'redis6.2':
        pytest.skip('Redis 6.2 keeps no count of entries added: rates show as -')
    q = Queue('watched', Exchange('watched'), 'watched')
    stop = threading.Event()

    def traffic():
        with Connection(streams_url(redis_server), transport_options={'global_keyprefix': prefix}) as c:
            producer = Producer(c.default_channel)
            q(c.default_channel).declare()
            with Consumer(c, [q], callbacks=[lambda body, m: m.ack()]):
                while not stop.is_set():
                    for _ in range(5):
                        producer.publish({'x': 1}, exchange=q.exchange, routing_key='watched')
                    try:
                        for _ in range(5):
                            c.drain_events(timeout=0.05)
                    except socket.timeout:
                        pass

    thread = threading.Thread(target=traffic, daemon=True)
    thread.start()
    try:
        time.sleep(0.5)   # kept: the traffic must run before the first refresh
        done = subprocess.run([sys.executable, '-m', 'celery', '--broker', streams_url(redis_server),
                               'streams', '--prefix', prefix, 'status', '--watch', '--interval', '1',
                               '--count', '3'], env=clean_env(), capture_output=True, text=True,
                              timeout=60)
    finally:
        stop.set()
        thread.join(10)
    assert done.returncode == 0, done.stderr
    assert '\x1b[' not in done.stdout   # not a terminal: plain tables
    tables = [block for block in done.stdout.split('\n\n') if 'IN/S' in block]
    assert len(tables) == 3, done.stdout
    [row] = [line for line in tables[-1].splitlines() if line.startswith('watched')]
    came, gone = map(float, row.split()[-2:])
    assert came > 5 and gone > 5, row
