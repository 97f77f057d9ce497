"""``celery streams``: inspect, drain and reset celery_streams' queues.

::

    celery -A proj streams status [-Q a,b] [--json]
    celery -A proj streams drain  [-Q a,b] [-f] [--dry-run] [--include-broadcast] [--dead-letters]
                                  [--keep-scheduled]
    celery -A proj streams nuke   [-f] [--dry-run] [--keep-dead-letters]
    celery -A proj streams dead-letters list    [-Q a,b] [--json] [--limit N]
    celery -A proj streams dead-letters requeue [-Q a,b] [--id ID ...] [-f] [--dry-run]
    celery -A proj streams dead-letters purge   [-Q a,b] [-f] [--dry-run]
    celery -A proj streams exporter [--port 9808] [--address 127.0.0.1] [--interval N]
    celery -A proj streams scheduled [-Q a,b] [--limit N] [--json]
    celery -A proj streams audit [-Q a,b] [--json] [-v] [--check]
    celery -A proj streams unique [-Q a,b] [--json]
    celery -A proj streams limit list [--json]
    celery -A proj streams limit set NAME RATE [--burst N]
    celery -A proj streams limit clear NAME
    celery -A proj streams shards list [--json]
    celery -A proj streams shards set QUEUE N
    celery --broker redis://host:6379/0 streams [--prefix P] status

The broker URL, ``global_keyprefix`` and ``consumer_group`` come from the app
(``broker_url``, ``broker_transport_options``, ``broker_use_ssl``); without an
app, pass ``--broker``. ``--prefix`` (on ``streams`` or on a subcommand)
overrides the key prefix. The commands are thin: the work is done by
:mod:`celery_streams.admin`. Errors are one line on stderr; exit status 1,
or 69 (``EX_UNAVAILABLE``) when Redis cannot be reached or refuses the
credentials.

``status --json``, ``dead-letters list --json`` and ``scheduled --json`` print
one JSON document each; their shapes are in docs/cli.md (``Status.as_dict()``,
``DeadLetterQueue.as_dict()`` and ``ScheduledQueue.as_dict()`` build them). Ages are measured with the
server's clock (``TIME``).

Every destructive command has one shape (:func:`plan_confirm_apply`): plan,
show, confirm like ``celery purge`` (or ``-f``; ``--dry-run`` stops after
showing), then apply exactly what was shown.

When the app resolves to kombu's Redis *list* transport (``redis://`` and no
``broker_transport``), every command says so on stderr, and ``celery worker``
and ``celery beat`` (which load this plugin) log it at start-up:
:mod:`celery_streams.diagnose`.
"""
from __future__ import annotations

from celery.signals import beat_init, celeryd_after_setup

from .. import diagnose
from . import (audit, dead_letters, exporter, limits, queues, scheduled, shards,  # noqa: F401
               unique)  # (they add their commands)
from .base import plan_confirm_apply, streams

# `celery worker` and `celery beat` load this plugin too: their log says when the app runs on
# kombu's lists.
celeryd_after_setup.connect(diagnose.warn_worker, weak=False, dispatch_uid='celery_streams.diagnose')
beat_init.connect(diagnose.warn_worker, weak=False, dispatch_uid='celery_streams.diagnose.beat')

__all__ = ['streams', 'plan_confirm_apply']
