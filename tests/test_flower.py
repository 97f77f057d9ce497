"""A real Flower on the transport: workers and tasks as usual, and queue lengths (the
``celery_streams.flower`` integration)."""
from __future__ import annotations

import json
import re

import pytest
import redis
from celery import Celery
from kombu import Exchange, Queue

from celery_streams import admin
from celery_streams.connection import first_seed
from celery_streams.flower import queue_rows
from celery_streams.keys import acl_rules
from tests.helpers import connection, streams_url, wait_until
from tests.workers import Worker, app_env, flower_get, send_adds
from tests.workers import flower as flower_process

pytestmark = pytest.mark.one_server   # nothing here depends on the server kind

pytest.importorskip('flower')


@pytest.fixture
def flower(redis_server, prefix):
    with flower_process(app_env(redis_server, prefix)) as base:
        yield base


def test_flower_shows_queue_lengths_over_every_priority_bucket(flower, redis_server, prefix):
    send_adds(streams_url(redis_server), {'global_keyprefix': prefix}, (0, 0, 5, 9))
    status, body = flower_get(flower, '/api/queues/length')
    assert status == 200, body
    assert json.loads(body) == {'active_queues': [{
        'name': 'celery', 'messages': 4, 'messages_ready': 4, 'messages_unacknowledged': 0,
        'consumers': 0}]}
    status, page = flower_get(flower, '/broker')
    assert status == 200 and 'celery' in page


def broker_row(page: str, queue: str) -> list:
    """The cells of ``queue``'s row on Flower's Broker page, as text."""
    row = page.split('<tr id="%s">' % queue, 1)[1].split('</tr>', 1)[0]
    return [re.sub(r'<[^>]+>', '', cell).strip() for cell in row.split('</td>')[:-1]]


def test_flower_shows_ready_unacked_and_consumers_of_a_busy_worker(redis_server, prefix):
    """A ``-c 1`` worker runs one long task (acked as it starts) and holds 4 more (prefetch
    4): Flower's Broker page and API say 1 ready, 4 unacked, 1 consumer."""
    env = app_env(redis_server, prefix)
    worker = Worker(env, '-c', '1', name='busy').start()
    try:
        app = Celery('client', broker=streams_url(redis_server), set_as_current=False)
        app.conf.broker_transport_options = {'global_keyprefix': prefix}
        for n in range(6):
            app.send_task('tests.apps.e2e.sleep_then_record', args=(30, 't%d' % n))
        app.close()

        def counts():
            [queue] = admin.status(redis_server.client(), global_keyprefix=prefix,
                                   queues=['celery']).queues
            return queue.waiting, queue.pending
        wait_until(lambda: counts() == (1, 4), timeout=20,
                   what='one task running (acked), 4 held by the worker, 1 waiting')
        with flower_process(env) as base:
            status, body = flower_get(base, '/api/queues/length')
            assert status == 200, body
            assert json.loads(body)['active_queues'] == [{
                'name': 'celery', 'messages': 1, 'messages_ready': 1,
                'messages_unacknowledged': 4, 'consumers': 1}]
            status, page = flower_get(base, '/broker')
            worker.kill()   # before Flower stops: nothing left for its inspector to wait on
    finally:
        worker.kill()
    assert status == 200
    # Queue, Messages, Unacked, Ready, Consumers, Idle since
    assert broker_row(page, 'celery')[:5] == ['celery', '1', '4', '1', '1'], broker_row(page, 'celery')


def test_flowers_url_parsing_gets_one_host_of_a_clusters_seed_list():
    """Flower's own parsing takes one host and one port: the first seed, password kept."""
    assert first_seed('redis-streams+cluster://:p%40ss@h1:7000,h2:7001,h3:7002/0') == \
        'redis-streams+cluster://:p%40ss@h1:7000/0'
    assert first_seed('redis-streams://h1:6379') == 'redis-streams://h1:6379'


def test_flowers_counts_need_only_the_transports_acl(state, redis_server, unique_name):
    """Flower runs with the workers' URL: the transport's ACL rules are enough, and a broadcast
    queue's consumers (the registry, not readable under them) count 0 instead of failing."""
    got = []
    with connection(redis_server, state.prefix) as conn, conn.Consumer(
            [Queue('bq', Exchange('bcast', type='fanout'))], no_ack=True,   # as Celery's broadcasts:
            callbacks=[lambda body, message: got.append(body)]):           # no liveness key
        conn.drain_events(timeout=5)
        rows_while_consuming = queue_rows(state.redis, state.keys, 'celery', ['bq'])
    assert got and rows_while_consuming[0]['consumers'] == 1   # the group's consumer
    state.redis.execute_command('ACL', 'SETUSER', unique_name, 'reset', 'on', '>pw',
                                *acl_rules(state.prefix))
    try:
        client = redis.Redis.from_url(redis_server.url_for(unique_name, 'pw'),
                                      **redis_server.ssl_kwargs)
        rows = queue_rows(client, state.keys, 'celery', ['a', 'b', 'bq', 'missing'])
        client.close()
    finally:
        state.redis.acl_deluser(unique_name)
    assert [(r['name'], r['messages_ready'], r['messages_unacknowledged']) for r in rows] == [
        ('a', 3, 2), ('b', 3, 0), ('bq', 2, 0), ('missing', 0, 0)]   # bq: read entries stay
    assert rows[2]['consumers'] == 0   # bq's kind is in the registry, which it may not read
