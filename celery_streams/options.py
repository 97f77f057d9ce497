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
``socket_timeout``              ``None``         redis-py socket timeout, seconds
``socket_connect_timeout``      ``None``         redis-py connect timeout, seconds
``socket_keepalive``            ``None``         TCP keepalive
``socket_keepalive_options``    ``None``         TCP keepalive options
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
``publish_wait_replicas``       ``0``            a publish returns once this many replicas
                                                 have it (``WAIT``, pipelined with the
                                                 write), else raises ``NotReplicated``;
                                                 0: off
``publish_wait_timeout``        ``1.0``          seconds ``WAIT`` waits for them at most
``publish_confirm``             ``'now'``        ``now``: a publish returns once Redis has
                                                 the message; ``later``: once it is
                                                 written, Redis' reply read by a later
                                                 publish (faster; what can be lost:
                                                 docs/guarantees.md)
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
"""
from __future__ import annotations

import logging
from difflib import get_close_matches
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

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


@dataclass(frozen=True)
class Options:
    global_keyprefix: str = ''
    consumer_group: str = 'celery'
    polling_interval: float = 1.0
    visibility_timeout: float = 300.0
    max_deliveries: int = 10
    dead_letter_maxlen: int = 10000
    fanout_maxlen: int = 1000
    max_connections: int = 10
    socket_timeout: float | None = None
    socket_connect_timeout: float | None = None
    socket_keepalive: bool | None = None
    socket_keepalive_options: dict | None = None
    health_check_interval: float = 25
    retry_on_timeout: bool | None = None
    client_name: str | None = None
    queue_order_strategy: str = 'round_robin'
    priority_steps: tuple = DEFAULT_PRIORITY_STEPS
    priority_semantics: str = 'kombu'
    delayed_delivery: bool = True
    delayed_delivery_threshold: float = 1.0
    master_name: str | None = None
    sentinel_kwargs: dict | None = None
    min_other_sentinels: int | None = None
    publish_wait_replicas: int = 0
    publish_wait_timeout: float = 1.0
    publish_confirm: str = 'now'
    ignored: tuple = field(default=(), compare=False)

    @classmethod
    def from_transport_options(cls, transport_options: Mapping[str, Any] | None) -> Options:
        """Parse kombu's ``transport_options``; raise one line on a name nobody knows."""
        given = dict(transport_options or {})
        ours = {f.name: f for f in fields(cls) if f.name != 'ignored'}
        unknown = sorted(k for k in given if k not in ours and k not in IGNORED and k not in KOMBU_OWN)
        if unknown:
            known = sorted(ours)
            hints = ['%r (did you mean %r?)' % (name, close[0]) if close else repr(name)
                     for name in unknown
                     for close in [get_close_matches(str(name), known, n=1, cutoff=0.75)]]
            raise ConfigurationError(
                'unknown transport option(s) %s for celery_streams; known: %s'
                % (', '.join(hints), ', '.join(known)))
        values = {k: given[k] for k in ours if k in given}
        for name in ('polling_interval', 'visibility_timeout'):
            if name in values:
                values[name] = _positive(name, values[name], float)
        for name in ('max_deliveries', 'dead_letter_maxlen', 'fanout_maxlen', 'max_connections'):
            if name in values:
                values[name] = _positive(name, values[name], int)
        if 'delayed_delivery' in values:
            values['delayed_delivery'] = _flag('delayed_delivery', values['delayed_delivery'])
        if 'delayed_delivery_threshold' in values:
            values['delayed_delivery_threshold'] = _not_negative(
                'delayed_delivery_threshold', values['delayed_delivery_threshold'])
        for name in ('min_other_sentinels', 'publish_wait_replicas'):
            if name in values:
                values[name] = _count(name, values[name])
        if 'publish_wait_timeout' in values:
            values['publish_wait_timeout'] = _positive('publish_wait_timeout',
                                                       values['publish_wait_timeout'], float)
        if 'master_name' in values and (not isinstance(values['master_name'], str)
                                        or not values['master_name']):
            raise ConfigurationError('transport option master_name must be the name the '
                                     'Sentinels monitor (a non-empty string), not %r'
                                     % (values['master_name'],))
        if values.get('sentinel_kwargs') is not None:
            if not isinstance(values['sentinel_kwargs'], Mapping):
                raise ConfigurationError(
                    'transport option sentinel_kwargs must be a dict of redis-py connection '
                    "arguments (as {'password': ...}), not %r" % (values['sentinel_kwargs'],))
            values['sentinel_kwargs'] = dict(values['sentinel_kwargs'])
        if not isinstance(values.get('consumer_group', 'x'), str) or not values.get('consumer_group', 'x'):
            raise ConfigurationError('transport option consumer_group must be a non-empty string')
        _choice('queue_order_strategy', values, ('round_robin', 'sorted', 'priority'))
        _choice('priority_semantics', values, ('kombu', 'rabbitmq'))
        _choice('publish_confirm', values, ('now', 'later'))
        if values.get('publish_confirm') == 'later' and values.get('publish_wait_replicas'):
            raise ConfigurationError(
                "transport option publish_wait_replicas needs publish_confirm='now': a publish "
                'confirmed later does not wait for replicas either')
        if 'priority_steps' in values:
            try:
                steps = tuple(sorted({int(step) for step in values['priority_steps']}))
            except (TypeError, ValueError):
                steps = ()
            if not steps or steps[0] != 0 or steps[-1] > 9:
                raise ConfigurationError(
                    'transport option priority_steps must be numbers from 0 to 9 starting at 0, '
                    'not %r' % (values['priority_steps'],))
            values['priority_steps'] = steps
        ignored = tuple(sorted(k for k in given if k in IGNORED))
        return cls(ignored=ignored, **values)

    @property
    def sentinel_options(self) -> list[str]:
        """The Sentinel options that were set (they need a ``sentinel-streams://`` URL)."""
        return [name for name in SENTINEL if getattr(self, name) is not None]

    def warn_ignored(self) -> None:
        if self.ignored:
            logger.warning(
                'celery_streams: transport option(s) %s mean nothing on Redis Streams and are ignored',
                ', '.join(self.ignored))


def _choice(name, values, allowed):
    if name in values and values[name] not in allowed:
        raise ConfigurationError('transport option %s must be one of %s, not %r'
                                 % (name, ', '.join(allowed), values[name]))


def _positive(name, value, kind):
    try:
        number = kind(value)
    except (TypeError, ValueError):
        number = None
    if number is None or number <= 0:
        raise ConfigurationError(
            'transport option %s must be a positive number, not %r' % (name, value))
    return number


def _count(name, value):
    """A whole number, 0 or more."""
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).strip().isdigit():
        raise ConfigurationError(
            'transport option %s must be a whole number, 0 or more, not %r' % (name, value))
    return int(value)


def _flag(name, value):
    """A boolean option: a bool, or a string of Celery's configuration (``'false'``, ``'0'``...)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise ConfigurationError('transport option %s must be true or false, not %r' % (name, value))


_TRUE = ('true', 'yes', 'on', '1')
_FALSE = ('false', 'no', 'off', '0')


def _not_negative(name, value):
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = None
    if number is None or number < 0 or number != number or isinstance(value, bool):
        raise ConfigurationError(
            'transport option %s must be a number of seconds, 0 or more, not %r' % (name, value))
    return number
