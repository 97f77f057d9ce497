"""A real Flower on the transport: workers and tasks as usual, and queue lengths (the
``celery_streams.flower`` integration)."""
from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.servers import free_port
from tests.workers import ROOT, app_env

pytestmark = pytest.mark.one_server   # nothing here depends on the server kind

pytest.importorskip('flower')


@pytest.fixture
def flower(redis_server, prefix):
    port = free_port()
    env = dict(app_env(redis_server, prefix), FLOWER_UNAUTHENTICATED_API='true')
    proc = subprocess.Popen([sys.executable, '-m', 'celery', '-A', 'tests.apps.flowerapp', 'flower',
                             '--port=%d' % port, '--address=127.0.0.1'], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = 'http://127.0.0.1:%d' % port
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(base + '/healthcheck', timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise AssertionError('flower did not start:\n' + proc.communicate()[0][-3000:]) from None
            time.sleep(0.2)
    yield base
    proc.terminate()
    proc.communicate(timeout=30)


def get(url):
    with urllib.request.urlopen(url, timeout=20) as response:
        return response.status, response.read().decode()


def test_flower_shows_queue_lengths_over_every_priority_bucket(flower, redis_server, prefix):
    from celery import Celery

    from tests.helpers import streams_url
    app = Celery('client', broker=streams_url(redis_server))
    app.conf.broker_transport_options = {'global_keyprefix': prefix}
    try:
        for priority in (0, 0, 5, 9):
            app.send_task('tests.apps.e2e.add', args=(1, 1), priority=priority)
    finally:
        app.close()
    status, body = get(flower + '/api/queues/length')
    assert status == 200, body
    assert json.loads(body) == {'active_queues': [{'name': 'celery', 'messages': 4}]}
    status, page = get(flower + '/broker')
    assert status == 200 and 'celery' in page
