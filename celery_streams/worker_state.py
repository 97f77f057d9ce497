"""The one place the transport looks into Celery's worker, which it does not import.

It reads the worker's state (shutdown flags, running tasks), shortens how
Celery reports a configuration error that stops a worker, and, with the
``global_task_rate_limits`` option, takes the tasks' own ``rate_limit`` over
as global limits (:func:`task_rate_limits`).

Celery keeps a worker's shutdown flags in ``celery.worker.state``. A pool that
runs tasks inside the delivery (``-P solo``) would otherwise run a whole
prefetched batch after a warm shutdown was asked for. The module is read only
when a worker already imported it: plain kombu programs never load Celery.
"""
from __future__ import annotations

import logging
import sys

from . import rates
from .errors import ConfigurationError, SchemaMismatch

logger = logging.getLogger(__name__)


def running_delivery_tags() -> set:
    """The delivery tags of the tasks a Celery worker in this process is running now.

    When the connection is lost, Celery drops the tasks it only reserved
    (prefetched, scheduled) and keeps running the active ones, whose acks
    come later: those must stay with their consumer, not be put back.
    """
    state = sys.modules.get('celery.worker.state')
    if state is None:
        return set()
    tags = set()
    for request in list(state.active_requests):
        message = getattr(request, 'message', None)
        tag = getattr(message, 'delivery_tag', None)
        if tag is not None:
            tags.add(tag)
    return tags


def worker_shutting_down() -> bool:
    """True once a Celery worker in this process began its shutdown."""
    state = sys.modules.get('celery.worker.state')
    if state is None:
        return False
    # The flags hold the exit code once set, and a warm shutdown's is EX_OK: 0.
    return any(flag is not None and flag is not False
               for flag in (state.should_stop, state.should_terminate))


class _OneLineConfigurationErrors(logging.Filter):
    """Celery logs an error that stops its worker with a traceback; a configuration error
    (wrong password, wrong database, a schema mismatch) is said in one line instead."""

    def filter(self, record):
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, (ConfigurationError, SchemaMismatch)):
            record.msg, record.args = 'Unrecoverable error: %s', (error,)
            record.exc_info = record.exc_text = None
        return True


_node_name = None
_task_limits: tuple = ()


def worker_node_name():
    """The node name of the Celery worker in this process (``w1@host``), or None."""
    return _node_name


def _remember_node_name(sender=None, **kwargs):
    global _node_name
    _node_name = str(sender).replace('/', '_') if sender else None


def task_rate_limits() -> tuple:
    """The ``rate_limit`` of the worker's tasks, as global limits (:class:`rates.Limit`), when
    the ``global_task_rate_limits`` option is on; the transport writes them when it starts
    consuming (:mod:`celery_streams.limits`)."""
    return _task_limits


def _take_task_rate_limits(sender=None, instance=None, **kwargs):
    """``celeryd_after_setup`` (before the worker builds its consumer): with
    ``global_task_rate_limits``, each task's ``rate_limit`` becomes a global limit, and
    Celery's own per-worker limit is switched off for it (``task.rate_limit = None``: the
    consumer makes no token bucket, so nothing waits in the worker's memory)."""
    global _task_limits
    app = getattr(instance, 'app', None)
    options = (app.conf.broker_transport_options or {}) if app is not None else {}
    if options.get('global_task_rate_limits') is not True:
        return
    found = []
    for name, task in sorted(app.tasks.items()):
        rate = getattr(task, 'rate_limit', None)
        if not rate:
            continue
        try:
            found.append(rates.limit(name, rate))
        except ConfigurationError as exc:
            logger.warning('celery_streams: rate_limit of task %s left per worker: %s', name, exc)
            continue
        task.rate_limit = None
    _task_limits = tuple(found)
    if found:
        logger.info('celery_streams: rate limits held across all workers: %s',
                    ', '.join('%s %s' % (limit.name, limit.rate) for limit in found))


def one_line_worker_errors() -> None:
    """Install the filter on the logger of Celery's ``WorkController`` (once), and learn the
    worker's node name when it starts (consumer names carry it, so ``status`` shows it)."""
    signals = sys.modules.get('celery.signals')   # loaded by a worker; plain kombu: not at all
    if signals is not None:
        signals.celeryd_after_setup.connect(_remember_node_name, weak=False,
                                            dispatch_uid='celery_streams.node_name')
        signals.celeryd_after_setup.connect(_take_task_rate_limits, weak=False,
                                            dispatch_uid='celery_streams.task_rate_limits')
    worker_logger = logging.getLogger('celery.worker')   # celery.worker.worker's logger
    if not any(isinstance(f, _OneLineConfigurationErrors) for f in worker_logger.filters):
        worker_logger.addFilter(_OneLineConfigurationErrors())
