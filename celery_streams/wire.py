"""Hot-path commands without redis-py's generic machinery.

Publishing and acking send the same few commands over and over. Packing them
by hand and reading the replies straight off a pooled connection costs about
40% less client time per command than ``execute_command`` (measured: 40 us
against 65 us for one XADD on loopback). Everything else goes through
redis-py as usual.

A :class:`Dispatcher` holds one connection of a pool for a channel's hot
commands; :class:`celery_streams.cluster.ClusterDispatcher` is the same on a
Redis Cluster (a connection per master). Both answer :meth:`Dispatcher.calls`,
which :func:`calls` and :func:`call` use.
"""
from __future__ import annotations

import os
import threading

from redis import exceptions


def text(value):
    """A reply as text: bytes decoded as UTF-8, anything else as it is."""
    return value.decode() if isinstance(value, bytes) else value


def pack(args) -> bytes:
    """One command in RESP: ``*<n>`` then ``$<len>`` and each argument."""
    return b'*%d\r\n' % len(args) + pack_args(args)


def pack_args(args) -> bytes:
    """Arguments in RESP, each ``$<len>`` and its bytes, without the ``*<n>`` of a command
    (so that packed parts can be joined into one)."""
    out: list[bytes] = []
    append = out.append
    for arg in args:
        kind = type(arg)
        if kind is str:
            arg = arg.encode()
        elif kind is not bytes:   # the rare subclass, or a number
            arg = (arg.encode() if isinstance(arg, str) else
                   arg if isinstance(arg, bytes) else str(arg).encode())
        append(b'$%d\r\n%s\r\n' % (len(arg), arg))
    return b''.join(out)


class Dispatcher:
    """One connection of ``pool`` kept for a channel's hot commands, sent in one write each.

    A publish checked a connection out of the pool and back in each time,
    about 10 µs of a 115 µs publish (measured on loopback). A dispatcher keeps one
    connection (per process: a forked child takes a new one), with a lock
    for the rare channel shared by threads.
    """

    def __init__(self, pool):
        self.pool = pool
        self._lock = threading.Lock()
        self._connection = None
        self._pid = os.getpid()
        self._moves = getattr(pool, 'moves', 0)   # Sentinel: the master moved (sentinel.moves)

    def get_connection(self):
        self._lock.acquire()
        moves = getattr(self.pool, 'moves', 0)
        if moves != self._moves:
            self._moves = moves
            if self._connection is not None:
                self._connection.disconnect()   # reconnects to the new master
        try:
            if self._connection is None or self._pid != os.getpid():
                self._pid = os.getpid()
                self._connection = self.pool.get_connection()
            elif self._connection._sock is None:
                # connect() itself: with Sentinel it asks where the master is, where
                # redis-py's implicit reconnect would go back to the old address.
                self._connection.connect()
        except BaseException:
            self._lock.release()
            raise
        return self._connection

    def release(self, connection):
        self._lock.release()

    def calls(self, commands) -> list:
        """Send ``commands`` in one write; their replies, in order (errors as exceptions)."""
        return _calls(self, commands)

    def disconnect(self) -> None:
        """Close the held connection (the next command opens another)."""
        if self._connection is not None:
            self._connection.disconnect()


def call(dispatcher, *args):
    """Send one command through ``dispatcher`` (:class:`Dispatcher`, or its cluster
    counterpart); its reply, or raise its error."""
    return calls(dispatcher, [args], raise_on_error=True)[0]


def calls(dispatcher, commands, raise_on_error=False):
    """Send several commands through ``dispatcher`` in one write (one per master on a
    cluster); return their replies (errors as exceptions, or raise the first)."""
    replies = dispatcher.calls(commands)
    if raise_on_error:
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
    return replies


def _calls(dispatcher, commands) -> list:
    connection = dispatcher.get_connection()
    try:
        connection.send_packed_command([b''.join(pack(args) for args in commands)])
        replies = []
        for _ in commands:
            try:
                replies.append(connection.read_response())
            except exceptions.ResponseError as error:
                replies.append(error)
    except BaseException:
        connection.disconnect()   # a half-read connection must not go back to the pool
        raise
    finally:
        dispatcher.release(connection)
    return replies
