"""Commands written without waiting for Redis' reply: acks, and publishes confirmed later.

The consume loop sends the acks of the tasks that finished once per turn: one
``XACK`` and one ``XDEL`` per stream, in one write. Waiting for their replies
would stop the loop for a round trip on every turn, which a profile of a busy
worker showed was a quarter of its main process' work. A publisher with
``publish_confirm='later'`` likewise returns once its message is written, not
once Redis answered (see :mod:`celery_streams.publisher`).

A :class:`Pipe` writes commands on a connection of its own and reads the
replies on a later call, or at once where order matters: for acks, before a
restore (an acked message must never come back), at close, and for a reject.

Redis runs one connection's commands in order, so a reply read means every
command written before it ran. If the connection drops with replies unread,
the commands they answer are written again on a new connection: an ack again
does nothing, a publish again may be a duplicate (at-least-once), never a
loss. A socket the server closed (``CLIENT KILL``, a restart, a command over
``proto-max-bulk-len``) takes writes without an error; only a read finds it
closed. So a read that finds it closed writes the rest again at once, and a
wait for every reply (close, exit, a restore) tries new connections as long as
each gets replies (:data:`RESENDS` tries in a row without one). A forked
child drops what its parent wrote: the parent reads those replies. At exit,
every pipe reads its replies (:func:`_confirm_at_exit`).
"""
from __future__ import annotations

import atexit
import logging
import os
import threading
import weakref
from collections import deque
from typing import Callable, Iterable, NamedTuple

from redis import exceptions

from . import errors, wire

logger = logging.getLogger(__name__)

#: Writes whose replies are unread, beyond which a write waits for them (acks).
MAX_UNREAD = 32


#: Tries in a row that got no reply before a wait for replies gives up (:meth:`Pipe._confirm`).
RESENDS = 3

#: Seconds a pipe waits for each reply at exit (a Redis that stopped answering must not
#: keep the process from exiting).
EXIT_WAIT = 2.0
#: Every pipe of this process: at exit, each reads its replies (:func:`_confirm_at_exit`).
_pipes: weakref.WeakSet = weakref.WeakSet()


class Write(NamedTuple):
    packed: bytes
    reply_count: int               # replies it gets (not `count`: that is tuple.count)
    on_replies: Callable | None    # called with them (errors as exceptions); None: raise the first


