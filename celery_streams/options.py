"""Transport options: one object, parsed and checked once.

Set them as Celery's ``broker_transport_options`` (or kombu's
``Connection(transport_options=...)``). Names follow kombu's Redis transport
wherever the meaning is the same.

==============================  ===============  ===========================================
option                          default          meaning
==============================  ===============  ===========================================
``global_keyprefix``            ``''``           prefix of every key (kombu's option)
``consumer_group``              ``'celery'``     the consumer group shared by all workers
``polling_interval``            ``1.0``          seconds one ``XREADGROUP ... BLOCK`` waits
                                                 at most (kombu: the BRPOP timeout)
``visibility_timeout``          ``300``          seconds a consumer's messages stay its own
                                                 after its worker stopped renewing them
                                                 (died, or lost Redis); then another
                                                 worker takes them over
``max_deliveries``              ``10``           deliveries before a message is dead-lettered
``dead_letter_maxlen``          ``10000``        dead letters kept per queue (oldest trimmed)
``fanout_maxlen``               ``1000``         entries a broadcast queue keeps (oldest
                                                 trimmed), the window a reconnecting
                                                 worker can catch up on
``max_connections``             ``10``           connections in the publish/ack pool
``socket_timeout``              ``None``         seconds a command waits for its reply;
                                                 unset: 5, or ``polling_interval`` /
                                                 ``publish_wait_timeout`` + 2 if longer
                                                 (a silent network fails in bounded time)
``socket_connect_timeout``      ``None``         seconds to connect; unset: 5
``socket_keepalive``            ``None``         TCP keepalive; unset: on
``socket_keepalive_options``    ``None``         TCP keepalive options; unset: a probe
                                                 after 30 s idle, every 5 s, 3 missed
``health_check_interval``       ``25``           seconds between redis-py health checks
``retry_on_timeout``            ``None``         redis-py retry on timeout
``client_name``                 ``None``         ``CLIENT SETNAME`` of every connection
``queue_order_strategy``        ``round_robin``  kombu's: ``round_robin`` rotates the queues
                                                 a worker consumes between reads, ``sorted``
                                                 reads them by name, ``priority`` in the
                                                 order given (first queue first)
``priority_steps``              ``[0,3,6,9]``    kombu's: priority buckets of every queue
``priority_semantics``          ``'kombu'``      ``kombu``: lower number first, no priority
                                                 = 0 (kombu's Redis transport);
                                                 ``rabbitmq``: higher number first
``delayed_delivery``            ``True``         a Celery task whose ETA (``countdown``,
                                                 ``eta``, a retry's countdown) is further
                                                 ahead than the threshold waits in Redis
                                                 (the queue's schedule) until due, not in
                                                 a worker's memory; ``False``: published
                                                 at once, the worker holds it until due
``delayed_delivery_threshold``  ``1.0``          seconds: an ETA at most this far ahead
                                                 (server clock) is published at once
``master_name``                 ``None``         kombu's: the name the Sentinels monitor;
                                                 required with ``sentinel-streams://``
                                                 URLs, refused with any other
``sentinel_kwargs``             ``None``         kombu's: redis-py arguments of the
                                                 connections to the Sentinels (``password``
                                                 ...); default: the socket options above,
                                                 5 s timeouts, no retries
``min_other_sentinels``         ``0``            kombu's: a Sentinel that sees fewer other
                                                 Sentinels is not asked for the master
``publish_wait_replicas``       ``None``         a publish returns once this many replicas
                                                 have it (``WAIT``, pipelined with the
                                                 write), else raises ``NotReplicated``;
                                                 0: off; not set: 1 with a
                                                 ``sentinel-streams://`` URL and
                                                 ``publish_confirm='now'``, else 0
                                                 (:func:`celery_streams.replication.replicas_to_wait_for`)
``publish_wait_timeout``        ``1.0``          seconds ``WAIT`` waits for them at most
``publish_confirm``             ``'now'``        ``now``: a publish returns once Redis has
                                                 the message; ``later``: once it is
                                                 written, Redis' reply read by a later
                                                 publish (faster; what can be lost:
                                                 docs/guarantees.md)
``ledger``                      ``True``         count per queue what happens to messages
                                                 (:mod:`celery_streams.ledger`, ``celery
                                                 streams audit``); off: publishes, reads
                                                 and acks count nothing (every process
                                                 must agree, or the audit cannot balance)
``rate_limits``                 ``{}``           global rate limits, by task name or
                                                 ``'queue:NAME'``: ``{'proj.tasks.charge':
                                                 '5/s'}`` (Celery's notation; ``{'rate':
                                                 '10/s', 'burst': 5}`` allows 5 at once);
                                                 written to Redis when a worker starts
                                                 consuming (:mod:`celery_streams.limits`)
``global_task_rate_limits``     ``False``        a task's own ``rate_limit`` holds across
                                                 all workers (written as a global limit
                                                 when a worker starts; Celery's per-worker
                                                 limit is then off for it)
``sharded_queues``              ``{}``           queue name -> number of shards N >= 1:
                                                 ``{'celery': 3}`` spreads the queue over
                                                 N streams, on distinct masters of a Redis
                                                 Cluster; written to Redis when a worker
                                                 starts consuming, ``celery streams shards
                                                 set`` changes it live (docs/shards.md,
                                                 :mod:`celery_streams.shards`)
==============================  ===============  ===========================================

``delayed_delivery`` decides how a *publisher* stores a message; every
consumer moves the due entries of the schedules of the queues it consumes,
whatever its own setting (see :mod:`celery_streams.scheduler`). Broadcasts
(fanout exchanges) are never scheduled.

The Sentinel options (``master_name``, ``sentinel_kwargs``,
``min_other_sentinels``) mean what they mean to kombu's Sentinel transport;
they are checked against the URL when the transport or a command starts
(:func:`celery_streams.connection.Address.check`, see docs/sentinel.md).

Options kombu's Redis transport knows but that mean nothing here (its ack
emulation, BRPOP and PUB/SUB settings) are accepted with one warning. A name
neither kombu nor this transport knows is an error: a typo must not pass.

Each option's check is declared with its field. A number must be finite: NaN,
an infinity (``float('inf')``, ``'inf'``, ``'nan'``) and a boolean are refused,
as is a fraction where a whole number is expected. ``None`` is accepted for
the options whose default is ``None``.
"""
from __future__ import annotations

