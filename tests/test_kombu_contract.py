"""kombu's own transport integration tests, run against this transport.

The tests come from **kombu 5.7.0** (``t/integration/common.py`` of its sdist),
vendored unchanged in ``tests/kombu_integration/`` with kombu's license:
``BasicFunctionality``, ``BaseExchangeTypes``, ``BaseTimeToLive``,
``BasePriority``, ``BaseMessage``, ``BaseEventLoop`` and ``BaseFailover``, plus
kombu's Redis subclass of ``BasePriority`` (``test_RedisPriority`` of its
``t/integration/test_redis.py``). They are subclassed here the way kombu's
``test_redis.py`` does, with its fixtures ``connection``, ``invalid_connection``
and (like ``test_py_amqp.py``) ``failover_connection``, pointing at
``redis-streams://`` on the ``redis_server`` matrix, each test under a
``global_keyprefix`` of its own.
"""
from __future__ import annotations

import socket

import kombu
import pytest
import redis

import celery_streams  # noqa: F401  (registers redis-streams://)
from tests import helpers, servers
from tests.helpers import port_url, streams_url
from tests.kombu_integration import redis_priority
from tests.kombu_integration.common import (
    BaseEventLoop,
    BaseExchangeTypes,
    BaseFailover,
    BaseMessage,
    BasePriority,
    BaseTimeToLive,
    BasicFunctionality,
)


try:
    _FIRST_SERVER = [servers.find_server()]
except servers.NoServerFound:   # conftest skips these tests, saying why
    _FIRST_SERVER = []


def closed_port() -> int:
    """A loopback port nothing listens on (kombu's tests use localhost:12345)."""
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


@pytest.fixture
def connection(redis_server, prefix):
    with helpers.connection(redis_server, prefix) as conn:
        yield conn


@pytest.fixture
def invalid_connection(monkeypatch):
    # kombu's connect() retries once after a hard-coded 2 s pause: kombu's, not
    # the transport's, so it is skipped (saves ~16 s; the retry itself still runs)
    monkeypatch.setattr('kombu.utils.functional.sleep', lambda seconds: None)
    return kombu.Connection(port_url(closed_port()))


@pytest.fixture
def failover_connection(redis_server, prefix):
    with helpers.connection(f'{port_url(closed_port())};{streams_url(redis_server)}', prefix) as conn:
        yield conn


class TestBasicFunctionality(BasicFunctionality):
    def test_failed_connection__ConnectionError(self, invalid_connection):
        # kombu's test_RedisBasicFunctionality override, with this transport's errors
        with pytest.raises(redis.exceptions.ConnectionError) as ex:
            _ = invalid_connection.connection
        assert ex.type in invalid_connection.transport.connection_errors


class TestExchangeTypes(BaseExchangeTypes):
    pass


@pytest.mark.parametrize('redis_server', _FIRST_SERVER, indirect=True, ids=lambda binary: binary.name)
class TestTimeToLive(BaseTimeToLive):
    """Per-message ``expiration``; 4 s a test, so on the first server kind only
    (the transport drops expired entries in Python, whatever the server).

    They pass: the transport honours a message's ``expiration`` as well as a
    queue's ``x-message-ttl`` (kombu's Redis transport ignores ``expiration``,
    and kombu's ``test_redis.py`` does not run this class).
    """


class TestPriority(redis_priority.test_RedisPriority):
    """kombu's Redis priority tests: the default ``priority_semantics='kombu'``."""


class TestPriorityRabbitmqSemantics(BasePriority):
    """The base class as kombu runs it for py-amqp (higher number first)."""

    PRIORITY_ORDER = 'asc'

    _ONE_PER_DRAIN = pytest.mark.xfail(
        strict=True, raises=IndexError,
        reason='calls drain_events() once and expects all three messages: like kombu\'s '
               'Redis transport (whose test_redis.py overrides this test for it), '
               'Connection.drain_events delivers one message per call (docs/design.md, '
               '"The consume loop")')

    @_ONE_PER_DRAIN
    def test_publish_consume(self, connection):
        super().test_publish_consume(connection)

    @_ONE_PER_DRAIN
    def test_publish_requeue_consume(self, connection):
        super().test_publish_requeue_consume(connection)

    @pytest.fixture
    def connection(self, redis_server, prefix):
        with helpers.connection(redis_server, prefix, priority_semantics='rabbitmq') as conn:
            yield conn


class TestMessage(BaseMessage):
    pass


class TestEventLoop(BaseEventLoop):
    pass


class TestFailover(BaseFailover):
    pass