class Pipe:
    """One connection of ``pool`` that commands are written on, their replies read later.

    The connection is a :class:`~celery_streams.wire.Dispatcher`'s: one per process,
    following the master after a Sentinel failover. Unread replies belong to
    the socket they were written on: once the dispatcher has another socket, the
    commands they answer are written again.
    """

    def __init__(self, pool, max_unread: int = MAX_UNREAD, poll: bool = True):
        self.dispatcher = wire.Dispatcher(pool)
        #: Beyond this many unread writes, a write waits: for all of them (``poll``),
        #: else for the older half (long answered: no wait, and one read for many).
        self.max_unread = max_unread
        #: Whether a write reads the replies that already arrived (a ``poll`` each time).
        self.poll = poll
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._sock = None               # the socket the unread replies come on
        self._unread: deque = deque()   # Write, oldest first
        self._unsent: list = []         # the same, to be written (again, if a connection broke)
        self._answered: list = []       # (write, replies) read before a connection broke
        _pipes.add(self)

    def write(self, commands: Iterable[tuple], wait: bool = False,
              on_replies: Callable | None = None, retry: bool = True) -> None:
        """Write ``commands``; with ``wait``, return once everything written so far got its reply.

        ``on_replies(replies)`` is called once their replies are read (an error
        reply as its exception); without it, the first error reply is raised.

        ``retry=True`` (acks): a connection error is raised, and the commands
        not confirmed (these too) are written again by the next call.
        ``retry=False`` (a publish, which its caller may retry): if these
        commands could not be written, they are dropped and the error raised;
        once written they are the pipe's, and an error reading replies is not
        raised (the next call writes the unconfirmed ones again).
        """
        commands = list(commands)
        write = Write(b''.join(wire.pack(args) for args in commands), len(commands), on_replies)
        with self._lock:
            self._forget_if_forked()
            self._unsent.append(write)
            try:
                connection = self._send()
            except BaseException:
                if not retry:
                    self._unsent = [w for w in self._unsent if w is not write]
                raise
            try:
                done = (self._confirm(None) if wait else
                        self._collect_or_resend(connection))
            except errors.connection_errors:
                if retry or wait:
                    raise
                done, self._answered = self._answered, []
        _deliver(done)

    def collect(self, wait: bool = False, timeout: float | None = None) -> None:
        """Read the replies that arrived (with ``wait``: all, after writing what is unsent,
        for at most ``timeout`` seconds when given)."""
        if not (self._unread or self._unsent or self._answered):
            return
        with self._lock:
            self._forget_if_forked()
            done = self._confirm(timeout) if wait else self._collect(self._send(), False)
        _deliver(done)

    @property
    def unconfirmed(self) -> int:
        """Writes whose replies were not read yet."""
        return len(self._unread) + len(self._unsent)

    # -- with the lock held ---------------------------------------------------

    def _forget_if_forked(self) -> None:
        if self._pid != os.getpid():   # a forked child: the parent reads its own replies
            self._pid = os.getpid()
            self._unread.clear()
            self._unsent = []
            self._answered = []
            self._sock = None

    def _confirm(self, timeout: float | None) -> list:
        """Write what is unsent and read every reply (for at most ``timeout`` seconds each).

        A connection the server closed (``CLIENT KILL``, a restart, a command over
        ``proto-max-bulk-len``) is found only by reading it: what has no reply yet
        is written again on a new connection, as long as each try gets further;
        after :data:`RESENDS` tries that got no reply, the error is raised (and
        the writes stay, for the next call).
        """
        done: list = []
        tries = 0
        while True:
            answered = len(done)
            try:
                done += self._collect(self._send(), True, timeout)
                return done
            except errors.connection_errors:
                done += self._answered
                self._answered = []
                tries = 0 if len(done) > answered else tries + 1
                if tries >= RESENDS or not self._unsent:
                    self._answered = done   # delivered by the next call
                    raise
                logger.debug('celery_streams: connection lost with %d write(s) unconfirmed; '
                             'writing them again', len(self._unsent))

    def _collect_or_resend(self, connection) -> list:
        """:meth:`_collect` without waiting; if it finds the connection closed by the
        server, what has no reply is written again at once on a new one (a socket the
        server closed takes a write without an error: only a read tells)."""
        try:
            return self._collect(connection, False)
        except errors.connection_errors:
            if not self._unsent:
                raise
            done, self._answered = self._answered, []
        try:
            return done + self._collect(self._send(), False)
        except BaseException:
            self._answered = done + self._answered
            raise

    def _send(self):
        connection = self.dispatcher.get_connection()
        self.dispatcher.release(connection)
        if self._unread and connection._sock is not self._sock:
            self._requeue()   # disconnected, or the master moved: those replies are gone
        if self._unsent:
            try:
                # No health check: its PING would read the replies of earlier writes.
                connection.send_packed_command([b''.join(w.packed for w in self._unsent)],
                                               check_health=False)
            except BaseException:
                self._lost(connection)
                raise
            self._sock = connection._sock
            self._unread.extend(self._unsent)
            self._unsent = []
        return connection

    def _collect(self, connection, wait: bool, timeout: float | None = None) -> list:
        """Read replies; return ``(write, replies)`` of the writes answered."""
        done, self._answered = self._answered, []
        unread = self._unread
        if unread and connection._sock is not self._sock:   # closed meanwhile, by another thread
            self._requeue()
            if not wait:
                return done
            connection = self._send()
        if wait:
            keep, block = 0, True
        elif len(unread) > self.max_unread:
            keep, block = (0 if self.poll else self.max_unread // 2), True
        elif self.poll:
            keep, block = 0, False
        else:
            return done
        try:
            while len(unread) > keep and (connection.can_read(timeout=timeout) if block and timeout
                                          else block or connection.can_read(timeout=0)):
                replies = []
                for _ in range(unread[0].reply_count):
                    try:
                        replies.append(connection.read_response())
                    except exceptions.ResponseError as error:
                        replies.append(error)
                done.append((unread.popleft(), replies))
        except BaseException:
            self._lost(connection)
            self._answered = done   # answered: delivered by the next call, never written again
            raise
        return done

    def _requeue(self) -> None:
        self._unsent = list(self._unread) + self._unsent
        self._unread.clear()

    def _lost(self, connection) -> None:
        """The connection broke: what has no reply yet is written again on a new one."""
        self._requeue()
        connection.disconnect()


def _deliver(done) -> None:
    """Hand each write's replies to its callback (the others: their first error reply); then
    raise the first error of them all, once every callback ran."""
    first_error = None
    for write, replies in done:
        try:
            if write.on_replies is not None:
                write.on_replies(replies)
            else:
                error = next((r for r in replies if isinstance(r, exceptions.ResponseError)), None)
                if error is not None:
                    raise error
        except Exception as exc:   # noqa: BLE001 - raised below, after the other callbacks
            first_error = first_error or exc
    if first_error is not None:
        raise first_error


@atexit.register
def _confirm_at_exit() -> None:
    """Read every pipe's replies before the process exits.

    A socket closed with replies unread in it is reset, not closed, and a
    reset can make Redis drop what it had not read yet: a script that
    publishes with ``publish_confirm='later'`` and exits would lose its last
    messages.
    """
    for pipe in list(_pipes):
        try:
            pipe.collect(wait=True, timeout=EXIT_WAIT)
        except Exception:   # noqa: BLE001 - exiting: nothing to raise to
            pass
