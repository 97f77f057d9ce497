"""Prometheus metrics of the queues under one key prefix, through prometheus_client.

:class:`Exporter` is a prometheus_client collector: its ``collect()`` yields
``GaugeMetricFamily`` / ``CounterMetricFamily`` built from one
:func:`celery_streams.admin.status` (the same look as ``celery streams
status``: the registry, one ``SCAN``, then ``XLEN`` / ``XINFO`` / ``XPENDING``
per stream), the liveness keys (``QueueStatus.alive_consumers``: XINFO lists
only the consumers that have read) and the ledgers. It collects at most every
``interval`` seconds and yields the cached families in between; a failed
collection (Redis down, credentials refused...) gives ``celery_streams_up 0``
/ ``celery_streams_last_scrape_error 1`` and no queue metric, never an
exception. :func:`registry` puts it in a ``CollectorRegistry`` with
prometheus_client's process and platform collectors; ``celery streams
exporter`` (:mod:`celery_streams.cli.exporter`) serves that over HTTP::

    from celery_streams import admin, exporter

    client = admin.client_from_url('redis-streams://localhost:6379/0')
    print(exporter.Exporter(client, global_keyprefix='proj:').metrics())

The ledger of each queue (:mod:`celery_streams.ledger`) is served as counters,
``celery_streams_queue_<counter>_total`` (``published``, ``acked``,
``dead_lettered``...: ``rate()`` of them is a throughput), with
``celery_streams_queue_unaccounted``, the audit's difference (0: nothing lost).
Every other metric is a gauge. The names of celery-exporter are kept where one
exists (``celery_queue_length``, ``celery_active_consumer_count``, label
``queue_name``); the others start with ``celery_streams_``. What concerns a
consumer group (pending, lag, consumers) is about the group the workers use
(``consumer_group``, default ``celery``), summed over the priority buckets.
``celery_streams_queue_scheduled`` counts the messages waiting for their ETA in
the queue's schedule (delayed delivery: ``QueueStatus.scheduled``).
docs/metrics.md describes each metric.
"""
from __future__ import annotations

import threading
import time
from typing import Callable, Iterable, Union

import redis
from prometheus_client import (CollectorRegistry, PlatformCollector, ProcessCollector,
                               generate_latest)
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from . import admin, ledger
from .errors import one_line
from .keys import FANOUT
from .slots import Client

#: What a scrape without an Accept header gets: the text format 0.0.4.
CONTENT_TYPE = 'text/plain; version=0.0.4; charset=utf-8'
DEFAULT_INTERVAL = 5.0

QUEUE_LENGTH = 'celery_queue_length'
ACTIVE_CONSUMERS = 'celery_active_consumer_count'

#: A metric family of prometheus_client, its samples added with ``add_metric(labels, value)``.
Family = Union[GaugeMetricFamily, CounterMetricFamily]

#: Every metric the exporter serves: name -> help text (gauges; the ledger's counters are added
#: below).
METRICS = {
    'celery_streams_up':
        'Whether Redis answered the last collection (1) or could not be reached (0).',
    'celery_streams_last_scrape_error':
        'Whether the last collection failed (1: Redis down, credentials or a command refused).',
    'celery_streams_scrape_duration_seconds': 'Seconds the last collection took.',
    'celery_streams_queue_info':
        'One per queue found, always 1; label kind: task, fanout or unregistered.',
    QUEUE_LENGTH:
        'Messages waiting in the queue: not yet delivered to a consumer (all priority buckets).',
    'celery_streams_queue_pending':
        'Messages delivered to a consumer of the group and not acked yet (the PEL).',
    'celery_streams_queue_lag':
        'Entries the group has not read yet, as the server reports it (Redis 7.0+ only).',
    'celery_streams_queue_stream_length':
        'Entries in the queue streams (XLEN): waiting and pending ones, and read broadcasts.',
    'celery_streams_queue_oldest_pending_age_seconds':
        'Age of the oldest pending message in seconds (server clock); 0 when none is pending.',
    'celery_streams_queue_dead_letters': 'Messages in the queue dead-letter stream.',
    'celery_streams_queue_scheduled':
        'Messages waiting in Redis for their ETA or countdown (delayed delivery), not yet in the '
        'queue streams.',
    ACTIVE_CONSUMERS:
        'Consumers alive on the queue: with a liveness key (broadcast queues: every consumer '
        'of the group).',
    'celery_streams_queue_consumers':
        'Consumers known to the group, alive or not (XINFO CONSUMERS).',
    'celery_streams_consumer_pending':
        'Messages delivered to this consumer and not acked yet.',
    'celery_streams_consumer_idle_seconds':
        'Seconds since this consumer last read or claimed (its smallest idle time).',
}
#: The ledger's counters: one counter family per counter of the ledger.
COUNTER_HELP = {
    'published': 'Messages published to the queue (appended or scheduled; a dead letter requeued '
                 'by an operator counts again).',
    'delivered': 'Entries read by consumers of the queue.',
    'redelivered': 'Entries taken over from a consumer that died (reclaimed).',
    'acked': 'Messages acked (a second ack of one message counts nothing).',
    'rejected': 'Messages rejected without requeue (gone).',
    'requeued': 'Messages rejected with requeue: the same message back at the tail.',
    'restored': 'Messages put back unstarted (a warm shutdown, a cancelled consumer).',
    'dead_lettered': 'Messages moved to the dead letters.',
    'revived': 'Dead letters requeued by an operator.',
    'dead_purged': 'Dead letters purged by an operator.',
    'expired': 'Messages dropped when read: x-message-ttl or a message expiration.',
    'drained': 'Messages removed by a drain or a purge.',
    'dropped': 'Entries trimmed away by MAXLEN (broadcast queues), or scheduled tasks a debounce '
               'replaced.',
    'throttled': 'Deliveries held back by a global rate limit until their reserved start.',
}
METRICS.update({'celery_streams_queue_%s_total' % name: COUNTER_HELP[name] for name in ledger.COUNTERS})
METRICS['celery_streams_queue_unaccounted'] = (
    'The audit of the queue ledger: messages published less those counted out or found '
    '(waiting, pending, scheduled); 0 when nothing was lost. Task queues only.')
