"""One error tree, and the error classes kombu needs from a transport.

``connection_errors`` make Celery reconnect (with backoff); ``channel_errors``
are reported. Redis errors are translated at the boundary so a user sees one
line that says what is wrong, and never a password.
"""
from __future__ import annotations

from kombu.exceptions import KombuError
from kombu.transport.redis import get_redis_error_classes
from redis import exceptions as redis_errors


class StreamsError(KombuError):
    """Base of every error this package raises."""


class ConfigurationError(StreamsError, ValueError):
    """A URL, option or setting that cannot work; fix the configuration."""


class SchemaMismatch(StreamsError):
    """The keys under this prefix were written by another schema version."""


class OutOfMemory(StreamsError):
    """Redis refused a write because it reached ``maxmemory``."""


_redis_connection_errors, _redis_channel_errors = get_redis_error_classes()

#: Errors that make Celery reconnect. Wrong credentials are turned into a
#: ConfigurationError when a channel opens: retrying cannot fix a password.
connection_errors = _redis_connection_errors
#: A full Redis is reported, not retried. Configuration errors and schema
#: mismatches are in neither tuple: they stop a worker at startup, in one line.
channel_errors = _redis_channel_errors + (OutOfMemory,)


def is_missing_group(error: Exception) -> bool:
    """True for the errors that mean a group or stream vanished (see REDIS facts)."""
    text = str(error)
    return text.startswith('NOGROUP') or text.startswith('UNBLOCKED')


def is_busy_group(error: Exception) -> bool:
    return str(error).startswith('BUSYGROUP')


def translate_write_error(error: redis_errors.ResponseError) -> Exception:
    """Turn a refused write into an error a user can act on."""
    if isinstance(error, redis_errors.OutOfMemoryError) or str(error).startswith('OOM'):
        return OutOfMemory(
            'Redis is out of memory (maxmemory reached); the message was NOT published: %s' % error)
    return error
