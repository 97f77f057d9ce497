"""A real Flower on the transport: workers and tasks as usual, and queue lengths (the
``celery_streams.flower`` integration)."""
from __future__ import annotations

import json

import pytest

from celery_streams.connection import first_seed
from tests.helpers import streams_url
from tests.workers import app_env, flower_get, send_adds
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
    assert json.loads(body) == {'active_queues': [{'name': 'celery', 'messages': 4}]}
    status, page = flower_get(flower, '/broker')
    assert status == 200 and 'celery' in page


def test_flowers_url_parsing_gets_one_host_of_a_clusters_seed_list():
    """Flower's own parsing takes one host and one port: the first seed, password kept."""
    assert first_seed('redis-streams+cluster://:p%40ss@h1:7000,h2:7001,h3:7002/0') == \
        'redis-streams+cluster://:p%40ss@h1:7000/0'
    assert first_seed('redis-streams://h1:6379') == 'redis-streams://h1:6379'
