"""``celery streams scheduled``: the messages waiting for their ETA (delayed delivery)."""
from __future__ import annotations

from datetime import datetime, timezone

import click
from celery.bin.base import CeleryCommand, CeleryOption

from .. import admin
from .base import Target, cell, listing_json, obj_of, prefix_option, queues_option, streams

SCHEDULED_LIMIT = 10


@streams.command(cls=CeleryCommand)
@queues_option('Scheduled Options', 'every queue with scheduled messages')
@click.option('--limit', cls=CeleryOption, type=click.IntRange(min=0), default=SCHEDULED_LIMIT,
              show_default=True, help_group='Scheduled Options',
              help='Show at most this many messages per queue, the next due first; 0: all.')
@click.option('--json', 'as_json', cls=CeleryOption, is_flag=True, help_group='Scheduled Options',
              help='Print one JSON document (shape: see docs/cli.md).')
@prefix_option
@click.pass_context
def scheduled(ctx, queues, limit, as_json, prefix, **kwargs):
    """Show the next scheduled messages: tasks waiting in Redis for their ETA or countdown.

    Due times are by the Redis server's clock (UTC). `celery inspect scheduled`
    lists only the ETAs a worker holds in memory; these are not in any worker yet.
    """
    obj = obj_of(ctx)
    target = Target(ctx, prefix)
    with target.errors():
        found = admin.scheduled(target.client, global_keyprefix=target.prefix, queues=queues,
                                limit=limit)
    if as_json:
        obj.echo(listing_json(target, limit, found))
        return
    obj.echo(target.describe())
    if not found:
        obj.echo('No scheduled messages.')
        return
    for q in found:
        shown = len(q.messages)
        obj.echo(obj.style('Queue %r: %d scheduled%s' % (
            q.queue, q.scheduled, ', the next %d:' % shown if shown < q.scheduled
            else ':' if shown else '.'), bold=True))
        if not q.messages:
            continue
        rows = [('DUE (UTC)', 'DUE IN', 'TASK', 'TASK ID', 'PRIORITY')]
        for m in q.messages:
            rows.append((_when(m.due), '%+.1fs' % m.due_in, m.task or '-', m.task_id or '-',
                         cell(m.priority)))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        for row in rows:
            obj.echo('  ' + '  '.join(text.rjust(w) if i == 1 else text.ljust(w)
                                      for i, (text, w) in enumerate(zip(row, widths))).rstrip())


def _when(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).strftime('%Y-%m-%d %H:%M:%S.%f')[:-3]