#: The metrics of the collection itself, served whatever happened.
SCRAPE_METRICS = ('celery_streams_up', 'celery_streams_last_scrape_error',
                  'celery_streams_scrape_duration_seconds')
#: The metrics of the ledgers (:func:`ledger_families`).
LEDGER_METRICS = tuple(name for name in METRICS
                       if name.endswith('_total') or name == 'celery_streams_queue_unaccounted')
#: The label names of the metrics that have others than ``queue_name`` (in this order).
LABELS: dict[str, tuple[str, ...]] = {
    **{name: () for name in SCRAPE_METRICS},
    'celery_streams_queue_info': ('queue_name', 'kind'),
    'celery_streams_consumer_pending': ('queue_name', 'consumer'),
    'celery_streams_consumer_idle_seconds': ('queue_name', 'consumer'),
}


def family(name: str) -> Family:
    """The family serving metric ``name``, without samples yet.

    A name ending in ``_total`` is a ``CounterMetricFamily`` named without the
    suffix: prometheus_client appends ``_total`` to its samples (and, in the text
    format 0.0.4, to the family), so the exposed name is ``name``. Any other is a
    ``GaugeMetricFamily``. Its labels are ``LABELS[name]`` (default ``queue_name``).
    """
    labels = LABELS.get(name, ('queue_name',))
    if name.endswith('_total'):
        return CounterMetricFamily(name[:-len('_total')], METRICS[name], labels=labels)
    return GaugeMetricFamily(name, METRICS[name], labels=labels)


def ledger_families(audits: Iterable[ledger.QueueAudit]) -> list[Family]:
    """The ledger's counters and the audit's difference, per queue."""
    counters = {name: family('celery_streams_queue_%s_total' % name) for name in ledger.COUNTERS}
    unaccounted = family('celery_streams_queue_unaccounted')
    for audit in audits:
        for name, fam in counters.items():
            fam.add_metric([audit.queue], audit.count(name))
        if audit.unaccounted is not None:
            unaccounted.add_metric([audit.queue], audit.unaccounted)
    return [*counters.values(), unaccounted]


