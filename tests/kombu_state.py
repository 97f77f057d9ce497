"""Fixtures of the operator-command tests (registered in ``tests/conftest.py``):
realistic queue state made through kombu and the transport, and the in-process CLI.

``streams_state(server, prefix)`` (a fixture factory) opens a kombu connection
on ``redis-streams://`` with ``global_keyprefix=prefix``; its helpers declare
queues, publish, reserve messages without acking them (pending entries, as a
worker holding them) and produce dead letters (undecodable entries read once).
Connections are closed at teardown without restoring what they hold, as if the
worker had crashed, and the keys under the prefix are deleted. ``state`` is one
such state; ``run`` invokes ``celery ...`` in-process.
"""
from __future__ import annotations

import pytest
from celery.bin.celery import celery
from click.testing import CliRunner
from kombu import Exchange, Queue

import celery_streams  # noqa: F401  (registers redis-streams://)
from celery_streams.keys import Keys
from tests.helpers import connection, delete_keys, streams_url


class StreamsState:
    def __init__(self, server, prefix: str):
        self.server = server
        self.prefix = prefix
        self.keys = Keys(prefix)
        self.url = streams_url(server)
        self.connection = connection(server, prefix)
        self.channel = self.connection.channel()
        self.producer = self.connection.Producer(self.channel)
        self.redis = server.client(decode_responses=True)

    def task_queue(self, name: str, published: int = 0, reserved: int = 0, dead: int = 0):
        """Declare task queue ``name``; publish, dead-letter and reserve messages.

        Returns the reserved (delivered, unacked) kombu messages.
        """
        queue = Queue(name, Exchange(name), name)(self.channel)
        queue.declare()
        if dead:   # undecodable entries: the first read moves them to the dead letters
            for i in range(dead):
                self.redis.xadd(self.keys.stream(name), {'payload': 'not json %d' % i})
            assert queue.get() is None
            assert self.redis.xlen(self.keys.dead_letters(name)) == dead
        for i in range(published):
            self.producer.publish({'n': i}, exchange=name, routing_key=name)
        held = [queue.get() for _ in range(reserved)]
        assert None not in held
        return held

    def broadcast_queue(self, name: str, exchange: str, published: int = 0) -> None:
        """Declare ``name`` bound to fanout exchange ``exchange`` and broadcast to it."""
        fanout = Exchange(exchange, type='fanout')
        Queue(name, fanout)(self.channel).declare()
        for i in range(published):
            self.producer.publish({'b': i}, exchange=fanout)

    def close(self, restore: bool = False) -> None:
        if self.connection.connected:
            self.channel.do_restore = restore
            self.connection.close()

    def delete_keys(self) -> None:
        """Delete every key under the prefix (teardown: the session's server is shared)."""
        delete_keys(self.redis, self.prefix)
        self.redis.close()


@pytest.fixture
def streams_state():
    """Factory ``streams_state(server, prefix) -> StreamsState``; closed at teardown."""
    made = []

    def make(server, prefix):
        state = StreamsState(server, prefix)
        made.append(state)
        return state

    yield make
    for state in made:
        state.close()
        state.delete_keys()


@pytest.fixture
def state(redis_server, unique_name, streams_state):
    """Task queues a (5 published, 2 reserved, 1 dead letter) and b (3), broadcast queue bq."""
    st = streams_state(redis_server, unique_name + ':')
    st.held = st.task_queue('a', published=5, reserved=2, dead=1)
    st.task_queue('b', published=3)
    st.broadcast_queue('bq', exchange='bcast', published=2)
    return st


@pytest.fixture
def run(monkeypatch):
    """``run(*args, input=None)``: invoke ``celery *args`` in-process."""
    # `--broker` sets CELERY_BROKER_URL for good: setenv first, so that teardown removes it
    monkeypatch.setenv('CELERY_BROKER_URL', '')
    monkeypatch.delenv('CELERY_BROKER_URL')
    runner = CliRunner()

    def invoke(*args, input=None):
        return runner.invoke(celery, list(args), input=input, catch_exceptions=False)
    return invoke

