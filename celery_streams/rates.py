"""Rate limits as users write them: Celery's notation, and what a limit is.

A limit holds for a task name (``'proj.tasks.charge'``) or for a queue
(``'queue:emails'``: every task read from it), across every worker, process
and pool (:mod:`celery_streams.limits` enforces it). Its rate is written as
Celery's ``rate_limit``: ``'100/s'``, ``'10/m'``, ``'500/h'``, or a number of
tasks a second. Its burst is how many may start at once after a quiet spell
(1 by default: starts are spaced evenly, one interval apart, as Celery's own
per-worker limiter spaces them).

Stored in Redis (:attr:`celery_streams.keys.Keys.limits`) as one hash field
per limit, ``task:NAME`` or ``queue:NAME``, whose value is ``'interval_ms burst
rate'`` (the ``reserve`` script reads the first two, ``status`` shows the third).
"""
from __future__ import annotations

from typing import Any, NamedTuple

from .errors import ConfigurationError

#: Seconds in the period of each unit of Celery's notation.
UNITS = {'s': 1, 'm': 60, 'h': 3600}
QUEUE = 'queue:'
TASK = 'task:'


class Limit(NamedTuple):
    """One rate limit: the hash field it is stored under, and its rate."""

    field: str          # 'task:NAME' or 'queue:NAME'
    rate: str           # as written: '50/s'
    per_second: float
    burst: int = 1

    @property
    def name(self) -> str:
        """What users call it: the task name, or ``queue:NAME``."""
        return self.field[len(TASK):] if self.field.startswith(TASK) else self.field

    @property
    def interval_ms(self) -> float:
        """The time between two starts at the limit's rate."""
        return 1000.0 / self.per_second

    def stored(self) -> str:
        """The hash value (see the module's docstring)."""
        return '%.6f %d %s' % (self.interval_ms, self.burst, self.rate)


def field_of(name: str) -> str:
    """The hash field of a limit named ``name``: ``queue:NAME`` as it is, a task name as ``task:NAME``."""
    if not isinstance(name, str) or not name.strip() or name in (QUEUE, TASK):
        raise ConfigurationError('a rate limit needs a task name or queue:NAME, not %r' % (name,))
    return name if name.startswith((QUEUE, TASK)) else TASK + name


def per_second(rate: Any) -> float:
    """Tasks a second of a rate in Celery's notation; raise one line on anything else."""
    if isinstance(rate, (int, float)) and not isinstance(rate, bool):
        count, unit = float(rate), 's'
    elif isinstance(rate, str):
        text, _, unit = rate.strip().partition('/')
        unit = unit.strip() or 's'
        try:
            count = float(text)
        except ValueError:
            count = -1.0
    else:
        count, unit = -1.0, ''
    if unit not in UNITS or not 0 < count < float('inf'):
        raise ConfigurationError(
            "rate %r is not a rate: write it as Celery does, e.g. '100/s', '10/m', '500/h'" % (rate,))
    return count / UNITS[unit]


def limit(name: str, rate: Any, burst: Any = 1) -> Limit:
    """The :class:`Limit` named ``name`` at ``rate`` (Celery's notation), checked."""
    if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
        raise ConfigurationError('the burst of rate limit %s must be a whole number of at least 1, '
                                 'not %r' % (name, burst))
    return Limit(field_of(name), str(rate).strip(), per_second(rate), burst)


def from_option(value: Any) -> dict:
    """The limits of the ``rate_limits`` transport option, by field.

    ``{'proj.tasks.charge': '5/s', 'queue:emails': '100/m',
    'proj.tasks.sync': {'rate': '10/s', 'burst': 5}}``.
    """
    if not isinstance(value, dict):
        raise ConfigurationError("transport option rate_limits must be a dict of task name or "
                                 "'queue:NAME' to a rate such as '100/s', not %r" % (value,))
    limits = {}
    for name, rate in value.items():
        if isinstance(rate, dict):
            unknown = set(rate) - {'rate', 'burst'}
            if unknown or 'rate' not in rate:
                raise ConfigurationError("rate limit %s: give {'rate': ..., 'burst': ...}, not %r"
                                         % (name, rate))
            found = limit(name, rate['rate'], rate.get('burst', 1))
        else:
            found = limit(name, rate)
        limits[found.field] = found
    return limits


def parse_stored(field: str, value: str) -> Limit | None:
    """The :class:`Limit` of a hash entry, or None when it does not parse (written by hand)."""
    parts = value.split(' ', 2)
    try:
        interval, burst = float(parts[0]), int(parts[1])
    except (ValueError, IndexError):
        return None
    if not interval > 0 or burst < 1:
        return None
    return Limit(field, parts[2] if len(parts) > 2 else '', 1000.0 / interval, burst)