import logging
import math
import operator
from dataclasses import Field, dataclass, field, fields
from difflib import get_close_matches
from typing import Any, Callable, Mapping

from . import rates
from .errors import ConfigurationError
from .keys import DEFAULT_PRIORITY_STEPS

logger = logging.getLogger(__name__)

#: kombu's Redis-transport options that have no meaning on streams.
IGNORED = frozenset({
    'ack_emulation', 'unacked_key', 'unacked_index_key', 'unacked_mutex_key',
    'unacked_mutex_expire', 'unacked_restore_limit', 'unacked_restore_interval',
    'unacked_restore_throttle', 'sep', 'fanout_prefix', 'fanout_patterns',
    'reauth_check_interval', 'credential_provider', 'brpop_timeout',
    'sentinel_fanout_compat',   # kombu's Sentinel transport: its PUB/SUB fanout topics
})

#: kombu's Sentinel transport options: for ``sentinel-streams://`` URLs only.
SENTINEL = ('master_name', 'sentinel_kwargs', 'min_other_sentinels')

#: Options read by kombu itself (the connection, the virtual channel, Celery).
KOMBU_OWN = frozenset({
    'max_retries', 'interval_start', 'interval_step', 'interval_max',
    'connect_retries_timeout', 'body_encoding', 'deadletter_queue',
    'confirm_publish', 'visibility_timeout_buffer', 'result_chord_ordered',
})

