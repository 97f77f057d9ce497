"""Hot-path commands without redis-py's generic machinery.

Publishing and acking send the same few commands over and over. Packing them
by hand and reading the replies straight off a pooled connection costs about
40% less client time per command than ``execute_command`` (measured: 40 us
against 65 us for one XADD on loopback). Everything else goes through
redis-py as usual.
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
    out = []
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


class Line:
    """One connection of ``pool`` kept for a channel's hot commands; usable where a pool is.

    A publish checked a connection out of the pool and back in each time,
    about 10 µs of a 115 µs publish (measured on loopback). A line keeps one
    connection (per process: a forked child takes a new one), with a lock
    for the rare channel shared by threads.
    """

    def __init__(self, pool):
        self.pool = pool
        self._lock = threading.Lock()
        self._connection = None
        self._pid = os.getpid()
        self._moves = getattr(pool, 'moves', 0)   # Sentinel: the master moved (connection.moves)

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


def call(pool, *args):
    """Send one command on a connection of ``pool`` (or a :class:`Line`); its reply, or raise
    its error."""
    return calls(pool, [args], raise_on_error=True)[0]


def calls(pool, commands, raise_on_error=False):
    """Send several commands in one write; return their replies (errors as exceptions).

    On a Redis Cluster (:class:`celery_streams.cluster.ClusterLine` for ``pool``), one
    write per node.
    """
    batch = getattr(pool, 'calls', None)
    replies = batch(commands) if batch is not None else _calls(pool, commands)
    if raise_on_error:
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
    return replies


def _calls(pool, commands) -> list:
    connection = pool.get_connection()
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
        pool.release(connection)
    return replies
