"""Unique tasks for Celery users: a helper for any task, and a base class.

::

    from celery_streams.unique_tasks import UniqueTask, apply_unique

    result = apply_unique(refresh, args=(42,), key='refresh:42')      # until done
    result = apply_unique(report, key='report', mode='period', unique_for=60)

    @app.task(base=UniqueTask, unique_key='refresh:{0}')               # from the arguments
    def refresh(account): ...

    refresh.delay(42)   # the AsyncResult of the task that stands for 'refresh:42'

Both return the ``AsyncResult`` of the task that stands for the key: the one
just published, or the one already waiting or running when this one was
dropped as its duplicate (its ``get()`` waits for that task). Plain
``apply_async(headers={'unique_key': ...})`` works too (the transport reads
the headers, :mod:`celery_streams.unique`): its result is the dropped task's,
whose ``get()`` raises :class:`~celery_streams.unique.DuplicateTask` at once.
"""
from __future__ import annotations

from celery import Task

from . import unique
from .unique import DuplicateTask  # noqa: F401  (public here)


def unique_headers(key: str, mode: str = unique.UNTIL_DONE, unique_for: float | None = None) -> dict:
    """The message headers that give a publish uniqueness key ``key`` (for
    ``apply_async(headers=...)``); checked here, so a mistake raises in the caller."""
    headers: dict = {unique.KEY: str(key), unique.MODE: mode}
    if unique_for is not None:
        headers[unique.FOR] = float(unique_for)
    unique.claim_of(headers, {})   # ValueError for a bad mode or period
    return headers


def apply_unique(task, args=None, kwargs=None, *, key: str, mode: str = unique.UNTIL_DONE,
                 unique_for: float | None = None, **options):
    """``task.apply_async(args, kwargs, **options)`` with uniqueness key ``key``; the
    ``AsyncResult`` of the task that stands for the key (see the module docstring)."""
    headers = {**(options.pop('headers', None) or {}), **unique_headers(key, mode, unique_for)}
    return _standing(task, lambda: task.apply_async(args, kwargs, headers=headers, **options), key)


def _standing(task, send, key):
    """Publish with ``send()``; the result of the task that stands for ``key``. The dropped
    (or replaced) task's result is stored through ``task``'s own app."""
    unique._storing.app = task.app
    try:
        result = send()
    finally:
        unique._storing.app = None
    outcome = unique.take_outcome(result.id)
    if outcome is None:   # run eagerly, or published without the transport's answer
        return result
    what, other = outcome
    if what == 'dropped':
        unique.store_duplicate(task.app, result.id, other, key)
        return task.AsyncResult(other)
    if what == 'replaced':
        unique.store_duplicate(task.app, other, result.id, key, 'replaced')
    return result


class UniqueTask(Task):
    """A task published with a uniqueness key made from its arguments.

    Options (``@app.task(base=UniqueTask, unique_key=..., ...)``, or per call in
    ``apply_async``): ``unique_key`` -- a ``str.format`` template over the
    arguments (``'refresh:{0}'``, ``'refresh:{account}'``) or a callable
    ``(args, kwargs) -> str``; ``unique_mode`` (``'until_done'``, ``'period'``,
    ``'debounce'``); ``unique_for`` (seconds). ``apply_async`` and ``delay``
    return the ``AsyncResult`` of the task that stands for the key. A retry
    keeps the key (the transport tells it from a duplicate).
    """

    unique_key = None
    unique_mode = unique.UNTIL_DONE
    unique_for = None

    def unique_key_for(self, args, kwargs) -> str | None:
        """The uniqueness key of a call, or None for a call without one."""
        template = self.unique_key
        if template is None:
            return None
        if callable(template):
            return template(tuple(args or ()), dict(kwargs or {}))
        return template.format(*(args or ()), **(kwargs or {}))

    def apply_async(self, args=None, kwargs=None, task_id=None, producer=None, link=None,
                    link_error=None, shadow=None, **options):
        headers = options.get('headers') or {}
        key = options.pop(unique.KEY, None) or headers.get(unique.KEY) or self.unique_key_for(args, kwargs)
        mode = options.pop(unique.MODE, None) or headers.get(unique.MODE) or self.unique_mode
        seconds = options.pop(unique.FOR, None) or headers.get(unique.FOR) or self.unique_for
        parent = super().apply_async
        if key is None:
            return parent(args, kwargs, task_id, producer, link, link_error, shadow, **options)
        options['headers'] = {**headers, **unique_headers(key, mode, seconds)}
        return _standing(self, lambda: parent(args, kwargs, task_id, producer, link, link_error,
                                              shadow, **options), key)