def queue_families(found: admin.Status) -> list[Family]:
    """The queue and consumer metrics of one :func:`admin.status` result.

    A consumer keeps a liveness key on every queue it consumes, but ``XINFO
    CONSUMERS`` lists it only once it has read there: the alive ones are
    counted from ``alive_consumers``, so an idle queue's consumers count too.
    """
    families = {name: family(name) for name in METRICS
                if name not in SCRAPE_METRICS and name not in LEDGER_METRICS}

    def add(name: str, value: float, *labels: str) -> None:   # the queue's name first
        families[name].add_metric(list(labels), value)

    for q in found.queues:
        add('celery_streams_queue_info', 1, q.name, q.kind or 'unregistered')
        if q.waiting is not None:   # a broadcast queue before Redis 7: unknown
            add(QUEUE_LENGTH, q.waiting, q.name)
        add('celery_streams_queue_pending', q.pending, q.name)
        add('celery_streams_queue_stream_length', q.length, q.name)
        add('celery_streams_queue_oldest_pending_age_seconds', q.oldest_pending_age or 0, q.name)
        add('celery_streams_queue_dead_letters', q.dead_letters, q.name)
        add('celery_streams_queue_scheduled', q.scheduled, q.name)
        own = [g for g in q.groups if g.name == found.consumer_group]
        lags = [g.lag for g in own if g.lag is not None]
        if own and len(lags) == len(own):
            add('celery_streams_queue_lag', sum(lags), q.name)
        consumers: dict[str, list] = {}   # name -> [pending, idle_ms, alive] over the buckets
        for c in (c for g in own for c in g.consumers):
            seen = consumers.setdefault(c.name, [0, c.idle_ms, c.alive])
            seen[0] += c.pending
            seen[1] = min(seen[1], c.idle_ms)
        if q.kind == FANOUT:   # broadcast consumers keep no liveness key
            active = len(consumers)
        else:
            active = len(set(q.alive_consumers) | {n for n, c in consumers.items() if c[2]})
        add(ACTIVE_CONSUMERS, active, q.name)
        add('celery_streams_queue_consumers', len(consumers), q.name)
        for name in sorted(consumers):
            pending, idle_ms, _ = consumers[name]
            add('celery_streams_consumer_pending', pending, q.name, name)
            add('celery_streams_consumer_idle_seconds', idle_ms / 1000, q.name, name)
    return list(families.values())


# -- the collector -------------------------------------------------------------------

class Exporter(Collector):
    """The prometheus_client collector of one Redis and prefix, collecting at most every
    ``interval`` seconds.

    ``describe(exc)`` makes the one line said of a failed collection (default:
    the error's first line); ``on_change(line)`` is called when that line
    changes: with the line when collections start failing (or fail
    differently), with None when they succeed again. Thread-safe: concurrent
    scrapes wait for one collection.
    """

    def __init__(self, client: Client, *, global_keyprefix: str = '',
                 consumer_group: str = 'celery', interval: float = DEFAULT_INTERVAL,
                 describe: Callable[[BaseException], str] = one_line,
                 on_change: Callable[[str | None], None] | None = None):
        self.client = client
        self.global_keyprefix = global_keyprefix
        self.consumer_group = consumer_group
        self.interval = interval
        self.explain = describe   # not ``describe``: the registry would call it
        self.on_change = on_change
        self.last_error: str | None = None
        self._lock = threading.Lock()
        self._cached: tuple[float, list[Metric]] | None = None

    def collect(self) -> list[Metric]:
        """The families of the last collection, collecting again when it is ``interval`` old
        (what the registry calls at each scrape)."""
        with self._lock:
            now = time.monotonic()
            if self._cached is None or now - self._cached[0] >= self.interval:
                self._cached = (now, self.gather())
            return self._cached[1]

    def metrics(self) -> str:
        """This collector's families alone in the text format 0.0.4 (no process metrics)."""
        return generate_latest(self).decode()

    def gather(self) -> list[Metric]:
        """Collect now: up, scrape duration and error, then the queue metrics (the families
        that have samples)."""
        started = time.perf_counter()
        up, error = 1, None
        queues: list[Family] = []
        try:
            found = admin.status(self.client, global_keyprefix=self.global_keyprefix,
                                 consumer_group=self.consumer_group)
            queues = queue_families(found)
            queues += ledger_families(ledger.audit(
                self.client, global_keyprefix=self.global_keyprefix,
                queues=[q.name for q in found.queues], consumer_group=self.consumer_group))
        except Exception as exc:   # a scrape says what failed; it never stops the exporter
            up = 0 if isinstance(exc, (redis.ConnectionError, redis.TimeoutError)) else 1
            error = self.explain(exc)
        if error != self.last_error and self.on_change is not None:
            self.on_change(error)
        self.last_error = error
        fixed = {name: family(name) for name in SCRAPE_METRICS}
        fixed['celery_streams_up'].add_metric([], up)
        fixed['celery_streams_last_scrape_error'].add_metric([], 0 if error is None else 1)
        fixed['celery_streams_scrape_duration_seconds'].add_metric(
            [], round(time.perf_counter() - started, 6))
        return [fam for fam in (*fixed.values(), *queues) if fam.samples]


def registry(exporter: Exporter) -> CollectorRegistry:
    """A registry of ``exporter`` and prometheus_client's process (``process_*``) and platform
    (``python_info``) collectors: what ``celery streams exporter`` serves."""
    found = CollectorRegistry()
    found.register(exporter)
    ProcessCollector(registry=found)
    PlatformCollector(registry=found)
    return found
