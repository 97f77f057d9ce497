"""One error tree, and the error classes kombu needs from a transport.

``connection_errors`` make Celery reconnect (with backoff); ``channel_errors``
are reported. Redis errors are translated at the boundary so a user sees one
line that says what is wrong, and never a password.
"""
from __future__ import annotations

import re
import socket

import click

from kombu.exceptions import InconsistencyError, KombuError
from kombu.transport import virtual
from redis import exceptions as redis_errors


class StreamsError(KombuError):
    """Base of every error this package raises."""


class ConfigurationError(StreamsError, ValueError, click.ClickException):
    """A URL, option or setting that cannot work; fix the configuration.

    It is a ``click.ClickException`` too: raised under a ``celery`` command
    (``celery worker`` builds the transport while it starts), it is printed
    as one line, ``Error: ...``, and the command exits with ``EX_CONFIG`` (78).
    """

    exit_code = 78

    def __init__(self, message):
        click.ClickException.__init__(self, message)

    def __str__(self):
        return self.message


class SchemaMismatch(StreamsError):
    """The keys under this prefix were written by another schema version."""


class OutOfMemory(StreamsError):
    """Redis refused a write because it reached ``maxmemory``."""


class NotReplicated(StreamsError):
    """A publish was written to the master, but fewer replicas than ``publish_wait_replicas``
    acknowledged it within ``publish_wait_timeout``: a failover now may lose it.

    The message is not withdrawn: it may still be delivered. Publishing it
    again is safe only where running a task twice is.
    """


class MasterMoved(NotReplicated, redis_errors.ConnectionError):
    """A publish went to a master that is being replaced (a Sentinel failover): a
    connection error, so kombu reconnects and Celery publishes it again (to the new
    master); the old master's copy vanishes when it is demoted, unless a worker still
    reading there ran it (then it runs twice)."""


# The classes kombu's Redis transport treats as connection and channel errors,
# listed here: importing kombu.transport.redis needs packages that kombu
# installs only with its ``redis`` extra.
_redis_connection_errors = virtual.Transport.connection_errors + (
    InconsistencyError, socket.error, IOError, OSError,
    redis_errors.ConnectionError, redis_errors.BusyLoadingError,
    redis_errors.AuthenticationError, redis_errors.TimeoutError,
    KeyError)   # a stale fd firing for a dropped channel: reconnect, as kombu does
_redis_channel_errors = virtual.Transport.channel_errors + (
    redis_errors.DataError, redis_errors.InvalidResponse, redis_errors.ResponseError)

#: Errors that make Celery reconnect. Wrong credentials are turned into a
#: ConfigurationError when a channel opens: retrying cannot fix a password.
connection_errors = _redis_connection_errors
#: A full Redis is reported, not retried. Configuration errors and schema
#: mismatches are in neither tuple: they stop a worker at startup, in one line.
channel_errors = _redis_channel_errors + (OutOfMemory, NotReplicated)


#: Where Redis 6.2 puts a script's error: ``Error running script (call to f_<sha>):
#: @user_script:1: `` (``redis.call``) and ``@user_script: 16: -`` (``redis.pcall``, and an
#: error the script returned): the Redis error itself follows.
_SCRIPT_PLACE = re.compile(r'^(?:Error running script \(call to \w+\): )?(?:@user_script: ?\d+: ?-?)*')


def reply_text(error: Exception) -> str:
    """An error reply as Redis made it, without the place in a script Redis 6.2 adds in front."""
    return _SCRIPT_PLACE.sub('', str(error), count=1)


def is_missing_group(error: Exception) -> bool:
    """True for the errors that mean a group or stream vanished (see REDIS facts)."""
    text = reply_text(error)
    return text.startswith('NOGROUP') or text.startswith('UNBLOCKED')


def is_busy_group(error: Exception) -> bool:
    return reply_text(error).startswith('BUSYGROUP')


def is_out_of_memory(error: BaseException) -> bool:
    """True for a write Redis refused at ``maxmemory``: redis-py's ``OutOfMemoryError``, an
    ``OOM`` reply, the same from a script (Redis 6.2: ``@user_script: 16: -OOM ...``), or
    this package's :class:`OutOfMemory`."""
    return (isinstance(error, (OutOfMemory, redis_errors.OutOfMemoryError))
            or (isinstance(error, redis_errors.ResponseError) and reply_text(error).startswith('OOM')))


#: Whether this process said that Redis is full and not yet that it has room again.
_said_full = [False]


def say_full(logger, what: str, *args) -> None:
    """Say that a full Redis refused ``what`` (``%s`` placeholders for ``args``): one warning
    until :func:`say_room` (a worker opens several channels, each refused several writes),
    then debug lines."""
    if _said_full[0]:
        logger.debug('celery_streams: Redis is full (maxmemory): ' + what, *args)
        return
    _said_full[0] = True
    logger.warning('celery_streams: Redis is full (maxmemory): it refuses new queues, groups, '
                   'bindings and messages (' + what + '); consuming and acking go on, and what it '
                   'refused is written once it has room again', *args)


def say_room(logger) -> None:
    """Redis took a write that a full Redis refused: say so, once."""
    if _said_full[0]:
        _said_full[0] = False
        logger.info('celery_streams: Redis has room again; what it refused is written')


def translate_write_error(error: Exception) -> Exception:
    """Turn a refused write into an error a user can act on (one line)."""
    if isinstance(error, OutOfMemory):
        return error
    if is_out_of_memory(error):
        return OutOfMemory('Redis is out of memory (maxmemory reached, it refuses writes until '
                           'memory is freed): the message was NOT published')
    return error


def one_line(error: BaseException) -> str:
    """The first line of an error's message (its class name when it has none)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
