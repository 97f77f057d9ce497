"""``celery streams unique``: the held uniqueness keys of unique tasks (:mod:`celery_streams.unique`)."""
from __future__ import annotations

import json

import click
from celery.bin.base import CeleryCommand, CeleryOption

from .. import admin
from .base import Target, obj_of, prefix_option, queues_option, seconds, streams


@streams.command(cls=CeleryCommand)
@queues_option('Unique Options', 'every queue')
@click.option('--json', 'as_json', cls=CeleryOption, is_flag=True, help_group='Unique Options',
              help='Print one JSON document (shape: see docs/cli.md).')
@prefix_option
@click.pass_context
def unique(ctx, queues, as_json, prefix, **kwargs):
    """Show the held uniqueness keys: queue, key, mode, the task that holds it, time left.

    A publish with a held key is dropped (modes until_done and period) or replaces
    the scheduled task (debounce). See docs/unique.md.
    """
    obj = obj_of(ctx)
    target = Target(ctx, prefix)
    with target.errors():
        held = admin.unique_keys(target.client, global_keyprefix=target.prefix, queues=queues)
    if as_json:
        obj.echo(json.dumps({'broker': target.url, 'global_keyprefix': target.prefix or '',
                             'keys': [h.as_dict() for h in held]}, indent=2))
        return
    obj.echo(target.describe())
    if not held:
        obj.echo('No uniqueness key is held.')
        return
    rows = [('QUEUE', 'KEY', 'MODE', 'TASK ID', 'TIME LEFT')]
    rows += [(h.queue, h.key, h.mode + (' (scheduled)' if h.scheduled else ''), h.task_id,
              seconds(h.ttl)) for h in held]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        obj.echo('  '.join(text.ljust(w) for text, w in zip(row, widths)).rstrip())
