"""Helpers shared by the test modules: URLs, kombu connections, publishing and
consuming, waiting on an observable condition, and the keys under a prefix.

Fixtures live in ``tests/conftest.py`` and ``tests/kombu_state.py``; real
``celery worker`` processes in ``tests/workers.py``.
"""
from __future__ import annotations

import time

from kombu import Connection, Consumer, Producer, Queue

import celery_streams  # noqa: F401  (registers redis-streams://)
from celery_streams.keys import Keys


# -- URLs ---------------------------------------------------------------------

def streams_url(server, db=0):
    """``redis-streams://`` (``rediss-streams://`` over TLS) URL of ``server``'s database ``db``,
    with its password if it has one."""
    scheme, rest = server.url_for(password=server.password, db=db).split('://', 1)
    return '%s-streams://%s' % (scheme, rest)


def port_url(port, db=0):
    """``redis-streams://`` URL of a port on the loopback (a server that may not exist)."""
    return 'redis-streams://127.0.0.1:%d/%d' % (port, db)


def backend_url(server, db=1):
    """Plain ``redis://`` URL of ``server``'s database ``db`` (the tests' result backends)."""
    return 'redis://127.0.0.1:%d/%d' % (server.port, db)


# -- kombu --------------------------------------------------------------------

def connection(server, prefix, **transport_options):
    """A kombu connection to ``server`` (a test server, or a broker URL: a Sentinel or a
    failover list) under ``global_keyprefix=prefix``; ``transport_options`` add to it
    (``visibility_timeout=VT``: the short one of a module's tests, ``master_name``...)."""
    url = server if isinstance(server, str) else streams_url(server)
    return Connection(url, transport_options={'global_keyprefix': prefix, **transport_options})


def publish(conn, exchange, routing_key, bodies, declare=()):
    producer = Producer(conn.default_channel)
    for body in bodies:
        producer.publish(body, exchange=exchange, routing_key=routing_key, declare=list(declare))


def drain_all(conn, queues, count, no_ack=False, timeout=5, ack=True):
    """Consume ``count`` messages from ``queues`` through drain_events; ``[(body, message)]``.

    Each wait for the next message lasts at most ``timeout`` seconds (then
    ``socket.timeout`` is raised: the test fails).
    """
    got = []

    def on_message(body, message):
        got.append((body, message))
        if ack and not no_ack:
            message.ack()

    with Consumer(conn, queues, callbacks=[on_message], no_ack=no_ack):
        while len(got) < count:
            conn.drain_events(timeout=timeout)
    return got


def consume(conn, queues, count=None, *, until=None, timeout=15, ack=True, requeue=False, must=False):
    """Consume through drain_events for at most ``timeout`` seconds, until ``count``
    messages came or ``until(messages)`` is true; return the messages (``message.payload``
    is the body).

    Each message is acked, or requeued (``requeue=True``), or left unacked
    (``ack=False``). On time out the messages so far are returned, or with
    ``must=True`` the test fails.
    """
    if isinstance(queues, Queue):
        queues = [queues]
    got = []

    def on_message(body, message):
        got.append(message)
        if requeue:
            message.requeue()
        elif ack:
            message.ack()

    def done():
        return (count is not None and len(got) >= count) or (until is not None and bool(until(got)))

    deadline = time.monotonic() + timeout
    with Consumer(conn, queues, callbacks=[on_message]):
        while not done():
            left = deadline - time.monotonic()
            if left <= 0:
                assert not must, 'timed out after %ss; got %r' % (timeout, [m.payload for m in got])
                break
            try:
                conn.drain_events(timeout=min(0.5, left))
            except TimeoutError:
                pass
    return got


# -- waiting ------------------------------------------------------------------

def wait_until(condition, timeout=10, interval=0.05, what=None, must=True):
    """Poll ``condition()`` until it returns something true, and return that; fail after
    ``timeout`` seconds (``what``: a description, or a callable giving one, for the message).

    With ``must=False`` the last value is returned on time out instead, for the caller to
    assert with a message of its own (or to look at what came)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            if not must:
                return value
            detail = what() if callable(what) else what
            raise AssertionError('not true after %ss: %s' % (
                timeout, detail or getattr(condition, '__name__', repr(condition))))
        time.sleep(interval)


def drop_connection(client, connection):
    """Close redis-py ``connection`` and wait until ``client``'s server has let it go.

    Writes a paused server (``CLIENT PAUSE ... WRITE``) holds back are run at the unpause
    if the server has not yet seen the connection close; waiting here makes "dropped
    before Redis ran them" true on every server, not only where the close is seen first."""
    host, port = connection._sock.getsockname()[:2]
    addr = '%s:%s' % (host, port)
    connection.disconnect()
    wait_until(lambda: all(c.get('addr') != addr for c in client.client_list()), timeout=5,
               what='the server still lists the dropped connection ' + addr)


def blocked_readers(client):
    """Connections of ``client``'s server blocked in ``XREADGROUP`` (an idle consumer)."""
    return [c for c in client.client_list()
            if c.get('cmd') == 'xreadgroup' and 'b' in c.get('flags', '')]


# -- keys ---------------------------------------------------------------------

def delete_keys(client, prefix):
    """Delete every transport key under ``prefix`` (the session's servers are shared)."""
    for key in list(client.scan_iter(match=Keys(prefix).match_all, count=1000)):
        client.delete(key)


def snapshot(client, prefix: str) -> dict:
    """Everything a command could change under ``prefix``, for before/after comparisons."""
    keys = Keys(prefix)
    found = sorted(client.scan_iter(match=keys.match_all, count=1000))
    shot = {}
    for key in found:
        kind = client.type(key)
        if kind == 'stream':
            groups = client.xinfo_groups(key)
            shot[key] = {
                'entries': client.xrange(key),
                'groups': groups,
                'pending': {g['name']: client.xpending_range(key, g['name'], '-', '+', 10000)
                            for g in groups},
            }
            for pending in shot[key]['pending'].values():
                for entry in pending:   # idle time and consumers' idle change by themselves
                    entry.pop('time_since_delivered', None)
        elif kind == 'hash':
            shot[key] = client.hgetall(key)
        elif kind == 'set':
            shot[key] = client.smembers(key)
        else:
            shot[key] = client.dump(key)
    return shot


# -- CLI ----------------------------------------------------------------------

def one_line(result):
    """The only line a CLI result printed (fails if it printed more)."""
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    return lines[0]