#: The most seconds an option may give (about 31 years): its milliseconds fit every
#: Redis argument (``PX``, ``BLOCK``, ``WAIT``) and a socket timeout.
MAX_SECONDS = 1e9
#: The largest whole number an option may give: Redis' (a signed 64-bit integer).
MAX_WHOLE = 2 ** 63 - 1
#: The most shards a sharded queue may have (``sharded_queues``).
MAX_SHARDS = 256

#: A check: ``check(name, value)`` returns the value to keep, or raises ConfigurationError.
Check = Callable[[str, Any], Any]


# -- the checks (declared with each field of Options below) ---------------------------------

def _refused(name: str, expected: str, value: Any) -> ConfigurationError:
    return ConfigurationError('transport option %s must be %s, not %r' % (name, expected, value))


def _finite(value: Any) -> float | None:
    """``value`` as a finite float; None for no number, a bool, NaN or an infinity."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


def _whole(value: Any) -> int | None:
    """``value`` as an int (an int, a float with no fraction, a string of one); else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return None
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _number(parse: Callable[[Any], Any], *, zero: bool, expected: str, most: float,
            most_text: str) -> Check:
    """A check of a number ``parse`` reads (None: not one), at least 0 (more than 0 unless
    ``zero``) and at most ``most``; the one-line errors say ``expected`` and ``most_text``."""
    def check(name: str, value: Any):
        number = parse(value)
        if number is None or number < 0 or (number == 0 and not zero):
            raise _refused(name, expected, value)
        if number > most:
            raise _refused(name, most_text, value)
        return number
    return check


#: A positive number of seconds.
_seconds = _number(_finite, zero=False, expected='a positive number of seconds',
                   most=MAX_SECONDS, most_text='a number of seconds up to %d' % MAX_SECONDS)
#: A number of seconds, 0 or more.
_seconds_or_zero = _number(_finite, zero=True, expected='a number of seconds, 0 or more',
                           most=MAX_SECONDS, most_text='a number of seconds up to %d' % MAX_SECONDS)
#: A whole number, 1 or more.
_positive_count = _number(_whole, zero=False, expected='a positive number (an integer)',
                          most=MAX_WHOLE, most_text='an integer up to 2**63-1')
#: A whole number, 0 or more.
_count = _number(_whole, zero=True, expected='a whole number, 0 or more',
                 most=MAX_WHOLE, most_text='a whole number up to 2**63-1')


_TRUE = ('true', 'yes', 'on', '1')
_FALSE = ('false', 'no', 'off', '0')


