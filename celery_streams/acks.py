"""Acks written without waiting for Redis' reply.

The consume loop sends the acks of the tasks that finished once per turn: one
``XACK`` and one ``XDEL`` per stream, in one write. Waiting for their replies
would stop the loop for a round trip on every turn, which a profile of a busy
worker showed was a quarter of its main process' work. :class:`AckPipe` writes
them on a connection of its own and reads the replies on a later turn, or at
once where order matters: before a restore (an acked message must never come
back), at close, and for a reject.

Redis runs one connection's commands in order, so a reply read means every ack
written before it landed. Until then a crash means a redelivery, as for an ack
not yet sent: never a loss. If the connection drops with replies unread, the
acks they answer are written again on a new connection (``XACK`` and ``XDEL``
of an entry already acked do nothing).
"""
from __future__ import annotations

import threading
from collections import deque
from typing import Iterable

from redis import exceptions

from . import wire

#: Writes whose replies are unread, beyond which a write waits for them.
MAX_UNREAD = 32


class AckPipe:
    """One connection of ``pool`` that acks are written on, their replies read later.

    The connection is a :class:`~celery_streams.wire.Line`'s: one per process,
    following the master after a Sentinel failover. Unread replies belong to
    the socket they were written on: once the line has another socket, the
    acks they answer are written again.
    """

    def __init__(self, pool):
        self.line = wire.Line(pool)
        self._lock = threading.Lock()
        self._sock = None               # the socket the unread replies come on
        self._unread: deque = deque()   # (packed commands, number of replies), oldest first
        self._unsent: list = []         # the same, to be written (again, if a connection broke)

    def write(self, commands: Iterable[tuple], wait: bool = False) -> None:
        """Write ``commands``; with ``wait``, return once every ack written so far got its reply.

        Raises a connection error (the acks not confirmed are written again by
        the next call) or the first error reply of a write.
        """
        commands = list(commands)
        packed = b''.join(wire.pack(args) for args in commands)
        with self._lock:
            self._unsent.append((packed, len(commands)))
            self._collect(self._send(), wait or len(self._unread) > MAX_UNREAD)

    def collect(self, wait: bool = False) -> None:
        """Read the replies that arrived (with ``wait``: all, after writing what is unsent)."""
        if not self._unread and not self._unsent:
            return
        with self._lock:
            self._collect(self._send(), wait)

    @property
    def unconfirmed(self) -> int:
        """Writes whose replies were not read yet."""
        return len(self._unread) + len(self._unsent)

    # -- with the lock held ---------------------------------------------------

    def _send(self):
        connection = self.line.get_connection()
        self.line.release(connection)
        if self._unread and connection._sock is not self._sock:
            self._requeue()   # disconnected, forked, or the master moved: those replies are gone
        if self._unsent:
            try:
                # No health check: its PING would read the replies of earlier acks.
                connection.send_packed_command([b''.join(p for p, _ in self._unsent)],
                                               check_health=False)
            except BaseException:
                self._lost(connection)
                raise
            self._sock = connection._sock
            self._unread.extend(self._unsent)
            self._unsent = []
        return connection

    def _collect(self, connection, wait: bool) -> None:
        unread = self._unread
        if unread and connection._sock is not self._sock:   # closed meanwhile, by another thread
            self._requeue()
            if not wait:
                return
            connection = self._send()
        first_error = None
        try:
            while unread and (wait or connection.can_read(timeout=0)):
                for _ in range(unread[0][1]):
                    try:
                        connection.read_response()
                    except exceptions.ResponseError as error:
                        first_error = first_error or error
                unread.popleft()
        except BaseException:
            self._lost(connection)
            raise
        if first_error is not None:
            raise first_error

    def _requeue(self) -> None:
        self._unsent = list(self._unread) + self._unsent
        self._unread.clear()

    def _lost(self, connection) -> None:
        """The connection broke: what has no reply yet is written again on a new one."""
        self._requeue()
        connection.disconnect()