def _flag(name: str, value: Any) -> bool:
    """A boolean option: a bool, or a string of Celery's configuration (``'false'``, ``'0'``...)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise _refused(name, 'true or false', value)


def _text(name: str, value: Any) -> str:
    """Any string, empty included."""
    if not isinstance(value, str):
        raise _refused(name, 'a string', value)
    return value


def _named(expected: str) -> Check:
    """A check of a non-empty string, described as ``expected``."""
    def check(name: str, value: Any) -> str:
        if not isinstance(value, str) or not value:
            raise _refused(name, expected, value)
        return value
    return check


def _one_of(*allowed: str) -> Check:
    def check(name: str, value: Any) -> str:
        if value not in allowed:
            raise _refused(name, 'one of %s' % ', '.join(allowed), value)
        return value
    return check


def _dict(expected: str) -> Check:
    """A check of a mapping (kept as a dict of its own), described as ``expected``."""
    def check(name: str, value: Any) -> dict:
        if not isinstance(value, Mapping):
            raise _refused(name, expected, value)
        return dict(value)
    return check


def _priority_steps(name: str, value: Any) -> tuple:
    """Priority buckets: numbers from 0 to 9, 0 among them; kept sorted, once each."""
    try:
        steps = tuple(sorted({_strict_int(step) for step in value}))
    except (TypeError, ValueError):
        steps = ()
    if not steps or steps[0] != 0 or steps[-1] > 9:
        raise _refused(name, 'numbers from 0 to 9 starting at 0', value)
    return steps


def _strict_int(step: Any) -> int:
    number = _whole(step)
    if number is None:
        raise ValueError(step)
    return number


def _rate_limits(name: str, value: Any) -> tuple:
    try:
        return tuple(rates.from_option(value).values())
    except ConfigurationError as exc:
        message = str(exc)
        raise ConfigurationError(message if message.startswith('transport option')
                                 else 'transport option %s: %s' % (name, message)) from None


def _sharded_queues(name: str, value: Any) -> tuple:
    """Queue name -> number of shards: kept as sorted ``(queue, N)`` pairs."""
    expected = "a dict of queue name -> number of shards from 1 to %d (as {'celery': 3})" % MAX_SHARDS
    if not isinstance(value, Mapping):
        raise _refused(name, expected, value)
    for queue, number in value.items():
        if (not isinstance(queue, str) or not queue or '{' in queue or '}' in queue
                or isinstance(number, bool) or not isinstance(number, int)
                or not 1 <= number <= MAX_SHARDS):
            raise _refused(name, expected, dict(value))
    return tuple(sorted(value.items()))


def _option(default: Any, check: Check) -> Any:
    """A field of :class:`Options` whose given value ``check(name, value)`` checks and converts."""
    return field(default=default, metadata={'check': check})


# -- the options ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Options:
    global_keyprefix: str = _option('', _text)
    consumer_group: str = _option('celery', _named('a non-empty string'))
    polling_interval: float = _option(1.0, _seconds)
    visibility_timeout: float = _option(300.0, _seconds)
    max_deliveries: int = _option(10, _positive_count)
    dead_letter_maxlen: int = _option(10000, _positive_count)
    fanout_maxlen: int = _option(1000, _positive_count)
    max_connections: int = _option(10, _positive_count)
    socket_timeout: float | None = _option(None, _seconds)
    socket_connect_timeout: float | None = _option(None, _seconds)
    socket_keepalive: bool | None = _option(None, _flag)
    socket_keepalive_options: dict | None = _option(None, _dict('a dict of TCP keepalive options'))
    health_check_interval: float = _option(25, _seconds_or_zero)
    retry_on_timeout: bool | None = _option(None, _flag)
    client_name: str | None = _option(None, _text)
    queue_order_strategy: str = _option('round_robin', _one_of('round_robin', 'sorted', 'priority'))
    priority_steps: tuple = _option(DEFAULT_PRIORITY_STEPS, _priority_steps)
    priority_semantics: str = _option('kombu', _one_of('kombu', 'rabbitmq'))
    delayed_delivery: bool = _option(True, _flag)
    delayed_delivery_threshold: float = _option(1.0, _seconds_or_zero)
    master_name: str | None = _option(None, _named('the name the Sentinels monitor (a non-empty string)'))
    sentinel_kwargs: dict | None = _option(None, _dict(
        "a dict of redis-py connection arguments (as {'password': ...})"))
    min_other_sentinels: int | None = _option(None, _count)
    publish_wait_replicas: int | None = _option(None, _count)   # None: by URL (replication.py)
    publish_wait_timeout: float = _option(1.0, _seconds)
    publish_confirm: str = _option('now', _one_of('now', 'later'))
    ledger: bool = _option(True, _flag)
    rate_limits: tuple = _option((), _rate_limits)
    global_task_rate_limits: bool = _option(False, _flag)
    sharded_queues: tuple = _option((), _sharded_queues)
    ignored: tuple = field(default=(), compare=False)

    @classmethod
    def from_transport_options(cls, transport_options: Mapping[str, Any] | None) -> Options:
        """Parse kombu's ``transport_options``; raise one line on a value or name that cannot work."""
        given = dict(transport_options or {})
        ours = [f for f in fields(cls) if 'check' in f.metadata]
        _refuse_unknown(given, sorted(f.name for f in ours))
        values: dict[str, Any] = {f.name: _checked(f, given[f.name]) for f in ours if f.name in given}
        if values.get('publish_confirm') == 'later' and values.get('publish_wait_replicas'):
            raise ConfigurationError(
                "transport option publish_wait_replicas needs publish_confirm='now': a publish "
                'confirmed later does not wait for replicas either')
        return cls(ignored=tuple(sorted(k for k in given if k in IGNORED)), **values)

    # -- derived values: computed here, once, for every module that needs them -------------

    @property
    def visibility_ms(self) -> int:
        """``visibility_timeout`` in ms, at least 1 (``PX 0`` is an error): the liveness keys' expiry."""
        return max(1, int(self.visibility_timeout * 1000))

    @property
    def renew_every(self) -> float:
        """Seconds between renewals of the liveness keys: a third of visibility_timeout, 0.2-60."""
        return min(max(self.visibility_timeout / 3, 0.2), 60.0)

    @property
    def reclaim_every(self) -> float:
        """Seconds between takeovers of dead consumers' messages: a quarter of it, 0.5-60."""
        return min(max(self.visibility_timeout / 4, 0.5), 60.0)

    @property
    def healed_mark_ms(self) -> int:
        """How long (ms) a healed stream's mark lasts: until what was in flight is taken over."""
        return self.visibility_ms

    @property
    def orphan_expiry_ms(self) -> int:
        """Expiry (ms) of an auto-delete broadcast queue its consumers renew: visibility, >= 10 s."""
        return int(max(self.visibility_timeout, 10.0) * 1000)

    @property
    def idle_consumer_ms(self) -> int:
        """A consumer with no liveness key that read within this many ms lives (2 polls + 5 s)."""
        return int((2 * self.polling_interval + 5) * 1000)

    @property
    def block_ms(self) -> int:
        """The ``BLOCK`` of a read, ``polling_interval`` in ms; at least 1 (``BLOCK 0`` waits forever)."""
        return max(1, int(self.polling_interval * 1000))

    @property
    def bucket_order(self) -> tuple:
        """Priority buckets in reading order: highest step first under ``rabbitmq`` semantics."""
        steps = self.priority_steps
        return steps[::-1] if self.priority_semantics == 'rabbitmq' else steps

    @property
    def publish_wait_ms(self) -> int:
        """The timeout of ``WAIT`` behind a publish, ``publish_wait_timeout`` in ms; at least 1."""
        return max(1, round(self.publish_wait_timeout * 1000))

    @property
    def delayed_delivery_threshold_ms(self) -> float:
        """``delayed_delivery_threshold`` in ms: an ETA further ahead than this is scheduled."""
        return self.delayed_delivery_threshold * 1000

    @property
    def sentinel_options(self) -> list[str]:
        """The Sentinel options that were set (they need a ``sentinel-streams://`` URL)."""
        return [name for name in SENTINEL if getattr(self, name) is not None]

    def warn_ignored(self) -> None:
        if self.ignored:
            logger.warning(
                'celery_streams: transport option(s) %s mean nothing on Redis Streams and are ignored',
                ', '.join(self.ignored))


def _checked(option: Field, value: Any) -> Any:
    """``value`` as ``option`` keeps it; None stays None where None is the default (not set)."""
    if value is None and option.default is None:
        return None
    return option.metadata['check'](option.name, value)


def _refuse_unknown(given: Mapping[str, Any], known: list[str]) -> None:
    """Raise one line naming every option nobody knows, with the closest known name (only:
    the list of every name is where the line says, not in it)."""
    unknown = sorted((k for k in given if k not in known and k not in IGNORED and k not in KOMBU_OWN),
                     key=str)
    if unknown:
        hints = ['%r (did you mean %r?)' % (name, close[0]) if close else repr(name)
                 for name in unknown
                 for close in [get_close_matches(str(name), known, n=1, cutoff=0.75)]]
        raise ConfigurationError(
            'unknown transport option(s) %s for celery_streams; its %d options are listed in '
            'docs/configuration.md (the docstring of celery_streams.options)'
            % (', '.join(hints), len(known)))
